"""Soft additive attention over the image grid (Bahdanau et al.; Xu et al., Show, Attend and Tell)."""

from __future__ import annotations

import torch
from torch import nn


class AdditiveAttention(nn.Module):
    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)  # a bias would cancel in the softmax

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, A), doubled (see forward); done once per image, not at every decoding step."""
        return 2 * self.key(features)

    def forward(self, keys: torch.Tensor, features: torch.Tensor, query: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """keys (B, N, A) from project_keys, features (B, N, C), query (B, H), mask (B, N) True where valid
        -> context (B, C), alpha (B, N) summing to 1 over the valid positions.

        The score w . tanh(k + q) is computed as 2 w . sigmoid(2k + 2q) - sum(w): the same number, and the constant
        cancels in the softmax. On CPUs sigmoid is several times faster than tanh, and this (B, N, A) activation is
        the largest elementwise work of a decoding step. The score is a matrix-vector product with the score layer's
        weight: through nn.Linear its backward is a (B*N, 1) x (1, A) matrix product, which CPU BLAS runs several
        times slower than the broadcast multiply that a matrix-vector product's backward is."""
        x = keys + 2 * self.query(query).unsqueeze(1)  # (B, N, A)
        e = 2 * (x.sigmoid_() @ self.score.weight[0])  # (B, N)
        if mask is not None:
            e = e.masked_fill(~mask, float("-inf"))
        alpha = e.float().softmax(dim=-1).to(features.dtype)  # softmax in fp32 under mixed precision
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, C)
        return context, alpha
