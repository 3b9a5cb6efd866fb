"""Greedy, sampling and batched beam search on the decoder step function."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from captioning.config import ModelConfig
from captioning.decoding import ban_repeated_ngrams, beam_search, decode, rollout, sample_search
from captioning.models.decoder import build_decoder
from captioning.vocab import END_ID, PAD_ID, START_ID, UNK_ID

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB_SIZE, FEATURES, N = 15, 24, 6


def _decoder(kind: str, seed: int = 0) -> nn.Module:
    """A random decoder whose <end> is likely enough that hypotheses finish at different lengths."""
    torch.manual_seed(seed)
    cfg = ModelConfig(decoder=kind, embed_dim=16, hidden_dim=32, attention_dim=16, dropout=0.0)
    decoder = build_decoder(cfg, VOCAB_SIZE, FEATURES).eval()
    with torch.no_grad():
        decoder.out.weight.mul_(8.0)  # peaked, image-dependent word distributions
        decoder.out.bias[END_ID] += 0.2 if kind == "attention" else 0.6  # chosen so that lengths differ
    return decoder


def _inputs(batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.randn(batch, N, FEATURES, generator=torch.Generator().manual_seed(seed))  # (B, N, C)
    return grid, grid.mean(1)


def _teacher_forced(decoder, grid, pooled, tokens: list[int], ended: bool) -> tuple[float, torch.Tensor | None]:
    """Log-probability of `tokens` (+ <end> if it ended) for one image by stepping, and its attention (T, N)."""
    state, memory = decoder.init(grid, pooled)
    words = torch.tensor([START_ID])
    total, alphas = 0.0, []
    for w in [*tokens, END_ID] if ended else tokens:
        logits, state, alpha = decoder.step(words, state, memory)
        total += logits.log_softmax(-1)[0, w].item()  # the model's probability (<pad>/<start> only excluded)
        alphas.append(alpha)
        words = torch.tensor([w])
    if not alphas or alphas[0] is None:
        return total, None
    return total, torch.cat(alphas)[: len(tokens)]


class MarkovDecoder(nn.Module):
    """A scripted decoder: the next word's log-probabilities depend only on the previous word (table row)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (V, V) log-probabilities

    def init(self, grid, pooled):
        return (pooled.new_zeros(1, pooled.size(0), 1),), ()  # a dummy (layers, B, H) state

    def step(self, words, state, memory):
        return self.table[words], state, None


def _markov(rows: dict[int, dict[int, float]], vocab_size: int = 6) -> MarkovDecoder:
    table = torch.full((vocab_size, vocab_size), -50.0)
    for prev, nxt in rows.items():
        for word, p in nxt.items():
            table[prev, word] = math.log(p)
    return MarkovDecoder(table.log_softmax(-1))


# ----------------------------------------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_beam_size_one_equals_greedy(kind):
    decoder = _decoder(kind)
    grid, pooled = _inputs(batch=5)
    greedy = sample_search(decoder, grid, pooled, max_len=12)
    beam = beam_search(decoder, grid, pooled, beam_size=1, max_len=12)
    assert len({len(h.tokens) for h in greedy}) > 1  # the batch mixes lengths
    for g, (b,) in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.score == pytest.approx(b.score, abs=1e-5)
        if kind == "attention":
            torch.testing.assert_close(g.attention, b.attention)
    via_decode = decode(decoder, grid, pooled, beam_size=1, max_len=12)
    assert [h.tokens for (h,) in via_decode] == [g.tokens for g in greedy]


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_greedy_scores_are_the_log_probability_of_the_caption(kind):
    decoder = _decoder(kind)
    grid, pooled = _inputs(batch=3)
    for i, h in enumerate(sample_search(decoder, grid, pooled, max_len=12, no_repeat_ngram=0)):
        assert not {PAD_ID, START_ID, UNK_ID, END_ID} & set(h.tokens)
        score, _ = _teacher_forced(decoder, grid[i:i + 1], pooled[i:i + 1], h.tokens, ended=len(h.tokens) < 12)
        assert h.score == pytest.approx(score, abs=1e-4)
        # Greedy: at each step the chosen word is the argmax.
        state, memory = decoder.init(grid[i:i + 1], pooled[i:i + 1])
        words = torch.tensor([START_ID])
        for w in h.tokens:
            logits, state, _ = decoder.step(words, state, memory)
            logits[:, [PAD_ID, START_ID, UNK_ID]] = float("-inf")
            assert logits.argmax(-1).item() == w
            words = torch.tensor([w])


