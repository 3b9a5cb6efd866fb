"""Recurrent caption decoders sharing one step function.

`init(grid, pooled)` turns encoder output into the recurrent state and a per-image memory; `step(words, state,
memory)` advances one word. Training, greedy, sampling and beam search all go through `step`; Show and Tell also
has an equivalent whole-sequence fast path for teacher forcing. State tensors are (layers, B, H); memory tensors
are (B, ...) and never change during decoding, so beam search only expands them once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from captioning.config import ModelConfig
from captioning.models.attention import AdditiveAttention
from captioning.vocab import PAD_ID, Vocabulary

State = tuple[torch.Tensor, ...]  # (h,) or (h, c), each (layers, B, H)
Memory = tuple[torch.Tensor, ...]  # per-image tensors, batch first

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, input_dim: int):
        super().__init__()
        self.cell, self.num_layers, self.hidden_dim = cfg.cell, cfg.num_layers, cfg.hidden_dim
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=PAD_ID)
        self.rnn = _CELLS[cfg.cell](input_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True,
                                    dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, vocab_size)

    def run_rnn(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x (B, T, I) -> outputs (B, T, H), new state."""
        if x.size(1) == 1:
            return self._run_one_step(x[:, 0], state)
        if self.cell == "lstm":
            out, (h, c) = self.rnn(x, state)
            return out, (h, c)
        out, h = self.rnn(x, state[0])
        return out, (h,)

    def _run_one_step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One time step with the cell ops and the same weights: on CPU nn.LSTM's oneDNN path re-packs its weights
        on every call (~20 ms whatever the batch), which dominated step-by-step decoding."""
        inp, hs, cs = x, [], []
        for layer in range(self.num_layers):
            w = [getattr(self.rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if self.cell == "lstm":
                h, c = torch.lstm_cell(inp, (state[0][layer], state[1][layer]), *w)
                cs.append(c)
            elif self.cell == "gru":
                h = torch.gru_cell(inp, state[0][layer], *w)
            else:
                h = torch.rnn_tanh_cell(inp, state[0][layer], *w)
            hs.append(h)
            last = layer == self.num_layers - 1
            inp = h if last else F.dropout(h, self.rnn.dropout, self.training)  # as nn.LSTM: between layers only
        new_state = (torch.stack(hs), torch.stack(cs)) if self.cell == "lstm" else (torch.stack(hs),)
        return inp.unsqueeze(1), new_state

    def init(self, grid: torch.Tensor, pooled: torch.Tensor) -> tuple[State, Memory]:
        raise NotImplementedError

    def step(self, words: torch.Tensor, state: State, memory: Memory
             ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """words (B,) -> logits (B, V), new state, attention weights (B, N) or None."""
        raise NotImplementedError

    def forward(self, grid: torch.Tensor, pooled: torch.Tensor, captions: torch.Tensor,
                image_index: torch.Tensor | None = None, sample_prob: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: B images, captions (R, T) starting with <start>, image_index (R,) naming each caption's
        image (None: R == B, one each) -> logits (R, T-1, V) predicting captions[:, 1:], attention (R, T-1, N) or
        None. With sample_prob > 0 (scheduled sampling) each input word is replaced by the model's own previous
        prediction with that probability."""
        state, memory = select_rows(*self.init(grid, pooled), image_index)
        words = captions[:, 0]
        logits, alphas = [], []
        for t in range(captions.size(1) - 1):
            step_logits, state, alpha = self.step(words, state, memory)
            logits.append(step_logits)
            alphas.append(alpha)
            words = captions[:, t + 1]
            if sample_prob > 0:
                own = step_logits.detach().argmax(-1)
                words = torch.where(torch.rand_like(words, dtype=torch.float) < sample_prob, own, words)
        alpha_seq = torch.stack(alphas, 1) if alphas[0] is not None else None
        return torch.stack(logits, 1), alpha_seq


