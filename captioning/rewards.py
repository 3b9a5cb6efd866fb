"""CIDEr-D (plus, optionally, sentence BLEU-4) as a per-caption reward for self-critical training, with document
frequencies from the training corpus.

pycocoevalcap's CiderScorer takes its n-gram document frequencies from the captions it is asked to score, which for
a reward means one training batch: the idf weights would change from batch to batch. Here they come from every
training image's references, computed once, together with each image's reference vectors; a reward call only
builds the hypothesis vectors. The formula is the toolkit's CIDEr-D: tf-idf n-gram vectors (n = 1..4), clipped
cosine similarity, a Gaussian penalty on the length difference (sigma 6, lengths counted as the toolkit counts
them), averaged over n-gram orders and references, times 10. Scored on the set it was built from, it gives
pycocoevalcap's per-image numbers. Sentence BLEU is the toolkit's per-caption BLEU, from precomputed clipping counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from captioning.metrics import bleu_scores, bleu_statistics, clip_counts, ngram_counts
from captioning.vocab import Vocabulary

Vector = tuple[list[dict[tuple[str, ...], float]], list[float], int]  # per-order tf-idf, per-order norm, length


class CiderD:
    def __init__(self, references: Sequence[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0):
        """references[i]: image i's tokenized reference captions (lists of words)."""
        self.n, self.sigma = n, sigma
        counts = [[ngram_counts(ref, n) for ref in refs] for refs in references]
        self.document_frequency: Counter[tuple[str, ...]] = Counter()
        for refs in counts:
            self.document_frequency.update({gram for ref in refs for gram in ref})
        self.log_images = math.log(float(len(references)))
        self.references = [[self._vector(ref) for ref in refs] for refs in counts]

    def _vector(self, counts: Counter[tuple[str, ...]]) -> Vector:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = tf * (self.log_images - math.log(max(1.0, self.document_frequency[gram])))
            vec[k][gram] = weight
            norm[k] += weight * weight
            if k == 1:  # the toolkit counts a caption's length in bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def __call__(self, image: int, hypothesis: Sequence[str]) -> float:
        """CIDEr-D of one tokenized hypothesis against training image `image`'s references."""
        vec, norm, length = self._vector(ngram_counts(hypothesis, self.n))
        refs = self.references[image]
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                if norm[k] == 0 or ref_norm[k] == 0:
                    continue
                ref_k = ref_vec[k]
                dot = sum(min(w, ref_k.get(gram, 0.0)) * ref_k.get(gram, 0.0) for gram, w in vec[k].items())
                total += dot / (norm[k] * ref_norm[k]) * penalty
        return 10.0 * total / self.n / len(refs)


class SentenceBleu:
    def __init__(self, references: Sequence[Sequence[Sequence[str]]], n: int = 4):
        """references[i]: image i's tokenized reference captions (lists of words)."""
        self.n = n
        self.references = [(clip_counts(refs, n), [len(ref) for ref in refs]) for refs in references]

    def __call__(self, image: int, hypothesis: Sequence[str]) -> float:
        """BLEU-n of one tokenized hypothesis against training image `image`'s references, as pycocoevalcap's
        BleuScorer scores one sentence."""
        clip, ref_lengths = self.references[image]
        return bleu_scores(*bleu_statistics(clip, ref_lengths, hypothesis, self.n))[-1]


class SampleRewards:
    """Sampled captions (word ids) of a batch of training images -> their rewards: CIDEr-D + bleu_weight x BLEU-4."""

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], vocab: Vocabulary, bleu_weight: float = 0.0):
        self.cider, self.vocab, self.bleu_weight = CiderD(references), vocab, bleu_weight
        self.bleu = SentenceBleu(references) if bleu_weight else None

    def _reward(self, image: int, words: list[str]) -> float:
        reward = self.cider(image, words)
        if self.bleu is not None:
            reward += self.bleu_weight * self.bleu(image, words)
        return reward

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images (B,) dataset indices, tokens (B*K, T) with image i's K samples in rows i*K..i*K+K-1 -> (B, K)."""
        K = tokens.size(0) // images.size(0)
        rows = tokens.tolist()  # one device-to-host copy
        rewards = [self._reward(image, self.vocab.decode(rows[b * K + k]))
                   for b, image in enumerate(images.tolist()) for k in range(K)]
        return torch.tensor(rewards, device=tokens.device).view(-1, K)