# ------------------------------------------------------------------------------------------------------ beam search

@pytest.mark.parametrize("beam_size", [3, 5])
@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_batched_beam_search_equals_one_image_at_a_time(kind, beam_size):
    decoder = _decoder(kind)
    grid, pooled = _inputs(batch=4)
    batched = beam_search(decoder, grid, pooled, beam_size=beam_size, max_len=12, n_best=beam_size)
    assert len(batched) == 4
    for i in range(4):
        (alone,) = beam_search(decoder, grid[i:i + 1], pooled[i:i + 1], beam_size=beam_size, max_len=12,
                               n_best=beam_size)
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        for b, a in zip(batched[i], alone):
            assert b.score == pytest.approx(a.score, abs=1e-5)
            if kind == "attention":
                torch.testing.assert_close(b.attention, a.attention, rtol=1e-5, atol=1e-5)


def test_beam_search_steps_one_row_per_image_first_and_drops_images_whose_beams_all_ended():
    """The first step runs one row per image, then K per image; an image leaves the batch once all its beams have
    ended, and every image's hypotheses are still those of the image searched alone."""
    decoder, K = _decoder("attention"), 3
    grid, pooled = _inputs(batch=8, seed=2)  # images leave after steps 5, 6 and 11
    rows_stepped = []
    step = decoder.step

    def counting_step(words, state, memory):
        rows_stepped.append(words.size(0))
        assert memory[0].size(0) * K == words.size(0) or len(rows_stepped) == 1  # K beams read one image's memory
        return step(words, state, memory)

    decoder.step = counting_step
    batched = beam_search(decoder, grid, pooled, beam_size=K, max_len=12, n_best=K)
    decoder.step = step
    assert rows_stepped[:2] == [8, 8 * K] and len(set(rows_stepped[1:])) >= 3  # two or more departures
    assert all(n % K == 0 for n in rows_stepped[1:]) and rows_stepped[1:] == sorted(rows_stepped[1:], reverse=True)
    for i in range(8):
        (alone,) = beam_search(decoder, grid[i:i + 1], pooled[i:i + 1], beam_size=K, max_len=12, n_best=K)
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        for b, a in zip(batched[i], alone):
            assert b.score == pytest.approx(a.score, abs=1e-5)
            torch.testing.assert_close(b.attention, a.attention, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_beam_hypotheses_carry_their_own_scores_and_attention(kind):
    """Re-scoring each returned hypothesis word by word gives its score and attention: beams were re-indexed right."""
    decoder = _decoder(kind)
    grid, pooled = _inputs(batch=3)
    results = beam_search(decoder, grid, pooled, beam_size=4, max_len=10, n_best=4)
    for i, hyps in enumerate(results):
        assert len({tuple(h.tokens) for h in hyps}) == 4  # distinct hypotheses
        for h in hyps:
            score, attention = _teacher_forced(decoder, grid[i:i + 1], pooled[i:i + 1], h.tokens,
                                               ended=len(h.tokens) < 10)
            assert h.score == pytest.approx(score, abs=1e-4)
            if kind == "attention":
                torch.testing.assert_close(h.attention, attention, rtol=1e-4, atol=1e-5)
            else:
                assert h.attention is None


def test_beam_search_finds_a_better_caption_than_greedy():
    decoder = _decoder("attention")
    grid, pooled = _inputs(batch=8)
    greedy = sample_search(decoder, grid, pooled, max_len=12)
    beam = beam_search(decoder, grid, pooled, beam_size=5, max_len=12)
    for g, (b,) in zip(greedy, beam):
        assert b.score >= g.score - 1e-5  # the greedy caption is always among the candidates a beam can keep
    assert any(b.score > g.score + 1e-3 for g, (b,) in zip(greedy, beam))


def test_n_best_is_sorted_and_bounded_by_the_beam():
    decoder = _decoder("attention")
    grid, pooled = _inputs(batch=3)
    for hyps in beam_search(decoder, grid, pooled, beam_size=5, max_len=12, n_best=3):
        assert len(hyps) == 3
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
    for hyps in beam_search(decoder, grid, pooled, beam_size=5, max_len=12, n_best=1, length_penalty=1.0):
        assert len(hyps) == 1
    with pytest.raises(ValueError, match="n_best"):
        beam_search(decoder, grid, pooled, beam_size=3, n_best=4)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_searches_build_no_autograd_graph(beam_size):
    decoder = _decoder("attention")
    grid, pooled = _inputs(batch=2)
    for hyps in decode(decoder, grid, pooled, beam_size=beam_size, max_len=6):
        assert not hyps[0].attention.requires_grad
        assert hyps[0].attention.numpy().shape[0] == len(hyps[0].tokens)


def test_a_beam_as_wide_as_the_vocabulary_runs_and_a_wider_one_is_refused():
    decoder = _decoder("attention")
    grid, pooled = _inputs(batch=2)
    for hyps in beam_search(decoder, grid, pooled, beam_size=VOCAB_SIZE, max_len=6, n_best=VOCAB_SIZE):
        assert len(hyps) == VOCAB_SIZE
    with pytest.raises(ValueError, match=f"a beam of {VOCAB_SIZE + 1} is wider than the model's vocabulary of "
                                         f"{VOCAB_SIZE} words"):
        beam_search(decoder, grid, pooled, beam_size=VOCAB_SIZE + 1)


def test_length_penalty_divides_by_length_to_the_alpha():
    decoder = _decoder("show_tell")
    grid, pooled = _inputs(batch=3)
    max_len, alpha = 10, 0.7
    raw = beam_search(decoder, grid, pooled, beam_size=4, max_len=max_len, n_best=4)
    normalised = beam_search(decoder, grid, pooled, beam_size=4, max_len=max_len, n_best=4, length_penalty=alpha)
    for raw_hyps, norm_hyps in zip(raw, normalised):
        raw_score = {tuple(h.tokens): h.score for h in raw_hyps}
        assert set(raw_score) == {tuple(h.tokens) for h in norm_hyps}  # the penalty only re-ranks the final beams
        for h in norm_hyps:
            length = len(h.tokens) + 1 if len(h.tokens) < max_len else max_len  # <end> counts as a word
            assert h.score == pytest.approx(raw_score[tuple(h.tokens)] / length ** alpha, abs=1e-5)
        scores = [h.score for h in norm_hyps]
        assert scores == sorted(scores, reverse=True)


def test_length_penalty_changes_the_ranking():
    # After <start>: "<end>" (p=.5) or "a" (p=.5); after "a": <end> (p=.95).
    # Raw: "" = log .5 = -0.69 beats "a" = log .5 + log .95 = -0.74. Per word: "a" = -0.37 beats "" = -0.69.
    a = 4
    decoder = _markov({START_ID: {END_ID: 0.5, a: 0.5}, a: {END_ID: 0.95, 5: 0.05}, 5: {END_ID: 1.0}})
    grid, pooled = torch.zeros(1, 1, 1), torch.zeros(1, 1)
    (plain,) = beam_search(decoder, grid, pooled, beam_size=2, max_len=5, n_best=2)
    (per_word,) = beam_search(decoder, grid, pooled, beam_size=2, max_len=5, n_best=2, length_penalty=1.0)
    assert plain[0].tokens == [] and plain[1].tokens == [a]
    assert plain[0].score == pytest.approx(math.log(0.5), abs=1e-6)
    assert plain[1].score == pytest.approx(math.log(0.5) + math.log(0.95), abs=1e-6)
    assert per_word[0].tokens == [a] and per_word[1].tokens == []
    assert per_word[0].score == pytest.approx((math.log(0.5) + math.log(0.95)) / 2, abs=1e-6)


def test_finished_beams_keep_their_score():
    # "b" ends at once with high probability; "a" keeps going forever with low per-word cost.
    a, b = 4, 5
    decoder = _markov({START_ID: {a: 0.4, b: 0.6}, a: {a: 0.9, END_ID: 0.1}, b: {END_ID: 1.0}})
    grid, pooled = torch.zeros(1, 1, 1), torch.zeros(1, 1)
    (hyps,) = beam_search(decoder, grid, pooled, beam_size=2, max_len=6, n_best=2)
    assert hyps[0].tokens == [b]
    assert hyps[0].score == pytest.approx(math.log(0.6), abs=1e-6)
    assert hyps[1].tokens[0] == a


# -------------------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("beam_size", [1, 3])
def test_attention_per_word_sums_to_one(beam_size):
    decoder = _decoder("attention")
    grid, pooled = _inputs(batch=3)
    for hyps in decode(decoder, grid, pooled, beam_size=beam_size, max_len=12, n_best=beam_size):
        for h in hyps:
            assert h.attention.shape == (len(h.tokens), N)
            torch.testing.assert_close(h.attention.sum(-1), torch.ones(len(h.tokens)))
            assert (h.attention >= 0).all()


# --------------------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_sampling_is_reproducible_with_a_seed(kind):
    decoder = _decoder(kind)
    grid, pooled = _inputs(batch=6)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append([h.tokens for (h,) in decode(decoder, grid, pooled, max_len=12, temperature=1.5)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_low_temperature_sampling_approaches_greedy():
    decoder = _decoder("attention")
    grid, pooled = _inputs(batch=6)
    greedy = [h.tokens for h in sample_search(decoder, grid, pooled, max_len=12)]
    torch.manual_seed(0)
    cold = [h.tokens for h in sample_search(decoder, grid, pooled, max_len=12, temperature=1e-4)]
    assert cold == greedy
    torch.manual_seed(0)
    hot = [h.tokens for h in sample_search(decoder, grid, pooled, max_len=12, temperature=5.0)]
    assert hot != greedy


def test_sampled_scores_are_the_tempered_log_probability():
    decoder = _decoder("show_tell")
    grid, pooled = _inputs(batch=1)
    torch.manual_seed(3)
    (h,) = sample_search(decoder, grid, pooled, max_len=12, temperature=1.0)
    score, _ = _teacher_forced(decoder, grid, pooled, h.tokens, ended=len(h.tokens) < 12)
    assert h.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_rollout_samples_per_image_with_differentiable_word_log_probabilities(kind):
    """Self-critical training's rollout: K samples per image, rows image-major, each token's log-probability that
    of the model (0 after <end>, where the row is <pad>), and gradients reach the decoder's weights."""
    decoder = _decoder(kind)
    grid, pooled = _inputs(batch=3)
    K = 4
    torch.manual_seed(0)
    tokens, token_logp, _ = rollout(decoder, grid, pooled, max_len=12, temperature=1.0, samples=K)
    assert tokens.shape == token_logp.shape and tokens.size(0) == 3 * K
    assert len({tuple(row) for row in tokens.tolist()}) > 3  # samples differ, within and across images
    for r, ids in enumerate(tokens.tolist()):
        ended = END_ID in ids
        n = ids.index(END_ID) if ended else len(ids)
        assert all(w == PAD_ID for w in ids[n + 1:]) and (token_logp[r, n + 1:] == 0).all()
        i = r // K
        expected, _ = _teacher_forced(decoder, grid[i:i + 1], pooled[i:i + 1], ids[:n], ended)
        assert token_logp[r].sum().item() == pytest.approx(expected, abs=1e-4)
    token_logp.sum().backward()
    assert decoder.out.weight.grad.abs().sum() > 0 and decoder.embed.weight.grad.abs().sum() > 0


def test_rollout_stops_computing_rows_that_ended():
    """Rows that produced <end> leave the batch the decoder steps over; every row's caption and log-probabilities
    are still those of its image decoded alone."""
    decoder = _decoder("attention")
    grid, pooled = _inputs(batch=6)
    rows_stepped = []
    step = decoder.step

    def counting_step(words, state, memory):
        rows_stepped.append(words.size(0))
        return step(words, state, memory)

    decoder.step = counting_step
    tokens, token_logp, _ = rollout(decoder, grid, pooled, max_len=12)
    assert rows_stepped[0] == 6 and rows_stepped[-1] < 6
    for i in range(6):
        alone, alone_logp, _ = rollout(decoder, grid[i:i + 1], pooled[i:i + 1], max_len=12)
        n = alone.size(1)
        assert tokens[i, :n].tolist() == alone[0].tolist() and (tokens[i, n:] == PAD_ID).all()
        torch.testing.assert_close(token_logp[i, :n], alone_logp[0])
        assert (token_logp[i, n:] == 0).all()


# ------------------------------------------------------------------------------------------- repeats and <unk>

def _has_repeat(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_repeated_ngrams_bans_the_word_that_would_repeat():
    tokens = torch.tensor([[5, 6, 7, 5, 6], [5, 6, 7, 8, 9]])

    def banned(n: int, t: int = 5) -> list[list[int]]:
        logp = torch.zeros(2, 10)
        ban_repeated_ngrams(logp, tokens[:, :t], n)
        assert ((logp == 0) | (logp == float("-inf"))).all()  # only bans are written
        return [[w for w in row.isinf().nonzero().flatten().tolist() if w != PAD_ID] for row in logp]

    assert banned(3) == [[7], []]  # "5 6" was followed by 7
    assert banned(2) == [[7], []]  # "6" was followed by 7
    assert banned(4) == [[], []]
    assert banned(1) == [[5, 6, 7], [5, 6, 7, 8, 9]]
    assert banned(3, t=2) == [[], []] and banned(0) == [[], []]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("beam_size", [1, 4])
def test_no_caption_repeats_an_ngram(n, beam_size):
    decoder = _decoder("attention", seed=3)
    with torch.no_grad():
        decoder.out.bias[END_ID] -= 4.0  # long captions over 15 words: repeats are likely
    grid, pooled = _inputs(batch=8)
    free = decode(decoder, grid, pooled, beam_size=beam_size, max_len=16, no_repeat_ngram=0)
    assert any(_has_repeat(h.tokens, n) for (h, *_) in free)  # without the ban, this decoder repeats itself
    banned = decode(decoder, grid, pooled, beam_size=beam_size, max_len=16, n_best=beam_size, no_repeat_ngram=n)
    for i, hyps in enumerate(banned):
        for h in hyps:
            assert not _has_repeat(h.tokens, n)
            score, _ = _teacher_forced(decoder, grid[i:i + 1], pooled[i:i + 1], h.tokens, ended=len(h.tokens) < 16)
            assert h.score == pytest.approx(score, abs=1e-4)  # the model's own probability of the caption


def test_the_ban_keeps_the_model_probabilities_of_the_other_words():
    a, b, c = 4, 5, 6
    # Loves "a b a b ...": with bigram repeats banned, "a b a" cannot go on with b and takes its second choice, c.
    loops = _markov({START_ID: {a: 0.9, c: 0.1}, a: {b: 0.9, c: 0.1}, b: {a: 0.7, c: 0.2, END_ID: 0.1},
                     c: {END_ID: 0.9, a: 0.1}}, vocab_size=7)
    grid, pooled = torch.zeros(1, 1, 1), torch.zeros(1)
    (h,) = sample_search(loops, grid, pooled, max_len=10, no_repeat_ngram=2)
    assert h.tokens == [a, b, a, c]
    assert h.score == pytest.approx(math.log(0.9 * 0.9 * 0.7 * 0.1 * 0.9), abs=1e-4)  # not renormalised
    assert sample_search(loops, grid, pooled, max_len=6, no_repeat_ngram=0)[0].tokens == [a, b] * 3
    ((best,),) = beam_search(loops, grid, pooled, beam_size=3, max_len=10, no_repeat_ngram=2)
    assert not _has_repeat(best.tokens, 2)


def test_unk_is_never_produced():
    decoder = _decoder("attention")
    with torch.no_grad():
        decoder.out.bias[UNK_ID] += 50.0  # the model's favourite word
    grid, pooled = _inputs(batch=3)
    for mode in [{}, {"beam_size": 3, "n_best": 3}, {"temperature": 1.0}]:
        for hyps in decode(decoder, grid, pooled, max_len=8, **mode):
            assert all(UNK_ID not in h.tokens for h in hyps)


# ---------------------------------------------------------------------------------------------------------- max_len

@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_max_len_is_respected(mode):
    a, b = 4, 5
    never_ends = _markov({START_ID: {a: 0.5, b: 0.5}, a: {a: 0.5, b: 0.5}, b: {a: 0.5, b: 0.5}})
    grid, pooled = torch.zeros(2, 1, 1), torch.zeros(2, 1)
    kwargs = {"greedy": {}, "sample": {"temperature": 1.0}, "beam": {"beam_size": 3, "n_best": 3}}[mode]
    torch.manual_seed(0)
    for hyps in decode(never_ends, grid, pooled, max_len=7, no_repeat_ngram=0, **kwargs):
        for h in hyps:
            assert len(h.tokens) == 7
    decoder = _decoder("attention")
    grid, pooled = _inputs(batch=4)
    for hyps in decode(decoder, grid, pooled, max_len=3, **kwargs):
        for h in hyps:
            assert len(h.tokens) <= 3
            assert h.attention.shape[0] == len(h.tokens)
