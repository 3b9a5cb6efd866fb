"""Folder captioning (scripts/caption.py + captioning.batch) on a generated tree of good and bad image files."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from captioning.batch import attention_file, coco_image_id, expand_inputs, open_writer
from captioning.config import ConfigError
from captioning.data import sources
from captioning.engine import check_cpu_bf16
from captioning.inference import ImageCaptioner
from captioning.models import Captioner

REPO = Path(__file__).resolve().parents[1]
caption_script = load_script("scripts/caption.py")


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


def test_a_resume_with_another_model_or_decoding_options_is_refused(tree, trained_checkpoint, tmp_path, capsys,
                                                                   monkeypatch, caplog):
    photos, out = str(tree["photos"] / "nested"), tmp_path / "captions.jsonl"
    assert run(trained_checkpoint, photos, "--out", str(out)) == 0
    first = out.read_text()
    _bf16_units(monkeypatch, True)
    for flags, changed in [(["--beam-size", "3"], "--beam-size 2 (this run asks 3)"),
                           (["--n-best", "2"], "--n-best 1 (this run asks 2)"),
                           (["--max-len", "5"], "--max-len 8 (this run asks 5)"),
                           (["--bf16"], "no --bf16 (this run asks --bf16)")]:
        with pytest.raises(SystemExit, match=rf"error: {out} was made with {re.escape(changed)}: resume it with "
                                             "those, pass --overwrite"):
            run(trained_checkpoint, photos, "--out", str(out), *flags)
    retrained = torch.load(trained_checkpoint, weights_only=True)
    name = next(iter(retrained["model"]))
    retrained["model"][name] += 1
    other = tmp_path / "other.pt"
    torch.save(retrained, other)
    with pytest.raises(SystemExit, match=re.escape(f"the checkpoint {trained_checkpoint} (this run's {other} holds "
                                                   "other weights)")):
        run(other, photos, "--out", str(out))
    assert out.read_text() == first

    copy = tmp_path / "copy.pt"  # the same model elsewhere, and options that change no caption, resume
    shutil.copy(trained_checkpoint, copy)
    capsys.readouterr()
    assert run(copy, photos, "--out", str(out), "--batch-size", "1", "--max-pixels", "10000000") == 0
    assert "captioned 0, skipped 2" in capsys.readouterr().out

    (tmp_path / "captions.jsonl.settings.json").unlink()  # an output of a caption.py that recorded no settings
    with caplog.at_level("WARNING", logger="captioning.batch"):
        assert run(trained_checkpoint, photos, "--out", str(out), "--beam-size", "3") == 0
    assert f"{out} has no record of the checkpoint and options that made it" in caplog.text
    assert "captioned 0, skipped 2" in capsys.readouterr().out
    assert not (tmp_path / "captions.jsonl.settings.json").exists()  # this run's settings did not make those captions


def test_a_second_run_into_the_same_output_is_refused_while_the_first_writes(tree, trained_checkpoint, tmp_path,
                                                                            capsys):
    for name, fmt in [("captions.jsonl", "jsonl"), ("results.json", "coco")]:
        out = tmp_path / name
        with open_writer(out, fmt) as first:
            with pytest.raises(SystemExit, match=f"error: {out} is being written by another caption.py run; let it "
                                                 "finish"):
                run(trained_checkpoint, str(tree["photos"] / "nested"), "--out", str(out), "--overwrite")
            assert first.path.exists() and first.path.stat().st_size == 0
        assert run(trained_checkpoint, str(tree["photos"] / "nested"), "--out", str(out)) == 0
        assert "captioned 2, skipped 0" in capsys.readouterr().out


def test_coco_progress_resumes_after_a_crash_left_its_last_record_half_written(tree, trained_checkpoint, tmp_path,
                                                                               capsys, caplog):
    out, progress = tmp_path / "results.json", tmp_path / "results.progress.jsonl"
    photos = str(tree["photos"] / "nested")
    assert run(trained_checkpoint, photos, "--out", str(out)) == 0
    lines = progress.read_bytes().splitlines(keepends=True)
    out.unlink()
    # A machine that crashed mid-write: the file grew, but the last write never reached the disk and reads as zeros.
    progress.write_bytes(lines[0] + bytes(40))
    with caplog.at_level("WARNING", logger="captioning.batch"):
        assert run(trained_checkpoint, photos, "--out", str(out)) == 0
    assert f"{progress}: its last record, which a killed run left half written, is dropped" in caplog.text
    assert "captioned 1, skipped 1" in capsys.readouterr().out
    assert len(json.loads(out.read_text())) == 2

    progress.write_bytes(lines[0][:30] + bytes(40) + b"\n" + lines[1])  # damage before the last record stays an error
    with pytest.raises(SystemExit, match=f"{progress}:1: is not JSON Lines"):
        run(trained_checkpoint, photos, "--out", str(out))


def test_sigterm_stops_after_the_batch_at_hand_and_the_run_resumes(tree, trained_checkpoint, tmp_path, capsys,
                                                                   monkeypatch):
    caption_batch = ImageCaptioner.caption_batch

    def terminated_during_the_first_batch(self, *args, **kwargs):
        monkeypatch.setattr(ImageCaptioner, "caption_batch", caption_batch)
        os.kill(os.getpid(), signal.SIGTERM)
        return caption_batch(self, *args, **kwargs)

    monkeypatch.setattr(ImageCaptioner, "caption_batch", terminated_during_the_first_batch)
    out = tmp_path / "results.json"
    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(out)) == 128 + signal.SIGTERM
    progress = tmp_path / "results.progress.jsonl"
    assert f"stopped: the captions written so far are kept in {progress};" in capsys.readouterr().err
    assert 0 < len(read_jsonl(progress)) <= 8  # the first batch, written; no results array for a run not finished
    assert not out.exists()
    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(out)) == 0
    assert len(json.loads(out.read_text())) == len(tree["good"])


def test_inputs_without_an_image_are_an_error_before_the_model_loads(trained_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no image here")
    monkeypatch.setattr(ImageCaptioner, "from_checkpoint", None)  # never reached
    with pytest.raises(SystemExit, match=f"error: no image files in {tmp_path / 'empty'} "):
        run(trained_checkpoint, str(tmp_path / "empty"))


def test_a_list_that_is_not_utf8_text_is_refused_before_the_model_loads(tree, trained_checkpoint, tmp_path,
                                                                        monkeypatch):
    listed = tmp_path / "list.txt"  # as `iconv -t UTF-16` or a Windows editor's "Unicode" writes it
    listed.write_bytes(f"{tree['photos'] / 'a.jpg'}\n".encode("utf-16"))
    monkeypatch.setattr(ImageCaptioner, "from_checkpoint", None)  # never reached
    with pytest.raises(SystemExit, match=f"error: {listed}:1: holds NUL characters, so it is not UTF-8 text .*; save "
                                         "it as UTF-8"):
        run(trained_checkpoint, str(listed), "--out", str(tmp_path / "captions.jsonl"))
    assert not (tmp_path / "captions.jsonl").exists()


def test_a_symbolic_link_loop_is_reported_as_one(tree, trained_checkpoint, tmp_path, capsys):
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "back.jpg")
    (tmp_path / "back.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(SystemExit, match=f"error: input is a symbolic link loop: {tmp_path / 'loop.jpg'} "):
        run(trained_checkpoint, str(tmp_path / "loop.jpg"))
    (tmp_path / "list.txt").write_text(f"loop.jpg\n{tree['photos'] / 'a.jpg'}\n")
    assert run(trained_checkpoint, str(tmp_path / "list.txt"), "--out", str(tmp_path / "c.jsonl")) == 0
    assert f"failed: {tmp_path / 'loop.jpg'}: symbolic link loop" in capsys.readouterr().err


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


def test_coco_results_name_the_files_whose_ids_clash_or_are_not_numbers(tree, trained_checkpoint, tmp_path,
                                                                        caplog):
    photos, out = tmp_path / "photos", tmp_path / "results.json"
    for name in ("x/000000000139.jpg", "y/000000000139.jpg", "holiday.jpg", "x/holiday.jpg"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes((tree["photos"] / "nested" / "g.jpg").read_bytes())
    with caplog.at_level("WARNING", logger="captioning.batch"):
        assert run(trained_checkpoint, str(photos), "--out", str(out)) == 0
    ids = sorted(map(str, (r["image_id"] for r in json.loads(out.read_text()))))
    assert ids == ["139", "139", "holiday", "holiday"]
    shared = f"holiday: {photos / 'holiday.jpg'}, {photos / 'x' / 'holiday.jpg'}"
    assert f"{out}: 2 image_id(s) belong to more than one file ({shared})" in caplog.text
    assert f"{out}: 2 file(s) have no COCO image id in their name ({photos / 'holiday.jpg'})" in caplog.text


def test_attention_maps_and_nbest_in_jsonl(tree, trained_checkpoint, tmp_path):
    out, maps = tmp_path / "captions.jsonl", tmp_path / "maps"
    assert run(trained_checkpoint, str(tree["photos"] / "nested"), "--out", str(out), "--beam-size", "3",
               "--n-best", "3", "--attention-dir", str(maps)) == 0
    records = read_jsonl(out)
    assert all(len(r["nbest"]) == 3 and r["nbest"][0]["caption"] == r["caption"] for r in records)
    figures = sorted(maps.rglob("*.png"))
    assert figures == sorted(attention_file(maps, r["path"]) for r in records)
    assert sorted(p.name for p in figures) == ["g.jpg.png", "h.png.png"]
    assert Image.open(figures[0]).width > 160  # the photo and at least one word panel


def test_attention_maps_written_inside_the_input_folder_are_not_inputs(tree, trained_checkpoint, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "captions.jsonl"
    shutil.copytree(tree["photos"] / "nested", photos)
    for _ in range(2):  # the second run finds the first one's maps in the folder it captions
        assert run(trained_checkpoint, str(photos), "--out", str(out), "--attention-dir", str(photos / "maps")) == 0
    assert sorted(Path(r["path"]).name for r in read_jsonl(out)) == ["g.jpg", "h.png"]
    assert sorted(p.name for p in (photos / "maps").rglob("*.png")) == ["g.jpg.png", "h.png.png"]
    for maps in (photos, tmp_path):  # the input folder itself, or a folder that holds it
        with pytest.raises(SystemExit, match=f"--attention-dir {maps} holds the input folder {photos}"):
            run(trained_checkpoint, str(photos), "--out", str(out), "--attention-dir", str(maps))


def test_images_captioned_earlier_without_an_attention_map_are_counted(tree, trained_checkpoint, tmp_path, capsys):
    photos, maps = tree["photos"] / "nested", tmp_path / "maps"
    plain, mapped = tmp_path / "plain.jsonl", tmp_path / "mapped.jsonl"
    assert run(trained_checkpoint, str(photos), "--out", str(plain)) == 0
    assert run(trained_checkpoint, str(photos), "--out", str(plain), "--attention-dir", str(maps)) == 0
    assert "note: 2 images captioned by an earlier run into" in capsys.readouterr().out
    for _ in range(2):  # a run killed after its maps resumes with nothing to say: their maps are there
        assert run(trained_checkpoint, str(photos), "--out", str(mapped), "--attention-dir", str(maps)) == 0
    assert "no attention map" not in capsys.readouterr().out


def test_a_photo_gone_before_its_attention_map_keeps_its_caption(tree, trained_checkpoint, tmp_path, monkeypatch,
                                                                 capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (photos / name).write_bytes((tree["photos"] / "nested" / "g.jpg").read_bytes())
    gone = photos / "a.jpg"
    caption_batch = ImageCaptioner.caption_batch

    def delete_then_caption(self, *args, **kwargs):  # the batch is read; the file goes before its map is drawn
        gone.unlink(missing_ok=True)
        return caption_batch(self, *args, **kwargs)

    monkeypatch.setattr(ImageCaptioner, "caption_batch", delete_then_caption)
    out, maps = tmp_path / "captions.jsonl", tmp_path / "maps"
    assert run(trained_checkpoint, str(photos), "--out", str(out), "--attention-dir", str(maps)) == 0
    assert sorted(Path(r["path"]).name for r in read_jsonl(out)) == ["a.jpg", "b.jpg"]
    assert [p.name for p in maps.rglob("*.png")] == ["b.jpg.png"]
    assert f"no attention map: {gone}: " in capsys.readouterr().err


def test_helpers_and_clear_errors(tree, trained_checkpoint, tmp_path):
    assert coco_image_id("x/000000391895.jpg") == 391895
    assert coco_image_id("COCO_val2014_000000000042.jpg") == 42
    assert coco_image_id("holiday.jpg") == "holiday"
    assert list(expand_inputs([tree["photos"] / "notes.md"])) == [str(tree["photos"] / "notes.md")]  # named: tried
    with pytest.raises(SystemExit, match="input not found"):
        run(trained_checkpoint, str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="--n-best must be between 1 and --beam-size"):
        run(trained_checkpoint, str(tree["photos"]), "--n-best", "3")
    with pytest.raises(SystemExit, match="a beam of 500 is wider than the model's vocabulary"):
        run(trained_checkpoint, str(tree["photos"]), "--beam-size", "500", "--out", str(tmp_path / "wide.jsonl"))
    assert not (tmp_path / "wide.jsonl").exists()
    with pytest.raises(SystemExit, match="names an image file; write the captions to a .jsonl, .csv or .json file"):
        run(trained_checkpoint, str(tree["photos"]), "--out", str(tree["photos"] / "a.jpg"), "--overwrite")
    (tmp_path / "other.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit, match="--overwrite"):
        run(trained_checkpoint, str(tree["photos"]), "--out", str(tmp_path / "other.jsonl"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_stops_cleanly_after_a_written_batch(trained_checkpoint, tmp_path,
                                                                                 signum):
    """`timeout`, SLURM's scancel and Ctrl-C in a terminal signal the DataLoader workers too, not only the main
    process: the workers leave the stop to it, so no worker dies under a batch it was decoding."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(600):
        _noise(seed=i % 7).save(photos / f"{i:03d}.jpg")
    out = tmp_path / "captions.jsonl"
    child = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "caption.py"), "--checkpoint", str(trained_checkpoint), str(photos),
         "--out", str(out), "--num-workers", "2", "--batch-size", "4", "--beam-size", "2", "--max-len", "8"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    while child.poll() is None and not (out.exists() and out.stat().st_size):  # the workers are decoding by now
        time.sleep(0.01)
    os.killpg(child.pid, signum)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    assert f"stopped: the captions written so far are kept in {out}" in stderr
    assert 0 < len(read_jsonl(out)) < 600


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


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_a_file_name_that_is_not_utf8_is_captioned_and_resumed(trained_checkpoint, tmp_path, capsys, suffix):
    """A Latin-1 name from an old archive: b'caf\\xe9.jpg' is no UTF-8 text, so Python hands it over as 'caf\\udce9'."""
    photos = tmp_path / "photos"
    photos.mkdir()
    _noise(seed=1).save(photos / "a.jpg")
    latin1 = os.fsdecode(b"caf\xe9.jpg")
    _noise(seed=2).save(photos / latin1)
    _noise(seed=3).save(photos / "z.jpg")  # after it in the folder's order
    out = tmp_path / f"captions{suffix}"
    assert run(trained_checkpoint, str(photos), "--out", str(out)) == 0
    assert "captioned 3, skipped 0" in capsys.readouterr().out
    assert run(trained_checkpoint, str(photos), "--out", str(out)) == 0
    assert "captioned 0, skipped 3" in capsys.readouterr().out
    if suffix == ".jsonl":
        out.read_bytes().decode("utf-8")  # still valid UTF-8
        assert str(photos / latin1) in {r["path"] for r in read_jsonl(out)}
    if suffix == ".json":
        assert {r["image_id"] for r in json.loads(out.read_text())} == {"a", os.fsdecode(b"caf\xe9"), "z"}


