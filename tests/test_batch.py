"""Folder captioning (scripts/caption.py + captioning.batch) on a generated tree of good and bad image files."""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.batch import coco_image_id, expand_inputs

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("caption_script", REPO / "scripts" / "caption.py")
caption_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(caption_script)


def _noise(size=(64, 48), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _bomb_png(path: Path, side: int = 100_000) -> None:
    """A tiny PNG whose header declares side x side pixels (Pillow refuses it before decoding anything)."""
    _noise((1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the IHDR chunk's CRC
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """photos/ with every kind of good image (two nested) and four bad files; lists/list.txt naming some of them."""
    root = tmp_path_factory.mktemp("batch")
    photos = root / "photos"
    (photos / "nested" / "deeper").mkdir(parents=True)
    good = {
        "a.jpg": _noise(seed=1),
        "b.png": _noise(seed=2),
        "c.webp": _noise(seed=3),
        "d.bmp": _noise(seed=4),
        "e.gif": _noise(seed=5).convert("P"),
        "f.tiff": _noise(seed=6),
        "gray.png": _noise(seed=7).convert("L"),
        "rgba.png": _noise(seed=8).convert("RGBA"),
        "cmyk.jpg": _noise(seed=9).convert("CMYK"),
        "deep16.png": Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20),
        "000000391895.jpg": _noise(seed=10),
        "nested/g.jpg": _noise(seed=11),
        "nested/deeper/h.png": _noise(seed=12),
    }
    for name, image in good.items():
        image.save(photos / name)
    assert Image.open(photos / "deep16.png").mode.startswith("I")
    (photos / "not_image.jpg").write_text("this is a text file, not a JPEG")
    _noise((256, 256), seed=13).save(photos / "whole.jpg", quality=95)
    data = (photos / "whole.jpg").read_bytes()
    (photos / "whole.jpg").unlink()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (photos / "empty.png").write_bytes(b"")
    _bomb_png(photos / "bomb.png")
    (photos / "notes.md").write_text("not an image extension: never picked up from a folder")
    (photos / ".hidden.jpg").write_text("hidden files are left out")
    lists = root / "lists"
    lists.mkdir()
    (lists / "list.txt").write_text("# some photos\n../photos/a.jpg\n\n../photos/nested/g.jpg\n"
                                    f"{photos / 'b.png'}\n../photos/missing.jpg\n")
    bad = ["not_image.jpg", "truncated.jpg", "empty.png", "bomb.png"]
    return {"root": root, "photos": photos, "good": [str(photos / n) for n in good],
            "bad": [str(photos / n) for n in bad], "list": lists / "list.txt"}


def run(checkpoint: Path, *argv: str) -> int:
    """scripts/caption.py in this process; small decoding settings keep it quick (a later flag wins)."""
    args = caption_script.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--num-workers", "0", "--batch-size", "8", "--beam-size", "2",
         "--max-len", "8", *argv])
    return caption_script.main(args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_captions_every_good_image_and_reports_each_bad_one_once(tree, trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(out)) == 0
    records = read_jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(tree["good"])
    assert all(isinstance(r["caption"], str) and isinstance(r["score"], float) and "nbest" not in r for r in records)
    captured = capsys.readouterr()
    for path in tree["bad"]:
        assert captured.err.count(f"failed: {path}: ") == 1
    assert "failed: " + str(tree["photos"] / "bomb.png") + ": decompression bomb" in captured.err
    assert "notes.md" not in captured.err and ".hidden" not in captured.err
    assert f"captioned {len(tree['good'])}, skipped 0 (already captioned), failed 4" in captured.out

    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(out), "--strict") == 1  # failures -> status 1
    captured = capsys.readouterr()
    assert f"captioned 0, skipped {len(tree['good'])} (already captioned), failed 4" in captured.out
    assert read_jsonl(out) == records  # the resumed run captioned nothing new


def test_resume_after_a_killed_run_and_overwrite(tree, trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    run(trained_checkpoint, str(tree["photos"]), "--out", str(out))
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:20])  # killed in the middle of writing the fourth record
    capsys.readouterr()
    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(out)) == 0
    assert f"captioned {len(tree['good']) - 3}, skipped 3" in capsys.readouterr().out
    assert sorted(r["path"] for r in read_jsonl(out)) == sorted(tree["good"])  # each once, every line parses

    assert run(trained_checkpoint, str(tree["photos"] / "nested"), "--out", str(out), "--overwrite") == 0
    assert "captioned 2, skipped 0" in capsys.readouterr().out
    assert len(read_jsonl(out)) == 2


