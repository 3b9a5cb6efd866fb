"""Recurrent caption decoders sharing one step function.

`init(grid, pooled)` turns encoder output into the recurrent state and a per-image memory; `hidden_step(embedded,
state, memory)` advances one embedded word and `step` adds the word embedding and the output layer. Training, greedy,
sampling and beam search all go through them; Show and Tell also has an equivalent whole-sequence fast path for
teacher forcing. State tensors are (layers, R, H) for R rows; memory tensors are (B, ...), one row per image, and
never change during decoding. R is a multiple of B, rows image-major: consecutive runs of R // B rows read one
image's memory (beam search's beams of an image), and R == B when every row has its own copy.
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

    def run_cell(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One time step, x (B, I) -> top output (B, H), new state. Uses the cell ops with nn.LSTM's weights: on CPU
        nn.LSTM's oneDNN path re-packs its weights on every call (~20 ms whatever the batch), which dominated
        step-by-step decoding."""
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
        return inp, new_state

    def init(self, grid: torch.Tensor, pooled: torch.Tensor) -> tuple[State, Memory]:
        raise NotImplementedError

    def hidden_step(self, embedded: torch.Tensor, state: State, memory: Memory
                    ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """embedded words (B, E) -> top hidden output (B, H), new state, attention weights (B, N) or None."""
        raise NotImplementedError

    def compile_step(self) -> None:
        """torch.compile the one-word step (attention and cell), which training and every search call in a Python
        loop. The batch dimension is compiled as dynamic: captions end at different lengths and the rows still
        running shrink step by step, so one graph serves them all."""
        self.hidden_step = torch.compile(self.hidden_step, dynamic=True)

    def step(self, words: torch.Tensor, state: State, memory: Memory
             ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """words (B,) -> logits (B, V), new state, attention weights (B, N) or None."""
        out, state, alpha = self.hidden_step(self.embed(words), state, memory)
        return self.out(self.dropout(out)), state, alpha

    def output_logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (R, T, H), targets (R, T) -> logits (R, T, V), computed only where the target is a word; padding
        positions stay zero (the loss ignores them), which spares the largest matrix product a third of its work."""
        valid = targets != PAD_ID  # (R, T)
        words = self.out(self.dropout(hidden[valid]))  # (n_valid, V)
        logits = words.new_zeros(*targets.shape, words.size(-1))
        logits[valid] = words
        return logits

    def forward(self, grid: torch.Tensor, pooled: torch.Tensor, captions: torch.Tensor,
                image_index: torch.Tensor | None = None, sample_prob: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: B images, captions (R, T) starting with <start>, image_index (R,) naming each caption's
        image (None: R == B, one each) -> logits (R, T-1, V) predicting captions[:, 1:], attention (R, T-1, N) or
        None; both are zero where the target is padding. With sample_prob > 0 (scheduled sampling) each input word
        is replaced by the model's own previous prediction with that probability.

        Captions run longest first and each step only advances the captions that still have words to predict, so
        padding costs nothing (Show, Attend and Tell's decode lengths)."""
        R, T = captions.size(0), captions.size(1) - 1
        if image_index is None:
            image_index = torch.arange(R, device=captions.device)
        lengths = (captions[:, 1:] != PAD_ID).sum(1)  # (R,) words to predict
        order = lengths.argsort(descending=True, stable=True)
        running = (lengths[order].unsqueeze(0) > torch.arange(T, device=captions.device).unsqueeze(1)).sum(1)
        state, memory = select_rows(*self.init(grid, pooled), image_index[order])
        sorted_captions = captions[order]
        # All input words embedded at once: a lookup per step made its own dense (V, E) gradient for the backward to
        # zero and add up, 7% of a training step on a 2-core CPU (vocabulary 5,000, 17 steps).
        inputs = self.embed(sorted_captions)  # (R, T+1, E)
        x = inputs[:, 0]
        outs, alphas = [], []
        for t, n in enumerate(running.tolist()):  # n: captions still running at step t (one host sync in all)
            if n == 0:
                break
            state, memory, x = tuple(s[:, :n] for s in state), tuple(m[:n] for m in memory), x[:n]
            out, state, alpha = self.hidden_step(x, state, memory)  # (n, H)
            outs.append(F.pad(out, (0, 0, 0, R - n)))
            alphas.append(None if alpha is None else F.pad(alpha, (0, 0, 0, R - n)))
            x = inputs[:n, t + 1]
            if sample_prob > 0:
                with torch.no_grad():
                    own = self.out(self.dropout(out)).argmax(-1)  # (n,)
                sampled = torch.rand_like(own, dtype=torch.float) < sample_prob
                x = torch.where(sampled.unsqueeze(-1), self.embed(own), x)
        hidden = F.pad(torch.stack(outs, 1), (0, 0, 0, T - len(outs)))  # (R, T, H)
        unsort = order.argsort()
        logits = self.output_logits(hidden, sorted_captions[:, 1:])[unsort]
        if alphas[0] is None:
            return logits, None
        return logits, F.pad(torch.stack(alphas, 1), (0, 0, 0, T - len(alphas)))[unsort]


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
        image = self.image_proj(pooled)  # (B, E)
        _, state = self.run_cell(image, self._zero_state(pooled.size(0), image))
        return state, ()

    def hidden_step(self, embedded, state, memory):
        out, state = self.run_cell(embedded, state)  # (B, H)
        return out, state, None

    def forward(self, grid, pooled, captions, image_index=None, sample_prob=0.0):
        if sample_prob > 0:
            return super().forward(grid, pooled, captions, image_index, sample_prob)
        # Whole sequences in one packed cuDNN call: [image, <start>, w1, ...] -> outputs from position 1 on.
        image = self.image_proj(pooled).unsqueeze(1)  # (B, 1, E)
        if image_index is not None:
            image = image[image_index]  # (R, 1, E)
        x = torch.cat([image, self.embed(captions[:, :-1])], dim=1)  # (R, T, E)
        lengths = (captions[:, 1:] != PAD_ID).sum(1) + 1  # the image, then the words that predict a word
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        state = self._zero_state(image.size(0), image)
        out, _ = self.rnn(packed, state if self.cell == "lstm" else state[0])
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))  # (R, T, H)
        return self.output_logits(out[:, 1:], captions[:, 1:]), None  # (R, T-1, V)


