"""Soft additive attention over the image grid (Bahdanau et al.; Xu et al., Show, Attend and Tell)."""

from __future__ import annotations

import torch
from torch import nn

BLOCK = 1 << 20  # elements of the (images, K, N, A) activation computed at once: 4 MB in fp32, which stays in cache


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
        """keys (B, N, A) from project_keys, features (B, N, C), query (B*K, H): K queries per image, image-major (an
        image's K beams read one copy of its grid), mask (B, N) True where valid -> context (B*K, C), alpha (B*K, N)
        summing to 1 over the valid positions.

        The score w . tanh(k + q) is computed as 2 w . sigmoid(2k + 2q) - sum(w): the same number, and the constant
        cancels in the softmax. On CPUs sigmoid is several times faster than tanh, and this (B, K, N, A) activation
        is the largest elementwise work of a decoding step. On a CPU it is computed a few images at a time: each block
        stays in cache from the add through the score, where a whole batch's (32 MB at 64 images, beam 5) went through
        memory three times; with keys read once per image rather than once per beam, this halved the attention's
        time in batched beam search on a 2-core CPU. The score is a matrix-vector product with the score layer's
        weight: through nn.Linear its backward is a (B*N, 1) x (1, A) matrix product, which CPU BLAS runs several
        times slower than the broadcast multiply that a matrix-vector product's backward is."""
        B, N, A = keys.shape
        K = query.size(0) // B
        q = 2 * self.query(query).view(B, K, 1, A)
        # images per block on a CPU; a GPU takes the whole batch at once (a block would be one more kernel launch)
        images = max(1, BLOCK // (K * N * A) if keys.device.type == "cpu" else B)
        e = torch.cat([2 * ((k.unsqueeze(1) + qk).sigmoid_() @ self.score.weight[0])  # split, not sliced: the
                       for k, qk in zip(keys.split(images), q.split(images))])  # backward concatenates; (B, K, N)
        if mask is not None:
            e = e.masked_fill(~mask.unsqueeze(1), float("-inf"))
        alpha = e.float().softmax(dim=-1).to(features.dtype)  # softmax in fp32 under mixed precision
        context = torch.bmm(alpha, features)  # (B, K, C)
        return context.view(B * K, -1), alpha.view(B * K, N)
