"""Caption metrics with the COCO caption toolkit's numbers: BLEU of our own and a bridge to pycocoevalcap."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import threading
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

from captioning.vocab import tokenize

K = TypeVar("K", bound=Hashable)

# pycocoevalcap's BleuScorer adds these to n-gram counts and lengths: a zero count gives a score of ~0, not an error.
_TINY, _SMALL = 1e-15, 1e-9


def _check_keys(refs: Mapping[K, Any], hyps: Mapping[K, Any]) -> None:
    """Raise ValueError naming the first key that has a hypothesis but no references, or the other way round."""
    for key in hyps:
        if key not in refs or not refs[key]:
            raise ValueError(f"image {key!r} has a hypothesis but no reference captions; give each image at least one")
    for key in refs:
        if key not in hyps:
            raise ValueError(f"image {key!r} has reference captions but no hypothesis; give each image exactly one "
                             "(an empty string is allowed and scores 0)")


def ngram_counts(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of all 1..n-grams of `words`."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def clip_counts(refs: Sequence[Sequence[str]], n: int) -> Counter[tuple[str, ...]]:
    """The most times each 1..n-gram occurs in any one of `refs`: a hypothesis's matches are clipped to it."""
    clip: Counter[tuple[str, ...]] = Counter()
    for ref in refs:
        clip |= ngram_counts(ref, n)
    return clip


def bleu_statistics(clip: Counter[tuple[str, ...]], ref_lengths: Sequence[int], hyp: Sequence[str],
                    n: int) -> tuple[list[int], list[int], int, int]:
    """One hypothesis -> its clipped 1..n-gram matches, its 1..n-gram counts, its length, and the reference length
    closest to it (ties: the shorter), as pycocoevalcap's BleuScorer with option="closest" counts them."""
    correct = [0] * n
    for gram, count in ngram_counts(hyp, n).items():
        correct[len(gram) - 1] += min(count, clip[gram])
    guessed = [max(0, len(hyp) - k) for k in range(n)]
    ref_length = min((abs(length - len(hyp)), length) for length in ref_lengths)[1]
    return correct, guessed, len(hyp), ref_length


def bleu_scores(correct: Sequence[int], guessed: Sequence[int], hyp_length: int, ref_length: int) -> list[float]:
    """BLEU-1..n from summed statistics; the toolkit's 1e-15 / 1e-9 smoothing keeps empty counts at ~0."""
    scores, product = [], 1.0
    for k in range(len(correct)):
        product *= (correct[k] + _TINY) / (guessed[k] + _SMALL)
        scores.append(product ** (1 / (k + 1)))  # geometric mean of the 1..k+1-gram precisions
    ratio = (hyp_length + _TINY) / (ref_length + _SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [score * penalty for score in scores]


def bleu(refs: Mapping[K, list[list[str]]], hyps: Mapping[K, list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n exactly as the COCO caption toolkit computes it, on already tokenized words.

    As pycocoevalcap's BleuScorer with option="closest": the statistics of `bleu_statistics` are summed over the
    corpus, and one brevity penalty is taken from the corpus totals.
    """
    _check_keys(refs, hyps)
    correct, guessed = [0] * n, [0] * n
    hyp_total = ref_total = 0
    for key, hyp in hyps.items():
        c, g, hyp_length, ref_length = bleu_statistics(clip_counts(refs[key], n), [len(r) for r in refs[key]], hyp, n)
        correct = [a + b for a, b in zip(correct, c)]
        guessed = [a + b for a, b in zip(guessed, g)]
        hyp_total += hyp_length
        ref_total += ref_length
    return bleu_scores(correct, guessed, hyp_total, ref_total)


def _close_meteor(scorer: Any) -> None:
    """Stop the java process a pycocoevalcap Meteor scorer runs. Not with its close() (which older versions lack)
    nor under its lock: a compute_score stopped by Ctrl-C still holds the lock, and waiting for it would hang."""
    process = scorer.meteor_p
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()
    process.kill()
    process.wait()
    scorer.lock = threading.Lock()  # free for the scorer's __del__, which takes it to stop the process again


def score_captions(refs: Mapping[K, list[str]], hyps: Mapping[K, str], meteor: bool = True) -> dict[str, Any]:
    """Raw reference captions and one raw hypothesis per image -> COCO caption metrics.

    Returns {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} as floats, named as pycocoevalcap names them.
    Captions are tokenized with `captioning.vocab.tokenize`, which gives pycocoevalcap's PTBTokenizer tokens without
    Java. BLEU comes from `bleu`; ROUGE_L and CIDEr from pycocoevalcap; METEOR from its Meteor, which runs Java.
    A metric that cannot be computed (meteor=False, no `java` on PATH, pycocoevalcap not installed) is left out and
    result["notes"] (a list of str) says why and how to get it; "notes" is absent when every metric is there.
    """
    if not hyps:
        raise ValueError("no captions to score: hyps is empty")
    _check_keys(refs, hyps)
    for key, hyp in hyps.items():
        if not isinstance(hyp, str):
            raise TypeError(f"the hypothesis of image {key!r} must be one string, got {type(hyp).__name__}")
        if isinstance(refs[key], str):
            raise TypeError(f"the references of image {key!r} must be a list of strings, got one string")
    # pycocoevalcap's scorers take space-joined tokens; BleuScorer splits them again with str.split().
    ref_text = {key: [" ".join(tokenize(caption)) for caption in refs[key]] for key in hyps}
    hyp_text = {key: [" ".join(tokenize(hyp))] for key, hyp in hyps.items()}
    bleu_scores = bleu({key: [r.split() for r in ref_text[key]] for key in hyps},
                       {key: hyp_text[key][0].split() for key in hyps})
    result: dict[str, Any] = {f"Bleu_{k + 1}": score for k, score in enumerate(bleu_scores)}
    notes: list[str] = []
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        notes.append("METEOR, ROUGE_L and CIDEr need the COCO caption toolkit: pip install pycocoevalcap")
        return {**result, "notes": notes}

    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints progress
        if not meteor:
            notes.append("METEOR not computed (skipped in training's validation and by evaluate.py --no-meteor)")
        elif shutil.which("java") is None:
            notes.append("METEOR needs Java, which is not on PATH: install a Java runtime "
                         "(e.g. apt-get install default-jre-headless) and run again")
        else:
            scorer = Meteor()
            try:
                result["METEOR"] = float(scorer.compute_score(ref_text, hyp_text)[0])
            finally:
                _close_meteor(scorer)
        result["ROUGE_L"] = float(Rouge().compute_score(ref_text, hyp_text)[0])
        result["CIDEr"] = float(Cider().compute_score(ref_text, hyp_text)[0])
    return {**result, "notes": notes} if notes else result