class ShowTellDecoder(CaptionDecoder):
    """Vinyals et al. 2015: the pooled image vector, projected into the word-embedding space, is the LSTM's first
    input; the caption words follow."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, feature_dim: int):
        super().__init__(cfg, vocab_size, input_dim=cfg.embed_dim)
        self.image_proj = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, cfg.embed_dim))

    def _zero_state(self, batch: int, ref: torch.Tensor) -> State:
        h = ref.new_zeros(self.num_layers, batch, self.hidden_dim)
        return (h, h.clone()) if self.cell == "lstm" else (h,)

    def init(self, grid: torch.Tensor, pooled: torch.Tensor) -> tuple[State, Memory]:
        image = self.image_proj(pooled).unsqueeze(1)  # (B, 1, E)
        _, state = self.run_rnn(image, self._zero_state(pooled.size(0), image))
        return state, ()

    def step(self, words, state, memory):
        out, state = self.run_rnn(self.embed(words).unsqueeze(1), state)  # (B, 1, H)
        return self.out(self.dropout(out.squeeze(1))), state, None

    def forward(self, grid, pooled, captions, image_index=None, sample_prob=0.0):
        if sample_prob > 0:
            return super().forward(grid, pooled, captions, image_index, sample_prob)
        # Whole sequence in one cuDNN call: [image, <start>, w1, ...] -> outputs from position 1 on.
        image = self.image_proj(pooled).unsqueeze(1)  # (B, 1, E)
        if image_index is not None:
            image = image[image_index]  # (R, 1, E)
        x = torch.cat([image, self.embed(captions[:, :-1])], dim=1)  # (R, T, E)
        out, _ = self.run_rnn(x, self._zero_state(image.size(0), image))
        return self.out(self.dropout(out[:, 1:])), None  # (R, T-1, V)


class AttentionDecoder(CaptionDecoder):
    """Xu et al. 2015 (soft attention): at each step the decoder attends over the grid with its top hidden state,
    gates the context with a learned scalar, and reads [word embedding; context]. h and c start from the mean
    feature."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, feature_dim: int):
        super().__init__(cfg, vocab_size, input_dim=cfg.embed_dim + feature_dim)
        self.attention = AdditiveAttention(feature_dim, cfg.hidden_dim, cfg.attention_dim)
        self.gate = nn.Linear(cfg.hidden_dim, 1)
        self.norm = nn.LayerNorm(feature_dim)
        n_init = 2 if cfg.cell == "lstm" else 1
        self.init_state = nn.Linear(feature_dim, n_init * cfg.num_layers * cfg.hidden_dim)

    def init(self, grid, pooled):
        B = pooled.size(0)
        grid = self.norm(grid)  # backbones differ wildly in feature scale; this keeps tanh/attention out of saturation
        s = torch.tanh(self.init_state(grid.mean(1)))  # (B, n_init * L * H)
        s = s.view(B, -1, self.num_layers, self.hidden_dim).permute(1, 2, 0, 3).contiguous()  # (n_init, L, B, H)
        return tuple(s.unbind(0)), (grid, self.attention.project_keys(grid))

    def step(self, words, state, memory):
        grid, keys = memory
        h_top = state[0][-1]  # (B, H)
        context, alpha = self.attention(keys, grid, h_top)  # (B, C), (B, N)
        context = torch.sigmoid(self.gate(h_top)) * context
        x = torch.cat([self.embed(words), context], dim=-1).unsqueeze(1)  # (B, 1, E + C)
        out, state = self.run_rnn(x, state)
        return self.out(self.dropout(out.squeeze(1))), state, alpha


def select_rows(state: State, memory: Memory, index: torch.Tensor | None) -> tuple[State, Memory]:
    """Rows `index` of a batch's state and memory: one image's encoding shared by several captions or beams."""
    if index is None:
        return state, memory
    return tuple(s.index_select(1, index) for s in state), tuple(m.index_select(0, index) for m in memory)


def build_decoder(cfg: ModelConfig, vocab_size: int, feature_dim: int) -> CaptionDecoder:
    cls = {"show_tell": ShowTellDecoder, "attention": AttentionDecoder}[cfg.decoder]
    return cls(cfg, vocab_size, feature_dim)


def load_word_vectors(embedding: nn.Embedding, path: str | Path, vocab: Vocabulary) -> int:
    """Copy vectors from a word2vec/GloVe text file into the rows of known words; returns how many were found."""
    dim = embedding.embedding_dim
    found = 0
    with open(path, encoding="utf8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if line_no == 1 and len(parts) == 2:  # word2vec header: "<count> <dim>"
                continue
            word, values = parts[0], parts[1:]
            if len(values) != dim:
                raise ValueError(f"{path}:{line_no}: vector has {len(values)} values but model.embed_dim is {dim}")
            idx = vocab.stoi.get(word)
            if idx is not None:
                with torch.no_grad():
                    embedding.weight[idx] = torch.tensor([float(v) for v in values])
                found += 1
    return found
