"""Shared fixtures: tiny datasets generated in tmp_path in the real on-disk formats (no files from outside the repo).

Each `make_*` fixture returns a function, so a test can build several datasets or variants in one tmp_path:
    def test_x(make_coco, tmp_path):
        root = make_coco(tmp_path, split="val", year=2014, n_images=3)
Every caption contains its image file's stem, so tests can check that captions stay with their image.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageDraw

from captioning.config import Config, load_config
from captioning.training import train

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (e.g. "scripts/train.py", "demo/app.py") as a module; its main() is not run."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

KARPATHY_SPLITS = {"train": 3, "restval": 2, "val": 2, "test": 2}


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """A small JPEG of random-colour rectangles on a random background; size is (width, height)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, x1 = sorted(rng.integers(0, size[0], 2))
        y0, y1 = sorted(rng.integers(0, size[1], 2))
        draw.rectangle((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)
    return path


def _make_coco(tmp_path: Path, split: str = "val", year: int = 2017, n_images: int = 6) -> Path:
    """COCO layout under tmp_path/"coco": annotations/captions_{split}{year}.json and {split}{year}/<file_name>.

    Image ids are unique, not sorted in the file; the first image listed has 6 captions, the others 5 (as in COCO).
    2014 file names are COCO_{split}2014_<id:012d>.jpg, later years <id:012d>.jpg. Returns the root.
    """
    root = tmp_path / "coco"
    rng = np.random.default_rng([year, *split.encode()])
    ids = [int(i) for i in rng.choice(600_000, size=n_images, replace=False)]
    images, annotations = [], []
    for n, img_id in enumerate(ids):
        file_name = f"COCO_{split}{year}_{img_id:012d}.jpg" if year == 2014 else f"{img_id:012d}.jpg"
        write_jpeg(root / f"{split}{year}" / file_name, seed=img_id)
        images.append({"license": 1, "file_name": file_name, "height": 48, "width": 64, "id": img_id,
                       "coco_url": f"http://images.cocodataset.org/{split}{year}/{file_name}"})
        for k in range(6 if n == 0 else 5):
            annotations.append({"image_id": img_id, "id": 1000 * n + k,
                                "caption": f"A photo {k} of {Path(file_name).stem} on a table."})
    data = {"info": {"description": "tiny COCO", "year": year}, "licenses": [{"id": 1, "name": "test"}],
            "type": "captions", "images": images, "annotations": annotations}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{split}{year}.json").write_text(json.dumps(data))
    return root


def _make_karpathy(
    tmp_path: Path, dataset: str = "coco", splits: dict[str, int] | None = None
) -> tuple[Path, Path]:
    """A Karpathy split file tmp_path/dataset_{dataset}.json and its images; returns (json_path, image_root).

    dataset "coco" has `filepath` (train2014 for train, val2014 for the rest, as in the real file) and `cocoid`;
    "flickr8k"/"flickr30k" have neither and no restval. `splits` maps split -> image count.
    """
    splits = dict(splits or KARPATHY_SPLITS)
    if dataset != "coco":
        splits.pop("restval", None)
    image_root = tmp_path / f"karpathy_{dataset}_images"
    images = []
    for split, count in splits.items():
        for _ in range(count):
            imgid = len(images)
            entry: dict = {"imgid": imgid, "split": split}
            if dataset == "coco":
                entry["cocoid"] = 500_000 + 7 * imgid
                entry["filepath"] = "train2014" if split == "train" else "val2014"
                entry["filename"] = f"COCO_{entry['filepath']}_{entry['cocoid']:012d}.jpg"
            else:
                entry["filename"] = f"{3_000_000 + imgid}_{imgid:04x}.jpg"
            write_jpeg(image_root / entry.get("filepath", "") / entry["filename"], seed=imgid)
            raws = [f"A Dog {k} near {Path(entry['filename']).stem} ." for k in range(5)]
            entry["sentences"] = [{"tokens": raw.lower().split()[:-1], "raw": raw, "imgid": imgid,
                                   "sentid": 5 * imgid + k} for k, raw in enumerate(raws)]
            entry["sentids"] = [s["sentid"] for s in entry["sentences"]]
            images.append(entry)
    json_path = tmp_path / f"dataset_{dataset}.json"
    json_path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return json_path, image_root


def _make_flickr8k(
    tmp_path: Path, n_train: int = 4, n_val: int = 2, n_test: int = 2, image_dir: str = "Flicker8k_Dataset"
) -> Path:
    """Flickr8k's original layout under tmp_path/"flickr8k"; returns the root.

    Flickr8k.token.txt has 5 lines `<file>#<n>\\t<caption>` per image, plus the official file's kind of oddity (a
    "<file>.jpg.1" name) and an image in no split list; Flickr_8k.{train,dev,test}Images.txt list the splits.
    """
    root = tmp_path / "flickr8k"
    names = {split: [f"{1_000_000 + 10 * i + j}_{i:03x}{j}.jpg" for i in range(count)]
             for j, (split, count) in enumerate([("train", n_train), ("dev", n_val), ("test", n_test)])}
    lines = []
    for n, name in enumerate([*names["train"], *names["dev"], *names["test"], "999_unlisted.jpg"]):
        write_jpeg(root / image_dir / name, seed=n)
        lines += [f"{name}#{k}\tA child {k} in {Path(name).stem} is climbing ." for k in range(5)]
    odd = f"{names['train'][0]}.1" if n_train else "2258277193_586949ec62.jpg.1"
    lines += [f"{odd}#{k}\tAn odd line {k} ." for k in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, split_names in names.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{name}\n" for name in split_names))
    return root


@pytest.fixture
def make_jpeg() -> Callable[..., Path]:
    """make_jpeg(path, seed, size=(64, 48)) -> path of a small random-rectangles JPEG."""
    return write_jpeg


@pytest.fixture
def make_coco() -> Callable[..., Path]:
    """make_coco(tmp_path, split="val", year=2017, n_images=6) -> COCO root (annotations/ and {split}{year}/)."""
    return _make_coco


@pytest.fixture
def make_karpathy() -> Callable[..., tuple[Path, Path]]:
    """make_karpathy(tmp_path, dataset="coco", splits=KARPATHY_SPLITS) -> (json_path, image_root)."""
    return _make_karpathy


@pytest.fixture
def make_flickr8k() -> Callable[..., Path]:
    """make_flickr8k(tmp_path, n_train=4, n_val=2, n_test=2, image_dir="Flicker8k_Dataset") -> Flickr8k root."""
    return _make_flickr8k


def tiny_config(out_dir: Path, **sections) -> Config:
    """A seconds-long CPU run on synthetic shapes: random frozen ResNet-18 at 64 px, small attention decoder.
    Keyword arguments are dotted overrides, e.g. tiny_config(p, **{"model.decoder": "show_tell"})."""
    overrides = {
        "data.num_train": 48, "data.num_val": 16, "data.num_test": 16, "data.synthetic_size": 64,
        "data.image_size": 64, "data.min_word_count": 1, "data.num_workers": 0, "data.augment": False,
        "model.encoder": "resnet18", "model.encoder_weights": None, "model.embed_dim": 16,
        "model.hidden_dim": 32, "model.attention_dim": 16, "model.dropout": 0.0,
        "train.epochs": 1, "train.batch_size": 16, "train.max_decode_len": 12, "train.out_dir": str(out_dir),
        **sections,
    }
    return load_config(None, [f"{k}={json.dumps(v) if v is None else v}" for k, v in overrides.items()])


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """best.pt of a tiny attention model trained for one epoch (shared by tests that need a real checkpoint)."""
    out = tmp_path_factory.mktemp("tiny_run")
    train(tiny_config(out / "run"))
    return out / "run" / "best.pt"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny CPU models: no slower alone, and far faster when other processes
    compete for the cores (OpenMP threads otherwise spin-wait on each other). The previous count is restored."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