def test_a_file_written_by_something_else_is_never_emptied(tree, trained_checkpoint, tmp_path, capsys):
    image = str(tree["photos"] / "a.jpg")
    for name, text in [("notes.jsonl", "my notes, no newline at the end"), ("notes.csv", "name;comment"),
                       ("notes.json", '[{"image_id": 1, "caption": "written by hand"}]')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match="--overwrite"):
            run(trained_checkpoint, image, "--out", str(tmp_path / name))
        assert (tmp_path / name).read_text() == text
    # A whole JSON Lines record without its newline (another tool wrote it) is kept, and the next starts a new line.
    kept = {"path": str(tree["photos"] / "b.png"), "caption": "a caption", "score": -1.0}
    (tmp_path / "other.jsonl").write_text(json.dumps(kept))
    assert run(trained_checkpoint, image, str(tree["photos"] / "b.png"), "--out", str(tmp_path / "other.jsonl")) == 0
    assert "captioned 1, skipped 1" in capsys.readouterr().out
    assert [r["path"] for r in read_jsonl(tmp_path / "other.jsonl")] == [kept["path"], image]


def test_csv_resume_reads_rows_that_span_lines_and_cuts_a_half_written_one(trained_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(["a.jpg", "two\nlines.jpg", "c.jpg"]):
        _noise(seed=i).save(photos / name)
    out = tmp_path / "captions.csv"
    assert run(trained_checkpoint, str(photos), "--out", str(out)) == 0
    whole = out.read_bytes()
    assert run(trained_checkpoint, str(photos), "--out", str(out)) == 0
    assert "captioned 0, skipped 3" in capsys.readouterr().out
    out.write_bytes(whole[:-7])  # killed while writing the last row
    assert run(trained_checkpoint, str(photos), "--out", str(out)) == 0
    assert "captioned 1, skipped 2" in capsys.readouterr().out
    with open(out, newline="") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == sorted(str(p) for p in photos.iterdir())


def test_resume_refuses_relative_paths_from_another_folder_and_knows_a_linked_file(tree, trained_checkpoint, tmp_path,
                                                                                     monkeypatch, capsys):
    (tmp_path / "first").mkdir()
    (tmp_path / "elsewhere").mkdir()
    photos = tmp_path / "first" / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.png"):
        (photos / name).write_bytes((tree["photos"] / name).read_bytes())
    (photos / "link.jpg").symlink_to(photos / "a.jpg")
    out = tmp_path / "captions.jsonl"
    monkeypatch.chdir(tmp_path / "first")
    assert run(trained_checkpoint, "photos", "--out", str(out)) == 0
    out_text = capsys.readouterr().out  # link.jpg is a.jpg
    assert "captioned 2, skipped 0 (already captioned), failed 0, 1 named twice (captioned once)" in out_text
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match="run the command from the folder its first run started in"):
        run(trained_checkpoint, "../first/photos", "--out", str(out))
    assert len(read_jsonl(out)) == 2


