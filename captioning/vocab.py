"""Caption tokenization and the word vocabulary (stored as JSON, never pickled)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from nltk.tokenize import TreebankWordTokenizer

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

# Tokens the COCO caption toolkit's PTBTokenizer drops after tokenizing (pycocoevalcap/tokenizer/ptbtokenizer.py).
# Its list has the bracket names in upper case while its output is lower case, so "-lrb-" and friends are kept.
_PUNCTUATION = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Stanford keeps the period of these abbreviations; nltk's Treebank tokenizer splits only a sentence-final period.
_ABBREVIATIONS = frozenset(["mr", "mrs", "ms", "dr", "jr", "sr", "st", "mt", "vs", "etc", "inc", "co", "ltd", "ave",
                            "prof", "gen", "capt", "sgt", "lt", "col", "rev", "no"])
_TREEBANK = TreebankWordTokenizer()
_WHITESPACE = re.compile(r"\s+")
_WORD_PERIOD = re.compile(r"(?<!\S)([\w.]*\w)\.+(?=\s|$)")
_LEADING_HYPHEN = re.compile(r"(?<!\S)-+(?=\w)")


def _split_period(m: re.Match) -> str:
    """'word.' -> 'word .', but abbreviations, single letters and acronyms ('mr.', 'u.', 'd.c.') keep the period."""
    word = m[1]
    return m[0] if word in _ABBREVIATIONS or len(word) == 1 or "." in word else f"{word} ."


def tokenize(text: str) -> list[str]:
    """Lowercase and split a caption the way the COCO caption toolkit does, punctuation removed.

    nltk's Treebank tokenizer is pure regular expressions, so no nltk data download is needed.
    """
    text = _WHITESPACE.sub(" ", text.lower()).strip()
    text = _WORD_PERIOD.sub(_split_period, text)
    text = _LEADING_HYPHEN.sub("- ", text)
    tokens = (_BRACKETS.get(tok, tok) for tok in _TREEBANK.tokenize(text))
    return [tok for tok in tokens if tok not in _PUNCTUATION]


class Vocabulary:
    """Word <-> id mapping with the special tokens <pad>=0, <start>=1, <end>=2, <unk>=3."""

    def __init__(self, words: Iterable[str]):
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIALS}, got {words[:4]}")
        self.itos: list[str] = words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(words)}
        if len(self.stoi) != len(words):
            raise ValueError("vocabulary has duplicate words")

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_count: int = 1) -> Vocabulary:
        """Keep words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for tokens in token_lists for tok in tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, tokens: list[str], max_len: int | None = None) -> list[int]:
        """<start> w1 .. wn <end>, unknown words -> <unk>, at most `max_len` words kept."""
        ids = [self.stoi.get(tok, UNK_ID) for tok in tokens[:max_len]]
        return [START_ID, *ids, END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <end>, skipping <start> and <pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i not in (START_ID, PAD_ID):
                words.append(self.itos[i])
        return words

    def to_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        return cls(d["itos"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=0))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_dict(json.loads(Path(path).read_text()))