class AttentionDecoder(CaptionDecoder):
    """Xu et al. 2015 (soft attention): at each step the decoder attends over the grid with its top hidden state,
    gates the context with a learned scalar, and reads [word embedding; context]. The grid is first mapped into the
    word-embedding space (LayerNorm, linear, ReLU, dropout: backbones differ wildly in feature scale and width), which
    makes every step's attention and LSTM input several times cheaper than attending over the raw 1280-2048
    channels. h and c start from the mean of the mapped grid."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, feature_dim: int):
        super().__init__(cfg, vocab_size, input_dim=2 * cfg.embed_dim)
        self.project = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, cfg.embed_dim), nn.ReLU(),
                                     nn.Dropout(cfg.dropout))
        self.attention = AdditiveAttention(cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim)
        self.gate = nn.Linear(cfg.hidden_dim, 1)
        n_init = 2 if cfg.cell == "lstm" else 1
        self.init_state = nn.Linear(cfg.embed_dim, n_init * cfg.num_layers * cfg.hidden_dim)

    def init(self, grid, pooled):
        B = pooled.size(0)
        grid = self.project(grid)  # (B, N, E)
        s = torch.tanh(self.init_state(grid.mean(1)))  # (B, n_init * L * H)
        s = s.view(B, -1, self.num_layers, self.hidden_dim).permute(1, 2, 0, 3).contiguous()  # (n_init, L, B, H)
        return tuple(s.unbind(0)), (grid, self.attention.project_keys(grid))

    def hidden_step(self, embedded, state, memory):
        grid, keys = memory
        h_top = state[0][-1]  # (B, H)
        context, alpha = self.attention(keys, grid, h_top)  # (B, E), (B, N)
        context = torch.sigmoid(self.gate(h_top)) * context
        out, state = self.run_cell(torch.cat([embedded, context], dim=-1), state)  # (B, H)
        return out, state, alpha


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
    if not found:  # a file for another language, or with upper-case words: the vocabulary is lower case
        raise ValueError(f"model.word_vectors {path} holds none of the {len(vocab)} vocabulary words (which are lower "
                         "case); name a word-vector file of the captions' language, or set it to null")
    return found