def test_an_unreadable_folder_is_reported_and_counts_as_a_failure(tree, trained_checkpoint, tmp_path, monkeypatch,
                                                                   capsys):
    locked = tree["photos"] / "nested"
    scandir = os.scandir

    def refuse_locked(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    assert run(trained_checkpoint, str(tree["photos"]), "--out", str(tmp_path / "c.jsonl"), "--strict") == 1
    captured = capsys.readouterr()
    assert f"failed: {locked}: cannot read the folder (Permission denied)" in captured.err
    assert f"captioned {len(tree['good']) - 2}, skipped 0 (already captioned), failed 5" in captured.out


def test_every_image_gets_its_own_attention_map_file(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "x").mkdir(parents=True)
    monkeypatch.chdir(work)
    maps = tmp_path / "maps"
    paths = ["x/photo.jpg", "x/photo.png", "x__y/p.jpg", "x/y__p.jpg", "../x/photo.jpg", str(work / "x/photo.jpg"),
             "/x/photo.jpg", "@root/x/photo.jpg"]
    files = [attention_file(maps, p) for p in paths]
    assert files[0] == maps / "x" / "photo.jpg.png"  # the image's own path, under the folder
    assert files[5] == files[0]  # one image named two ways: one file
    others = files[:5] + files[6:]
    assert len(set(others)) == len(others)
    assert files[4] == maps / "@root" / tmp_path.relative_to(tmp_path.anchor) / "x" / "photo.jpg.png"
    assert files[7] == maps / "@@root" / "x" / "photo.jpg.png"


def test_input_and_output_errors_name_the_file(tree, trained_checkpoint, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="is a folder; name a results file"):
        run(trained_checkpoint, str(tree["photos"] / "a.jpg"), "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="unknown device 'gpu'"):
        run(trained_checkpoint, str(tree["photos"] / "a.jpg"), "--device", "gpu")
    if not torch.backends.mps.is_available():  # a backend this machine lacks: one line, not model.to's traceback
        with pytest.raises(SystemExit, match="device 'mps' is not usable here .*: use auto or cpu"):
            run(trained_checkpoint, str(tree["photos"] / "a.jpg"), "--device", "mps")
    (tmp_path / "bom.txt").write_text("\ufeffa.jpg\n")  # a list saved by Notepad starts with a byte-order mark
    (tmp_path / "a.jpg").write_bytes((tree["photos"] / "a.jpg").read_bytes())
    assert list(expand_inputs([tmp_path / "bom.txt"])) == [str(tmp_path / "a.jpg")]
    (tmp_path / "folders.txt").write_text(f"{tree['photos'] / 'nested'}\n")  # searched as on the command line
    listed = list(expand_inputs([tmp_path / "folders.txt"]))
    assert listed == list(expand_inputs([tree["photos"] / "nested"])) and len(listed) == 2
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    found = list(expand_inputs([tmp_path], recursive=False))
    assert found == [str(tmp_path / "IMG_0001.HEIC"), str(tmp_path / "a.jpg")]
    if "pillow-heif" in sources.HEIF_HINT:
        with pytest.raises(sources.BadImageError, match="pip install pillow-heif"):
            sources.open_image(tmp_path / "IMG_0001.HEIC")


def test_a_pixel_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    _bomb_png(tmp_path / "big.png", side=14_000)  # 196 million pixels: above twice Pillow's default limit
    with pytest.raises(sources.BadImageError, match="decompression bomb"):
        sources.open_image(tmp_path / "big.png")
    with pytest.raises(sources.BadImageError, match="truncated or corrupt"):  # opened; its pixel data is missing
        sources.open_image(tmp_path / "big.png", max_pixels=200_000_000)


def _bf16_units(monkeypatch, present: bool) -> None:
    """Make this CPU report bf16 matrix units or none (bf16 runs everywhere, only slowly without them)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: present)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: present)


def test_bf16_runs_the_model_in_bfloat16_and_captions_every_image(tree, trained_checkpoint, tmp_path, monkeypatch):
    _bf16_units(monkeypatch, True)
    encode, grid_dtypes = Captioner.encode, set()

    def recording_encode(self, images):
        grid, pooled = encode(self, images)
        grid_dtypes.add(grid.dtype)
        return grid, pooled

    monkeypatch.setattr(Captioner, "encode", recording_encode)
    for flags, name, dtype in [([], "fp32.jsonl", torch.float32), (["--bf16"], "bf16.jsonl", torch.bfloat16)]:
        grid_dtypes.clear()
        assert run(trained_checkpoint, str(tree["photos"]), "--out", str(tmp_path / name), *flags) == 0
        assert grid_dtypes == {dtype}
    fp32, bf16 = read_jsonl(tmp_path / "fp32.jsonl"), read_jsonl(tmp_path / "bf16.jsonl")
    assert sorted(r["path"] for r in bf16) == sorted(r["path"] for r in fp32) == sorted(tree["good"])
    assert all(isinstance(r["caption"], str) and r["caption"] and isinstance(r["score"], float) for r in bf16)


def test_bf16_is_refused_where_it_would_be_slower_or_is_already_on(tree, trained_checkpoint, monkeypatch):
    _bf16_units(monkeypatch, False)
    with pytest.raises(SystemExit, match="this CPU has no bf16 matrix units"):
        run(trained_checkpoint, str(tree["photos"]), "--bf16", "--device", "cpu")
    with pytest.raises(ConfigError, match="already runs in mixed precision"):
        check_cpu_bf16(torch.device("cuda"))
