"""BLEU against pycocoevalcap, tokenize against its Java PTBTokenizer, and the score_captions bridge."""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import threading

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as pycoco_meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioning.metrics import bleu, score_captions
from captioning.rewards import CiderD, SentenceBleu
from captioning.vocab import tokenize

java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java on PATH")


def coco_bleu(refs: dict, hyps: dict, n: int = 4) -> list[float]:
    """pycocoevalcap's Bleu on the same words, joined with spaces as its scorers expect."""
    gts = {k: [" ".join(r) for r in rs] for k, rs in refs.items()}
    res = {k: [" ".join(h)] for k, h in hyps.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        return Bleu(n).compute_score(gts, res)[0]


def random_corpus(seed: int) -> tuple[dict, dict]:
    """1-5 references of 1-12 words per image from a 6-word vocabulary; hypotheses of 0-14 words, often 1."""
    rng = random.Random(seed)
    vocab = ["a", "dog", "cat", "on", "the", "grass"]
    refs, hyps = {}, {}
    for image in range(rng.randint(1, 30)):
        refs[image] = [rng.choices(vocab, k=rng.randint(1, 12)) for _ in range(rng.randint(1, 5))]
        hyps[image] = rng.choices(vocab, k=rng.choice([1, 1, 0, rng.randint(1, 14)]))
    return refs, hyps


@pytest.mark.parametrize("n", [4, 2])
@pytest.mark.parametrize("seed", range(12))
def test_bleu_equals_pycocoevalcap_on_random_corpora(seed: int, n: int) -> None:
    refs, hyps = random_corpus(seed)
    assert bleu(refs, hyps, n) == pytest.approx(coco_bleu(refs, hyps, n), abs=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_cider_d_reward_equals_pycocoevalcap_per_image(seed: int) -> None:
    """Built from the same references it scores, the reward's document frequencies are the toolkit's."""
    refs, hyps = random_corpus(seed)
    hyps[0] = refs[0][0]  # an exact reference, beside random and empty hypotheses
    _, per_image = Cider().compute_score({k: [" ".join(r) for r in rs] for k, rs in refs.items()},
                                         {k: [" ".join(h)] for k, h in hyps.items()})
    cider = CiderD([refs[k] for k in range(len(refs))])
    assert [cider(k, hyps[k]) for k in range(len(refs))] == pytest.approx(list(per_image), abs=1e-9)



@pytest.mark.parametrize("seed", range(12))
def test_sentence_bleu_reward_equals_pycocoevalcap_per_image(seed: int) -> None:
    refs, hyps = random_corpus(seed)
    hyps[0] = refs[0][0]
    with contextlib.redirect_stdout(io.StringIO()):
        _, per_image = Bleu(4).compute_score({k: [" ".join(r) for r in rs] for k, rs in refs.items()},
                                             {k: [" ".join(h)] for k, h in hyps.items()})
    sentence_bleu = SentenceBleu([refs[k] for k in range(len(refs))])
    assert [sentence_bleu(k, hyps[k]) for k in range(len(refs))] == pytest.approx(per_image[3], abs=1e-9)
    if len(hyps[0]) >= 4:  # a reference itself, with at least one 4-gram
        assert sentence_bleu(0, hyps[0]) == pytest.approx(1.0)

CAPTION_SETS = [
    (  # hypotheses shorter and longer than their references
        {1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave"],
         2: ["two dogs play with a frisbee in the park", "dogs playing in a grassy field"]},
        {1: "a man riding a wave", 2: "two dogs are playing with a red frisbee in a green park today"},
    ),
    (  # one image, one reference, a one-word hypothesis
        {"x": ["a plate of food with broccoli and rice"]},
        {"x": "broccoli"},
    ),
    (  # repeated words are clipped to their count in one reference
        {0: ["the cat sat on the mat", "there is a cat on the mat"], 1: ["a red bus on the street"]},
        {0: "the the the the the the the", 1: "a red bus on a street"},
    ),
]


@pytest.mark.parametrize(("refs", "hyps"), CAPTION_SETS)
def test_bleu_equals_pycocoevalcap_on_captions(refs: dict, hyps: dict) -> None:
    ref_words = {k: [c.split() for c in cs] for k, cs in refs.items()}
    hyp_words = {k: h.split() for k, h in hyps.items()}
    assert bleu(ref_words, hyp_words) == pytest.approx(coco_bleu(ref_words, hyp_words), abs=1e-6)


def test_bleu_identical_is_one_and_disjoint_is_zero() -> None:
    caption = "a black cat sleeping on a wooden bench".split()
    assert bleu({0: [caption]}, {0: caption}) == pytest.approx([1.0] * 4, abs=1e-9)
    assert max(bleu({0: [caption]}, {0: "two dogs run outside".split()})) < 1e-6


def test_bleu_hand_computed() -> None:
    # ref "the cat sat on the mat" (6 words), hyp "the cat on the mat" (5 words):
    #   1-grams: the x2, cat, on, mat all in the ref (the twice)     -> p1 = 5/5
    #   2-grams: the cat, on the, the mat match; cat on does not    -> p2 = 3/4
    #   3-grams: only "on the mat" matches                           -> p3 = 1/3
    #   4-grams: none                                                -> p4 = 0 (~1e-16 with the smoothing)
    #   brevity penalty exp(1 - 6/5) = exp(-0.2) = 0.818730753
    #   BLEU-1 = 1 * 0.8187 = 0.818731, BLEU-2 = (1 * 3/4)^(1/2) * 0.8187 = 0.709042,
    #   BLEU-3 = (1 * 3/4 * 1/3)^(1/3) * 0.8187 = 0.515768, BLEU-4 ~ 0
    scores = bleu({0: ["the cat sat on the mat".split()]}, {0: "the cat on the mat".split()})
    assert scores[:3] == pytest.approx([0.818731, 0.709042, 0.515768], abs=1e-6)
    assert scores[3] < 1e-3


def test_bleu_rejects_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="'b'"):
        bleu({"a": [["x"]]}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match="'b'"):
        bleu({"a": [["x"]], "b": [["y"]]}, {"a": ["x"]})
    with pytest.raises(ValueError, match="'a'"):
        bleu({"a": []}, {"a": ["x"]})


# Captions that exercise PTBTokenizer's rules and that nltk's Treebank tokenizer plus tokenize's few extra rules get
# right. Rare forms still differ (emoticons, 'AT&T', vulgar fractions, "rock 'n' roll"); on the 36,195 real COCO and
# Flickr8k captions we checked, 9 did.
TRICKY_CAPTIONS = [
    'A man on a hill. Cool view.',
    "The dog isn't happy. It cannot run.",
    "A man's hat, and the women's shoes.",
    'A (small) dog [with] a {toy}.',
    'A well-known red/blue sign costs $1.50 & 1.5 kg.',
    'Café au lait in the colour grey.',
    'A man -- with a hat - runs.',
    "don't DON'T can't won't ain't shouldn't 'tis 'twas",
    "it's 90's rock n' roll",
    'A sign reads: "STOP". Done',
    "Dogs' toys. The boys' hats",
    'Yes.No.Maybe and A TV.The end',
    'co-op re-enter 3-4 - 5 --6',
    'naïve résumé ÉCOLE Straße',
    'This is St. Louis. Another one',
    'dog, cat,bird,fish',
    '12,000 people 1,5 3.14.15 .5 5.',
    'Trailing spaces   ',
    'A caption\nwith a newline',
    '  leading spaces and\ttabs',
    '',
    '...',
]


@java
def test_tokenize_matches_java_ptbtokenizer() -> None:
    captions = {i: [{"caption": c}] for i, c in enumerate(TRICKY_CAPTIONS)}
    with contextlib.redirect_stdout(io.StringIO()):
        java_tokens = PTBTokenizer().tokenize(captions)
    mismatches = [(c, java_tokens[i][0], " ".join(tokenize(c))) for i, c in enumerate(TRICKY_CAPTIONS)
                  if java_tokens[i][0] != " ".join(tokenize(c))]
    assert not mismatches, "\n".join(f"{c!r}: java {j!r}, ours {o!r}" for c, j, o in mismatches)


def test_tokenize_keeps_what_pycocoevalcap_keeps() -> None:
    assert tokenize("A man on a hill. Cool view.") == ["a", "man", "on", "a", "hill", "cool", "view"]
    assert tokenize("It isn't a dog's (toy)") == ["it", "is", "n't", "a", "dog", "'s", "-lrb-", "toy", "-rrb-"]
    assert tokenize("") == []


REFS = {
    "img1": ["A man riding a wave on a surfboard.", "A surfer rides a big wave.", "Someone surfing in the ocean."],
    "img2": ["Two dogs play with a frisbee.", "Dogs playing in a grassy park.", "A pair of dogs chase a disc."],
    "img3": ["A plate of broccoli and rice.", "Food on a white plate.", "A healthy meal with vegetables."],
    "img4": ["A red bus on a city street.", "A double decker bus drives by.", "A bus parked near buildings."],
}
PERFECT = {key: captions[0] for key, captions in REFS.items()}
METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


@pytest.fixture(scope="module")
def scored_with_meteor() -> tuple[dict, list]:
    """score_captions(REFS, PERFECT) with METEOR, and the Meteor scorers it made (to check their java is stopped)."""
    made = []

    class RecordingMeteor(pycoco_meteor.Meteor):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pycoco_meteor, "Meteor", RecordingMeteor)
        return score_captions(REFS, PERFECT), made