def test_flat_leaves_out_nested_folders(tree, trained_checkpoint, tmp_path):
    out = tmp_path / "flat.jsonl"
    assert run(trained_checkpoint, str(tree["photos"]), "--flat", "--out", str(out)) == 0
    paths = {r["path"] for r in read_jsonl(out)}
    assert paths == {p for p in tree["good"] if "nested" not in p}


def test_list_file_paths_are_relative_to_the_list(tree, trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "list.jsonl"
    assert run(trained_checkpoint, str(tree["list"]), "--out", str(out)) == 0
    resolved = {str(Path(r["path"]).resolve()) for r in read_jsonl(out)}
    photos = tree["photos"].resolve()
    assert resolved == {str(photos / "a.jpg"), str(photos / "nested" / "g.jpg"), str(photos / "b.png")}
    assert "missing.jpg: file not found" in capsys.readouterr().err


def test_csv_and_coco_outputs_parse(tree, trained_checkpoint, tmp_path):
    out_csv = tmp_path / "captions.csv"  # the format follows the extension
    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(out_csv), "--n-best", "2") == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(tree["good"])
    assert all(len(json.loads(r["nbest"])) == 2 and float(r["score"]) <= 0 for r in rows)
    assert json.loads(rows[0]["nbest"])[0]["caption"] == rows[0]["caption"]

    out_coco = tmp_path / "results.json"
    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(out_coco), "--format", "coco") == 0
    results = json.loads(out_coco.read_text())
    assert all(set(r) == {"image_id", "caption"} for r in results)
    ids = {r["image_id"] for r in results}
    assert len(results) == len(tree["good"]) and 391895 in ids and "a" in ids
    assert len(read_jsonl(tmp_path / "results.progress.jsonl")) == len(tree["good"])  # what a resume reads
    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(out_coco)) == 0  # resumed: the same array
    assert json.loads(out_coco.read_text()) == results


def test_attention_maps_and_nbest_in_jsonl(tree, trained_checkpoint, tmp_path):
    out, maps = tmp_path / "captions.jsonl", tmp_path / "maps"
    assert run(trained_checkpoint, str(tree["photos"] / "nested"), "--out", str(out), "--beam-size", "3",
               "--n-best", "3", "--attention-dir", str(maps)) == 0
    records = read_jsonl(out)
    assert all(len(r["nbest"]) == 3 and r["nbest"][0]["caption"] == r["caption"] for r in records)
    figures = sorted(maps.glob("*.png"))
    assert sorted(p.name.rsplit("__", 1)[-1] for p in figures) == ["g.png", "h.png"]
    assert Image.open(figures[0]).width > 160  # the photo and at least one word panel


def test_helpers_and_clear_errors(tree, trained_checkpoint, tmp_path):
    assert coco_image_id("x/000000391895.jpg") == 391895
    assert coco_image_id("COCO_val2014_000000000042.jpg") == 42
    assert coco_image_id("holiday.jpg") == "holiday"
    assert list(expand_inputs([tree["photos"] / "notes.md"])) == [str(tree["photos"] / "notes.md")]  # named: tried
    with pytest.raises(SystemExit, match="input not found"):
        run(trained_checkpoint, str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="--n-best must be between 1 and --beam-size"):
        run(trained_checkpoint, str(tree["photos"]), "--n-best", "3")
    (tmp_path / "other.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit, match="--overwrite"):
        run(trained_checkpoint, str(tree["photos"]), "--out", str(tmp_path / "other.jsonl"))


def test_command_line_end_to_end(tree, trained_checkpoint, tmp_path):
    """One real process, with DataLoader worker processes decoding the images."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "caption.py"), "--checkpoint", str(trained_checkpoint),
         str(tree["photos"]), "--num-workers", "2", "--format", "csv", "--strict", "--max-len", "8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # --strict, and four files are bad
    assert f"captioned {len(tree['good'])}, skipped 0 (already captioned), failed 4" in result.stdout
    with open(tmp_path / "captions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(tree["good"])
