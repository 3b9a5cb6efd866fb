"""Caption search on the decoder's step function: greedy, sampling and beam search, batched across images.

Beam search keeps (B, K) beams as one batch of B*K rows of recurrent state, re-indexed with one index_select per step;
the beams of an image share its one row of memory, and no Python loop runs over images or beams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioning.models.decoder import CaptionDecoder, select_rows
from captioning.vocab import END_ID, PAD_ID, START_ID, UNK_ID


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    score: float  # sum of log-probabilities of the words and <end> (divided by length**alpha if normalised)
    attention: torch.Tensor | None  # (len(tokens), N) weights over the grid for each word; None without attention


def _log_probs(logits: torch.Tensor, finished: torch.Tensor, temperature: float = 1.0,
               tokens: torch.Tensor | None = None, no_repeat_ngram: int = 0) -> torch.Tensor:
    """logits (R, V) -> log-probabilities where <pad>/<start>/<unk> and, with `no_repeat_ngram` n > 0, the words that
    would repeat an n-gram of `tokens` (R, t) are never produced, and a finished row can only add <pad> at zero cost
    (so its score stays put). The words left keep the model's probabilities: nothing is renormalised.

    The bans are written over the fresh log_softmax output in place, touching only the banned entries: full passes
    over the (R, V) scores (a mask, a copy per ban) took 7% of batched beam search on a 2-core CPU (64 images,
    beam 5). Self-critical training takes gradients through log_softmax, whose backward needs its output intact, so
    there the bans go on a copy."""
    logits = logits.float()
    logp = (logits / temperature if temperature != 1.0 else logits).log_softmax(-1)
    if logp.requires_grad:
        logp = logp.clone()
    for never in (PAD_ID, START_ID, UNK_ID):
        logp.select(1, never).fill_(float("-inf"))
    if tokens is not None:
        ban_repeated_ngrams(logp, tokens, no_repeat_ngram)
    logp.masked_fill_(finished.unsqueeze(-1), float("-inf"))
    logp.select(1, PAD_ID).masked_fill_(finished, 0.0)
    return logp


def ban_repeated_ngrams(logp: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """Set logp (R, V) to -inf, in place, for the words that would repeat an n-gram of their row of tokens (R, t):
    appending the word makes an n-gram that already occurs in the row. Does nothing when no row is long enough (or
    n is 0). Touches R x t entries, not R x V, and needs no host sync: the n-grams that are no repeat write their -inf
    into <pad>'s column, which no search produces."""
    R, t = tokens.shape
    if n <= 0 or t < n:
        return
    grams = tokens.unfold(1, n, 1)  # (R, t-n+1, n)
    repeats = (grams[..., :-1] == tokens[:, t - n + 1:].unsqueeze(1)).all(-1)  # (R, t-n+1): prefix = last n-1 words
    logp.scatter_(1, torch.where(repeats, grams[..., -1], PAD_ID), float("-inf"))