@java
def test_score_captions_gives_all_metrics(scored_with_meteor: tuple[dict, list]) -> None:
    result, _ = scored_with_meteor
    assert list(result) == METRICS
    assert all(isinstance(result[m], float) for m in METRICS)
    assert [result[f"Bleu_{k}"] for k in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-6)
    assert result["CIDEr"] > 2.0 and result["METEOR"] > 0.5 and result["ROUGE_L"] == pytest.approx(1.0)


@java
def test_score_captions_stops_meteor_java(scored_with_meteor: tuple[dict, list]) -> None:
    _, made = scored_with_meteor
    assert len(made) == 1 and made[0].meteor_p.poll() is not None


@java
def test_meteor_stopped_by_ctrl_c_stops_its_java_without_hanging(monkeypatch) -> None:
    made = []

    class Interrupted(pycoco_meteor.Meteor):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

        def compute_score(self, gts, res):
            self.lock.acquire()  # where pycocoevalcap's compute_score waits on java when Ctrl-C arrives
            raise KeyboardInterrupt

    monkeypatch.setattr(pycoco_meteor, "Meteor", Interrupted)
    raised = []

    def score() -> None:
        try:
            score_captions(REFS, PERFECT)
        except KeyboardInterrupt:
            raised.append(True)

    worker = threading.Thread(target=score, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "closing the scorer waited for the lock its stopped compute_score holds"
    assert raised and made[0].meteor_p.poll() is not None
    made[0].__del__()  # pycocoevalcap's own clean-up takes the lock as well


def test_score_captions_without_meteor() -> None:
    result = score_captions(REFS, {**PERFECT, "img4": ""}, meteor=False)
    assert list(result) == [m for m in METRICS if m != "METEOR"] + ["notes"]
    assert result["notes"][0].startswith("METEOR not computed")
    assert 0.0 < result["Bleu_1"] < 1.0


def test_score_captions_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("captioning.metrics.shutil.which", lambda name: None)
    result = score_captions(REFS, PERFECT)
    assert "METEOR" not in result and "Java" in result["notes"][0]


def test_score_captions_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="'img5'"):
        score_captions(REFS, {**PERFECT, "img5": "a cat"}, meteor=False)
    with pytest.raises(ValueError, match="'img4'"):
        score_captions(REFS, {k: v for k, v in PERFECT.items() if k != "img4"}, meteor=False)
    with pytest.raises(TypeError, match="'img1'"):
        score_captions(REFS, {**PERFECT, "img1": ["a man surfing"]}, meteor=False)