def rollout(decoder: CaptionDecoder, grid: torch.Tensor, pooled: torch.Tensor, max_len: int = 20,
            temperature: float | None = None, samples: int = 1, no_repeat_ngram: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Greedy decoding (temperature None) or sampling at a temperature, `samples` captions per image, differentiable
    (self-critical training takes gradients through it) -> tokens (B*samples, T) ending in <end> then <pad>,
    log-probability of each token (B*samples, T; 0 after <end>), attention (B*samples, T, N) or None.
    Rows are image-major: row i*samples + j is image i's sample j. `no_repeat_ngram` n > 0 never repeats an n-gram
    within a caption.

    Rows that have ended stop being computed: once an eighth of the rows still computed have produced <end>, the
    state is cut to the running rows and their memory gathered again from the per-image memory. Samples average
    about half the length limit, and the longest of a batch's samples nearly always reaches it, so computing every
    row to the end was half the work of a self-critical step."""
    B = pooled.size(0)
    R, device = B * samples, pooled.device
    state, image_memory = decoder.init(grid, pooled)
    image_of_row = torch.arange(B, device=device).repeat_interleave(samples)  # (R,)
    state, memory = select_rows(state, image_memory, image_of_row if samples > 1 else None)
    rows = torch.arange(R, device=device)  # the rows computed: all of them until the first cut
    words = torch.full((R,), START_ID, dtype=torch.long, device=device)
    finished = torch.zeros(R, dtype=torch.bool, device=device)  # of the rows computed
    tokens, token_logp, alphas = [], [], []  # per step, over all R rows
    for _ in range(max_len):
        logits, state, alpha = decoder.step(words, state, memory)  # (n, V) for the n rows computed
        history = torch.stack(tokens, 1)[rows] if no_repeat_ngram and tokens else None
        logp = _log_probs(logits, finished, temperature or 1.0, history, no_repeat_ngram)
        with torch.no_grad():
            if temperature is None:
                words = logp.argmax(-1)
            else:
                # softmax renormalises over the words that may be produced: at a low temperature exp(logp) underflows
                # to zero everywhere when <pad> or <start> held the probability mass
                words = torch.multinomial(logp.softmax(-1), 1).squeeze(1)
        word_logp = logp.gather(1, words.unsqueeze(1)).squeeze(1)  # (n,)
        cut = rows.size(0) < R
        tokens.append(words.new_full((R,), PAD_ID).index_copy(0, rows, words) if cut else words)
        token_logp.append(word_logp.new_zeros(R).index_copy(0, rows, word_logp) if cut else word_logp)
        if alpha is not None:
            alphas.append(alpha.new_zeros(R, alpha.size(1)).index_copy(0, rows, alpha) if cut else alpha)
        finished = finished | (words == END_ID)
        n_finished = int(finished.sum())  # the step's one host sync
        if n_finished == rows.size(0):
            break
        if n_finished * 8 >= rows.size(0):
            keep = (~finished).nonzero().squeeze(1)
            rows, words, finished = rows[keep], words[keep], finished[keep]
            state = tuple(s.index_select(1, keep) for s in state)
            memory = tuple(m.index_select(0, image_of_row[rows]) for m in image_memory)
    alpha_seq = torch.stack(alphas, 1) if alphas else None
    return torch.stack(tokens, 1), torch.stack(token_logp, 1), alpha_seq


@torch.no_grad()
def sample_search(decoder: CaptionDecoder, grid: torch.Tensor, pooled: torch.Tensor, max_len: int = 20,
                  temperature: float | None = None, no_repeat_ngram: int = 3) -> list[Hypothesis]:
    """Greedy decoding (temperature None) or sampling at a temperature; one hypothesis per image."""
    tokens, token_logp, alphas = rollout(decoder, grid, pooled, max_len, temperature, no_repeat_ngram=no_repeat_ngram)
    return _hypotheses(tokens, token_logp.sum(1), alphas.float().cpu() if alphas is not None else None)


def check_beam_size(beam_size: int, vocab_size: int) -> None:
    """A ValueError when the beam is wider than the vocabulary: its first step keeps `beam_size` different words."""
    if beam_size > vocab_size:
        raise ValueError(f"a beam of {beam_size} is wider than the model's vocabulary of {vocab_size} words; use a "
                         f"beam of at most {vocab_size}")


@torch.no_grad()
def beam_search(decoder: CaptionDecoder, grid: torch.Tensor, pooled: torch.Tensor, beam_size: int = 3,
                max_len: int = 20, length_penalty: float = 0.0, n_best: int = 1, no_repeat_ngram: int = 3
                ) -> list[list[Hypothesis]]:
    """Batched beam search -> for each image its `n_best` hypotheses, best first.

    Final scores are divided by length**length_penalty (0 = plain log-probability, 1 = per-word average). With
    `no_repeat_ngram` n > 0 no caption repeats an n-gram ("a man in a red shirt and a red shirt" at n = 3).
    """
    B, K = pooled.size(0), beam_size
    if not 1 <= n_best <= K:
        raise ValueError(f"n_best must be between 1 and the beam size ({K}), got {n_best}")
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    device = pooled.device
    # The memory keeps one row per image, which the image's beams share; the state has one row per beam. Until the
    # first word every beam of an image is the same, so the first step runs one row per image and then branches.
    state, image_memory = decoder.init(grid, pooled)  # state (L, B, H)
    memory, images = image_memory, torch.arange(B, device=device)  # the b images still searched
    scores = torch.zeros(B, 1, device=device)  # (b, k): k beams per image, 1 before the first word, then K
    words = torch.full((B,), START_ID, dtype=torch.long, device=device)  # (b*k,)
    finished = torch.zeros(B, 1, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, 1, device=device)
    tokens = torch.zeros(B, 1, 0, dtype=torch.long, device=device)  # (b, k, t)
    alphas = None  # (b, k, t, N)
    # An image whose K beams have all ended leaves the batch (a trained model's captions end at different lengths);
    # its results wait here, padded to max_len words.
    done_scores, done_lengths = torch.zeros(B, K, device=device), torch.zeros(B, K, device=device)
    done_tokens = torch.full((B, K, max_len), PAD_ID, dtype=torch.long, device=device)
    done_alphas = None  # (B, K, max_len, N)
    for t in range(max_len):
        b, k = scores.shape
        logits, state, alpha = decoder.step(words, state, memory)  # (b*k, V)
        V = logits.size(-1)
        if t == 0:
            check_beam_size(K, V)
        logp = _log_probs(logits, finished.view(-1), 1.0, tokens.view(b * k, -1), no_repeat_ngram).view(b, k, V)
        scores, flat = logp.add_(scores.unsqueeze(-1)).view(b, k * V).topk(K, dim=-1)  # (b, K), in place: a fresh logp
        origin, words = flat // V, flat % V  # which beam each survivor extends, with which word
        beam_rows = origin + torch.arange(b, device=device).unsqueeze(1) * k
        state = tuple(s.index_select(1, beam_rows.view(-1)) for s in state)
        tokens = torch.cat([tokens.gather(1, origin.unsqueeze(-1).expand(-1, -1, tokens.size(-1))),
                            words.unsqueeze(-1)], -1)
        if alpha is not None:
            alpha = alpha.view(b, k, 1, -1).gather(1, origin.view(b, K, 1, 1).expand(-1, -1, 1, alpha.size(-1)))
            alphas = alpha if alphas is None else torch.cat(
                [alphas.gather(1, origin.view(b, K, 1, 1).expand(-1, -1, *alphas.shape[2:])), alpha], dim=2)
        was_finished = finished.gather(1, origin)
        lengths = lengths.gather(1, origin) + (~was_finished).float()
        finished = was_finished | (words == END_ID)
        words = words.view(-1)
        ended = finished.all(1)  # (b,)
        n_ended = int(ended.sum())  # the step's one host sync
        last = n_ended == b or t == max_len - 1
        if not last and n_ended * 8 < b:  # re-gathering the memory is worth it once an eighth have ended
            continue
        leave = slice(None) if last else ended.nonzero().squeeze(1)
        gone = images[leave]  # their places among the B images
        done_scores[gone], done_lengths[gone] = scores[leave], lengths[leave]
        done_tokens[gone, :, :t + 1] = tokens[leave]
        if alphas is not None:
            if done_alphas is None:
                done_alphas = alphas.new_zeros(B, K, max_len, alphas.size(-1))
            done_alphas[gone, :, :t + 1] = alphas[leave]
        if last:
            break
        keep = (~ended).nonzero().squeeze(1)
        images, scores, finished = images[keep], scores[keep], finished[keep]
        lengths, tokens = lengths[keep], tokens[keep]
        alphas = alphas[keep] if alphas is not None else None
        rows = (keep.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)  # the kept images' beams
        state, words = tuple(s.index_select(1, rows) for s in state), words[rows]
        memory = tuple(m.index_select(0, images) for m in image_memory)
    scores, lengths, tokens = done_scores, done_lengths, done_tokens[:, :, :t + 1]
    alphas = done_alphas[:, :, :t + 1] if done_alphas is not None else None
    if length_penalty:
        scores = scores / lengths.clamp(min=1) ** length_penalty
    order = scores.argsort(dim=1, descending=True)[:, :n_best]  # (B, n_best)
    best_tokens = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.size(-1)))
    best_alphas = None
    if alphas is not None:
        best_alphas = alphas.gather(1, order.view(B, n_best, 1, 1).expand(-1, -1, *alphas.shape[2:])).float().cpu()
    hyps = _hypotheses(best_tokens.flatten(0, 1), scores.gather(1, order).flatten(),
                       best_alphas.flatten(0, 1) if best_alphas is not None else None)
    return [hyps[i * n_best:(i + 1) * n_best] for i in range(B)]


def _hypotheses(tokens: torch.Tensor, scores: torch.Tensor, alphas: torch.Tensor | None) -> list[Hypothesis]:
    """(R, T) ids, (R,) scores, (R, T, N) attention -> Hypotheses cut at <end>; one device-to-host copy."""
    result = []
    for r, (ids, score) in enumerate(zip(tokens.tolist(), scores.tolist())):
        n = ids.index(END_ID) if END_ID in ids else len(ids)
        result.append(Hypothesis(ids[:n], score, alphas[r, :n] if alphas is not None else None))
    return result


def decode(decoder: CaptionDecoder, grid: torch.Tensor, pooled: torch.Tensor, beam_size: int = 1,
           max_len: int = 20, length_penalty: float = 0.0, n_best: int = 1,
           temperature: float | None = None, no_repeat_ngram: int = 3) -> list[list[Hypothesis]]:
    """One entry point: sampling when a temperature is given, else beam search (beam_size 1 = greedy)."""
    if temperature is not None or (beam_size == 1 and n_best == 1):
        return [[h] for h in sample_search(decoder, grid, pooled, max_len, temperature, no_repeat_ngram)]
    return beam_search(decoder, grid, pooled, beam_size, max_len, length_penalty, n_best, no_repeat_ngram)
