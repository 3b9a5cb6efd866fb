"""What happens when things go wrong: killed and preempted training, broken checkpoints, a full disk, unsafe files,
images that vanish or rot mid-epoch, hundreds of malformed uploads, and configuration mistakes.
"""

from __future__ import annotations

import contextlib
import errno
import html
import io
import json
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_script, tiny_config
from PIL import Image

from captioning.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioning.config import ConfigError, load_config, save_config
from captioning.data.datasets import (
    ImageLoader,
    Preprocess,
    TrainDataset,
    build_source,
    collate_train,
    report_unreadable,
)
from captioning.data.features import FeatureLoader
from captioning.data.sources import BadImageError, CaptionSource, Sample, open_image
from captioning.models.captioner import load_model
from captioning.training import train

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
# One intra-op thread: the killed, resumed and reference runs then add up floating point in the same order, and
# the tests leave the machine's other cores alone.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PIL_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt EXIF, by design


def _progress(path: Path) -> dict:
    """A checkpoint's progress counters, read without loading its tensors."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["progress"]


def _start_training(args: list[str], log_dir: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """scripts/train.py in a child process; its output goes to a file (a full pipe would block the child)."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], stdout=log, stderr=subprocess.STDOUT,
                                env=CHILD_ENV, cwd=REPO)
    return proc, log_path


def _wait_until(proc: subprocess.Popen, ready, log_path: Path, timeout: float = 180.0) -> None:
    """Poll `ready()` until it holds; fail with the child's output if the child ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"training child ended (rc {proc.returncode}) or stalled before the test could interrupt "
                        f"it:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Torch runs on `n` intra-op threads inside, as the child processes do."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- killed and stopped


# Dropout, augmentation and scheduled sampling all draw random numbers, so the resumed run only matches the
# uninterrupted one if each step's draws depend on (seed, rank, step) and the data on (seed, epoch, index).
RESUMABLE = {"train.epochs": 3, "train.batch_size": 8, "model.dropout": 0.3, "data.augment": True,
             "train.scheduled_sampling": 0.5, "train.seed": 7}  # 48 images / 8 -> 6 steps per epoch, 18 in all


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    total_steps = 18
    cfg = tiny_config(tmp_path / "killed", **RESUMABLE, **{"train.save_every_steps": 2})
    save_config(cfg, tmp_path / "killed.yaml")
    kill_after = random.Random(20240607).randrange(2, total_steps - 4)  # a checkpoint step, then a random moment
    last = tmp_path / "killed" / "last.pt"

    proc, log = _start_training(["--config", str(tmp_path / "killed.yaml")], tmp_path, "killed")
    _wait_until(proc, lambda: last.exists() and _progress(last)["global_step"] >= kill_after, log)
    time.sleep(random.Random(kill_after).uniform(0.0, 0.3))  # mid-step, mid-save or mid-validation
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"

    reached = load_checkpoint(last)["progress"]  # a SIGKILL during a save leaves the previous file whole
    assert 0 < reached["global_step"] < total_steps
    resumed = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--resume", str(last)], capture_output=True,
                             text=True, env=CHILD_ENV, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    with _torch_threads(1):
        reference = train(tiny_config(tmp_path / "reference", **RESUMABLE))
    want, got = load_checkpoint(reference / "last.pt"), load_checkpoint(last)
    assert got["progress"]["global_step"] == want["progress"]["global_step"] == total_steps
    assert want["model"].keys() == got["model"].keys()
    for name, expected in want["model"].items():
        torch.testing.assert_close(got["model"][name], expected, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for name, expected in want["optimizer"]["state"].items():
        torch.testing.assert_close(got["optimizer"]["state"][name], expected, rtol=0, atol=1e-6)


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"train.epochs": 50, "train.batch_size": 8})  # would run for minutes
    save_config(cfg, tmp_path / "run.yaml")
    proc, log = _start_training(["--config", str(tmp_path / "run.yaml")], tmp_path, "run")
    _wait_until(proc, lambda: b"loss=" in log.read_bytes(), log)  # the first optimiser step is done
    time.sleep(random.Random(3).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGTERM)

    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    output = log.read_text(errors="replace")
    assert "--resume" in output and "Traceback" not in output
    progress = load_checkpoint(tmp_path / "run" / "last.pt")["progress"]
    assert progress["global_step"] > 0 and (progress["step_in_epoch"] > 0 or progress["epoch"] > 0)


# 6 training steps (the last of 4 images), then validation over 32 batches (256 images, beam 5, 20 words): a signal
# sent once validation's progress bar shows arrives while it runs (it has a second or more left on an idle machine).
LONG_VALIDATION = {"data.num_train": 44, "train.batch_size": 8, "data.num_val": 256, "train.val_beam_size": 5,
                   "train.max_decode_len": 20}


def test_sigterm_during_validation_stops_it_and_resume_validates_that_epoch(tmp_path):
    # a second epoch with dropout: the resumed run must draw the same random numbers after the repeated validation
    stopped = {**LONG_VALIDATION, "train.epochs": 2, "model.dropout": 0.3}
    cfg = tiny_config(tmp_path / "run", **stopped)
    save_config(cfg, tmp_path / "run.yaml")
    last = tmp_path / "run" / "last.pt"
    proc, log = _start_training(["--config", str(tmp_path / "run.yaml")], tmp_path, "run")
    _wait_until(proc, lambda: b"decode:" in log.read_bytes(), log)  # the validation progress bar is up
    proc.send_signal(signal.SIGTERM)

    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "validation ran to its end before stopping"
    output = log.read_text(errors="replace")
    assert "--resume" in output and "Traceback" not in output
    decoded = re.search(r"while validating epoch 1 \((\d+) of 256 images decoded\)", output)
    assert decoded and int(decoded[1]) < 256, output[-2000:]  # it stopped before the end of validation
    progress = load_checkpoint(last)["progress"]
    assert (progress["epoch"], progress["step_in_epoch"], progress["global_step"]) == (0, 6, 6)  # trained, unscored
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "best.pt").exists()

    resumed = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--resume", str(last)], capture_output=True,
                             text=True, env=CHILD_ENV, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with _torch_threads(1):
        reference = train(tiny_config(tmp_path / "reference", **stopped))
    got, want = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                 for run in (tmp_path / "run", reference))
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.pop("train_loss") == pytest.approx(w.pop("train_loss"), abs=1e-6)
        del g["seconds"], w["seconds"]
    assert got == want  # the same epochs, steps, learning rates and validation scores as a run never stopped
    assert (tmp_path / "run" / "best.pt").exists()


def test_sigterm_while_caching_features_stops_cleanly_and_leaves_no_file(tmp_path):
    cache = tmp_path / "features"  # 4,000 images: seconds of extraction on any machine
    cfg = tiny_config(tmp_path / "run", **{"data.num_train": 4000, "data.feature_cache": str(cache)})
    save_config(cfg, tmp_path / "run.yaml")
    proc, log = _start_training(["--config", str(tmp_path / "run.yaml")], tmp_path, "run")
    _wait_until(proc, lambda: b"features train:" in log.read_bytes(), log)
    proc.send_signal(signal.SIGTERM)

    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    output = log.read_text(errors="replace")
    assert "while caching the train split's features" in output and "Traceback" not in output, output[-2000:]
    assert list(cache.iterdir()) == []  # neither a cache nor a temp file of the stopped split


def test_resume_goes_on_in_the_moved_run_folder_rewrites_later_metrics_and_refuses_fixed_keys(tmp_path):
    """A run stopped after writing an epoch's metrics line but before its last.pt said so (or resumed from an earlier
    checkpoint) writes that line again in place of the old one; a resumed run follows its folder when it moves."""
    cfg = tiny_config(tmp_path / "run", **{"train.epochs": 1})
    train(cfg)
    epoch1 = (tmp_path / "run" / "last.pt").read_bytes()
    train(tiny_config(tmp_path / "run", **{"train.epochs": 2}), resume=tmp_path / "run" / "last.pt")
    (tmp_path / "run").rename(tmp_path / "moved")
    (tmp_path / "moved" / "last.pt").write_bytes(epoch1)  # metrics.jsonl holds epochs 1 and 2, last.pt only 1

    def resume(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--resume", str(tmp_path / "moved" / "last.pt"),
                               *options], capture_output=True, text=True, env=CHILD_ENV, cwd=REPO, timeout=300)

    refused = resume("--set", "train.epochs=2", "train.lr=1e-5")
    assert refused.returncode == 1 and "train.lr 0.0004 -> 1e-05" in refused.stderr, refused.stderr[-2000:]
    assert resume("--set", "train.epochs=2").returncode == 0
    lines = [json.loads(line) for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert load_checkpoint(tmp_path / "moved" / "last.pt")["progress"]["epoch"] == 2
    assert not (tmp_path / "run").exists()
    metrics = (tmp_path / "moved" / "metrics.jsonl").read_bytes()
    finished = resume()  # nothing left to train: refused, the run's files untouched
    assert finished.returncode == 1 and "has trained all 2 epochs" in finished.stderr, finished.stderr[-2000:]
    assert (tmp_path / "moved" / "metrics.jsonl").read_bytes() == metrics


# ------------------------------------------------------------------------------------------ checkpoint files


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """A checkpoint-shaped file (model, vocab, progress) small enough to cut up many times."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": torch.nn.Linear(32, 16).state_dict(), "vocab": {"itos": ["<pad>", "a", "b"]},
                     "progress": {"epoch": 3, "global_step": 120}}, path)
    return path


def _truncations(data: bytes) -> list[bytes]:
    return [data[:n] for n in (30, 200, len(data) // 2, len(data) - 22, len(data) - 1)]


def _random_blobs(data: bytes) -> list[bytes]:
    rng = np.random.default_rng(11)
    return [data[:1], *(rng.bytes(int(rng.integers(1, 5000))) for _ in range(20))]


def _text_files(data: bytes) -> list[bytes]:
    return [b"hello world\n", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 46207733\n",
            b"<html><body>403 Forbidden</body></html>"]




@pytest.mark.parametrize("variants", [
    pytest.param(lambda data: [b""], id="zero-bytes"),
    pytest.param(_truncations, id="truncated"),
    pytest.param(lambda data: [b"PK\x03\x04" + data[4:len(data) // 3]], id="zip-without-directory"),
    pytest.param(_random_blobs, id="random-bytes"),
    pytest.param(_text_files, id="text"),
])
def test_damaged_checkpoint_is_refused_by_name(small_checkpoint, tmp_path, variants):
    for n, data in enumerate(variants(small_checkpoint.read_bytes())):
        damaged = tmp_path / f"damaged_{n}.pt"
        damaged.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(damaged)
        assert str(damaged) in str(info.value)
        assert "corrupt" in str(info.value), str(info.value)


def _save_that_dies(error: BaseException):
    """A torch.save that writes part of a file, then fails the way a crash, Ctrl-C or a full disk would."""
    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\x00" * 4096)
        raise error
    return partial_save


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
@pytest.mark.parametrize("error", [RuntimeError("crash mid-write"), KeyboardInterrupt(), OSError(errno.EIO, "I/O")],
                         ids=["crash", "ctrl-c", "io-error"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, name, error):
    path = tmp_path / name
    save_checkpoint({"model": {"w": torch.arange(10.0)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _save_that_dies(error))

    with pytest.raises(type(error)):
        save_checkpoint({"model": {"w": torch.zeros(10)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left behind
    monkeypatch.undo()
    torch.testing.assert_close(load_checkpoint(path)["model"]["w"], torch.arange(10.0))


def test_a_temp_file_left_by_a_save_killed_midway_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "last.pt"
    killed_mid_save = f"""
import os, signal, torch
from captioning.checkpoint import save_checkpoint
def dies_mid_write(obj, f, *args, **kwargs):
    f.write(bytes(4096))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dies_mid_write
save_checkpoint({{"model": {{}}}}, {str(path)!r})
"""
    child = subprocess.run([sys.executable, "-c", killed_mid_save], env=CHILD_ENV, cwd=REPO, timeout=120)
    assert child.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".last.pt.*.tmp")
    in_flight = tmp_path / f".last.pt.{os.getpid()}.x.tmp"  # as if another thread of this process were saving
    in_flight.write_bytes(b"")

    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    assert not stale.exists() and in_flight.exists()
    torch.testing.assert_close(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_full_disk_is_reported_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _save_that_dies(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))

    with pytest.raises(CheckpointError, match="no space left") as info:
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert str(path) in str(info.value) and "intact" in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class NotAStateDict:
    """Something only pickle can restore."""


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_that_needs_pickle_is_refused_and_runs_nothing(tmp_path):
    plain = tmp_path / "custom_class.pt"
    torch.save({"model": NotAStateDict()}, plain)
    with pytest.raises(CheckpointError, match="needs pickle") as info:
        load_checkpoint(plain)
    assert str(plain) in str(info.value) and "state_dict" in str(info.value)

    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": {}, "payload": RunsCodeWhenUnpickled(marker)}, hostile)
    for loader in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="needs pickle"):
            loader(hostile)
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/apply:pathlib.Path.touch"])
def test_yaml_config_with_python_tags_is_never_executed(tmp_path, tag):
    marker = tmp_path / "code_ran"
    path = tmp_path / "hostile.yaml"
    argument = f"touch {marker}" if "system" in tag else str(marker)
    path.write_text(f"train:\n  out_dir: {tag} [{argument!r}]\n")
    with pytest.raises((ConfigError, yaml.YAMLError)):
        load_config(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ data that rots mid-epoch




def _coco_config(tmp_path: Path, make_coco, out: str, **overrides):
    make_coco(tmp_path, split="train", n_images=6)
    root = make_coco(tmp_path, split="val", n_images=3)
    return root, tiny_config(tmp_path / out, **{"data.dataset": "coco", "data.root": str(root), **overrides})


def test_images_that_vanish_or_rot_mid_epoch_are_skipped_by_name(tmp_path, make_coco, monkeypatch, caplog):
    root, cfg = _coco_config(tmp_path, make_coco, "run", **{"train.batch_size": 2})
    paths = [Path(s.path) for s in build_source(cfg.data, "train").samples]
    val_gone = Path(build_source(cfg.data, "val").samples[0].path)
    fetch = TrainDataset.__getitem__
    fetched, damaged = [], []

    def fetch_then_damage(self, i):  # once the first batch is done, three files the epoch still needs go bad
        fetched.append(i)
        if len(fetched) == 3:
            gone, cut, garbage = (paths[j] for j in sorted(set(range(len(paths))) - set(fetched[:2]))[:3])
            gone.unlink()
            cut.write_bytes(cut.read_bytes()[:-200])  # cut short in the pixel data
            garbage.write_bytes(np.random.default_rng(0).bytes(1000))
            val_gone.write_bytes(b"")
            damaged.extend([gone, cut, garbage, val_gone])
        return fetch(self, i)

    monkeypatch.setattr(TrainDataset, "__getitem__", fetch_then_damage)
    caplog.set_level(logging.WARNING, logger="captioning")
    out = train(cfg)

    assert load_checkpoint(out / "last.pt")["progress"]["epoch"] == 1
    assert sorted(fetched) == list(range(6))  # the epoch went on over every image
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for path in damaged:
        assert str(path) in warnings, warnings


def test_an_image_cut_inside_its_header_is_reported_by_name(tmp_path, make_jpeg, caplog):
    path = make_jpeg(tmp_path / "cut.jpg", seed=1)
    path.write_bytes(path.read_bytes()[:300])  # Pillow fails in Image.open, before decoding
    source = CaptionSource([Sample(image_id=1, path=str(path), captions=["a photo"])])
    dataset = TrainDataset(ImageLoader(source, Preprocess(32, (0.5,) * 3, (0.5,) * 3)), [[[1, 2]]])
    batch = collate_train([dataset[0]])
    caplog.set_level(logging.WARNING, logger="captioning")
    assert not report_unreadable(batch)  # no image left in the batch
    assert str(path) in caplog.text


@PIL_WARNINGS
def test_a_loader_worker_names_an_unreadable_image_on_a_line_of_its_own(tmp_path, make_coco):
    """The message comes back with the batch and is logged above the progress bar: a worker printing it itself
    would continue the bar's line."""
    root, cfg = _coco_config(tmp_path, make_coco, "run", **{"train.batch_size": 2, "data.num_workers": 1})
    broken = Path(build_source(cfg.data, "train").samples[3].path)
    broken.write_bytes(b"not a jpeg")
    config = tmp_path / "config.yaml"
    save_config(cfg, config)
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--config", str(config)], capture_output=True,
                          text=True, env=CHILD_ENV, cwd=REPO, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = re.split(r"[\r\n]", done.stderr)
    named = [line for line in lines if str(broken) in line]
    assert named and all(line.startswith("skipping training image ") for line in named), named


def test_a_feature_cache_leaves_out_the_images_it_could_not_read(tmp_path, make_coco, caplog):
    cache = tmp_path / "features"
    root, cfg = _coco_config(tmp_path, make_coco, "run", **{"train.batch_size": 2, "data.feature_cache": str(cache),
                                                             "train.epochs": 2})
    bad = sorted((root / "train2017").glob("*.jpg"))[1]
    bad.write_bytes(b"not a JPEG")
    caplog.set_level(logging.WARNING, logger="captioning")
    train(cfg)
    assert json.loads((cache / "train.json").read_text())["unreadable"] == [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(str(bad) in w for w in warnings) == 1  # named once, by the extraction
    summary = "feature cache: 1 of the 6 train images could not be read"
    assert sum(w.startswith(summary) for w in warnings) == 1  # once per run, not per epoch
    caplog.clear()
    loader = FeatureLoader(cache, "train", {k: v for k, v in json.loads((cache / "train.json").read_text()).items()
                                            if k != "unreadable"})
    dataset = TrainDataset(loader, [[[1, 2]]] * 6)
    assert dataset[1] is None and dataset[0] is not None  # trained on as "no image", never as zeros
    assert caplog.text == ""  # reported when the cache was made and when a run starts, not per epoch


def test_annotation_files_that_are_cut_short_or_empty_are_named(tmp_path, make_coco):
    root, cfg = _coco_config(tmp_path, make_coco, "run")
    annotations = root / "annotations" / "captions_train2017.json"
    text = annotations.read_text()
    annotations.write_text(text[: len(text) // 2])  # a download that stopped halfway
    with pytest.raises(ValueError, match=f"{annotations}: not a COCO caption annotation file"):
        train(cfg)
    annotations.write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match="the train split of data.dataset 'coco' has no images with captions"):
        train(cfg)


def test_a_validation_split_without_a_readable_image_is_an_error_that_says_so(tmp_path, make_coco):
    root, cfg = _coco_config(tmp_path, make_coco, "run")
    for sample in build_source(cfg.data, "val").samples:
        Path(sample.path).write_bytes(b"")
    with pytest.raises(ValueError, match=r"none of the 3 images could be read \(each is named in a warning above\)"):
        train(cfg)


def test_an_unreadable_batch_still_counts_as_a_step(tmp_path, make_coco):
    root, cfg = _coco_config(tmp_path, make_coco, "run", **{"train.batch_size": 1})
    sorted((root / "train2017").glob("*.jpg"))[0].unlink()
    out = train(cfg)
    assert load_checkpoint(out / "last.pt")["progress"]["global_step"] == 6  # one step per sampler batch


# ----------------------------------------------------------------------------------------- malformed images


class Hang(BaseException):
    """Raised by the per-call alarm; a BaseException so that no `except Exception` in the code under test eats it."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise Hang(f"{what} still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (valid CRCs), so it can declare any size and depth; `rows` are the raw scanlines."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(rng: np.random.Generator, mode: str = "RGB", size: tuple[int, int] | None = None) -> Image.Image:
    w, h = size or (int(rng.integers(1, 72)), int(rng.integers(1, 72)))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


# (mode, format, save options) of the well-formed files the damaged ones are cut from
ENCODINGS = [("RGB", "JPEG", {}), ("L", "JPEG", {}), ("CMYK", "JPEG", {}), ("YCbCr", "JPEG", {}), ("RGB", "PNG", {}),
             ("RGBA", "PNG", {}), ("LA", "PNG", {}), ("P", "PNG", {}), ("1", "PNG", {}), ("I;16", "PNG", {}),
             ("RGB", "GIF", {}), ("RGB", "BMP", {}), ("RGBA", "WEBP", {}),
             ("RGB", "WEBP", {"lossless": True}), ("CMYK", "TIFF", {}), ("F", "TIFF", {}), ("I", "TIFF", {}),
             ("LAB", "TIFF", {}), ("RGBA", "TIFF", {}), ("RGB", "ICO", {}), ("RGB", "PPM", {})]
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif",
          "ICO": ".ico", "PPM": ".ppm"}


def _odd_files(rng: np.random.Generator) -> dict[str, bytes]:
    """Hand-made oddities: bombs, exotic depths and modes, wrong extensions, animations, strips, broken EXIF."""
    files = {f"huge_{w}x{h}.png": png_file(w, h, 8, 2, b"\x00" * 64)
             for w, h in [(100_000, 100_000), (65_535, 65_535), (10_000, 9_000), (1, 2**31 - 1), (0, 10),
                          (2**32 - 1, 1), (6_000, 6_000)]}
    jpeg = bytearray(_encode(_noise(rng, size=(16, 16)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65_000, 65_000)  # height, width in the frame header
    files["huge_frame.jpg"] = bytes(jpeg)
    files["huge_screen.gif"] = b"GIF89a" + struct.pack("<HH", 65_535, 65_535) + b"\x00\x00\x00;"
    files["rgb_16bit.png"] = png_file(5, 4, 16, 2, b"".join(b"\x00" + rng.bytes(5 * 6) for _ in range(4)))
    files["rgba_16bit.png"] = png_file(5, 4, 16, 6, b"".join(b"\x00" + rng.bytes(5 * 8) for _ in range(4)))
    files["la_16bit.png"] = png_file(5, 4, 16, 4, b"".join(b"\x00" + rng.bytes(5 * 4) for _ in range(4)))
    files["grey_2bit.png"] = png_file(8, 2, 2, 0, b"\x00\xab\xcd" * 2)
    files["bad_filter.png"] = png_file(4, 4, 8, 2, b"\x09" + b"\x00" * 51)
    files["short_data.png"] = png_file(40, 40, 8, 2, b"\x00" * 20)
    files["bad_colour_type.png"] = png_file(4, 4, 8, 7, b"\x00" * 52)
    files["bad_header.ppm"] = b"P6\n25\xbb 10\n255\n" + bytes(300)  # a byte flipped in the width
    files["signature_only.png"] = b"\x89PNG\r\n\x1a\n"
    files["marker_only.jpg"] = b"\xff\xd8\xff"
    files["header_only.gif"] = b"GIF89a"
    files["one_byte.jpg"] = b"\xff"
    files["empty.jpg"] = b""
    files["text.png"] = b"plain text with an image's extension\n"
    files["error_page.jpg"] = b"<!doctype html><html><body>404 not found</body></html>"
    files["png_named.jpg"] = _encode(_noise(rng), "PNG")
    files["jpeg_named.png"] = _encode(_noise(rng), "JPEG")
    files["one_pixel.png"] = _encode(_noise(rng, size=(1, 1)), "PNG")
    files["one_pixel.jpg"] = _encode(_noise(rng, size=(1, 1)), "JPEG")
    files["strip_10000x10.png"] = _encode(_noise(rng, size=(10_000, 10)), "PNG")
    files["strip_10x10000.jpg"] = _encode(_noise(rng, size=(10, 10_000)), "JPEG")
    frames = [_noise(rng, "P", (24, 24)) for _ in range(4)]
    files["animated.gif"] = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    files["animated.png"] = _encode(frames[0].convert("RGBA"), "PNG", save_all=True,
                                    append_images=[f.convert("RGBA") for f in frames[1:]])
    files["palette_transparent.png"] = _encode(frames[0], "PNG", transparency=0)
    files["palette_transparent.gif"] = _encode(frames[1], "GIF", transparency=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    files["exif_rotated.jpg"] = _encode(_noise(rng, size=(30, 10)), "JPEG", exif=exif.tobytes())
    exif[0x0112] = 99
    files["exif_bad_orientation.jpg"] = _encode(_noise(rng, size=(30, 10)), "JPEG", exif=exif.tobytes())
    plain = _encode(_noise(rng, size=(30, 10)), "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", 40) + b"Exif\x00\x00" + rng.bytes(32)
    files["exif_garbage.jpg"] = plain[:2] + app1 + plain[2:]
    return files


def malformed_files(folder: Path, seed: int = 0, n: int = 300) -> list[Path]:
    """The oddities above plus `n` seeded variants: well-formed, truncated, byte-flipped, random, spliced."""
    rng = np.random.default_rng(seed)
    files = _odd_files(rng)
    for i in range(n):
        mode, fmt, options = ENCODINGS[int(rng.integers(len(ENCODINGS)))]
        data = _encode(_noise(rng, mode), fmt, **options)
        kind, suffix = i % 5, SUFFIX[fmt]
        if kind == 0:
            files[f"valid_{i}_{mode.replace(';', '_')}{suffix}"] = data
        elif kind == 1:
            files[f"truncated_{i}{suffix}"] = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:
            flipped = bytearray(data)
            for j in rng.integers(0, len(data), int(rng.integers(1, 8))):
                flipped[j] = int(rng.integers(256))
            files[f"flipped_{i}{suffix}"] = bytes(flipped)
        elif kind == 3:
            files[f"random_{i}{suffix}"] = rng.bytes(int(rng.integers(1, 4096)))
        else:
            cut = int(rng.integers(0, len(data)))
            files[f"spliced_{i}{suffix}"] = data[:cut] + rng.bytes(int(rng.integers(0, 256))) + data[cut:]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def malformed(tmp_path_factory) -> list[Path]:
    return malformed_files(tmp_path_factory.mktemp("malformed"))


@PIL_WARNINGS
def test_open_image_on_malformed_files_returns_rgb_or_bad_image_error(malformed, tmp_path):
    outcomes = {"image": 0, "refused": 0}
    wrong = []
    for path in [*malformed, tmp_path / "missing.jpg", tmp_path]:
        try:
            with deadline(10, f"open_image({path.name})"):
                img = open_image(path)
        except BadImageError as e:
            outcomes["refused"] += 1
            if str(path) not in str(e):
                wrong.append(f"{path.name}: message without the path: {e}")
        except FileNotFoundError as e:
            if path.is_file() or str(path) not in str(e):
                wrong.append(f"{path.name}: FileNotFoundError for an existing file or without its path: {e}")
        except Exception as e:
            wrong.append(f"{path.name}: {type(e).__name__}: {e}")
        else:
            outcomes["image"] += 1
            pixels = np.asarray(img)
            if img.mode != "RGB" or pixels.dtype != np.uint8 or pixels.shape != (img.height, img.width, 3):
                wrong.append(f"{path.name}: mode {img.mode}, array {pixels.dtype} {pixels.shape}")
    assert not wrong, "\n".join(wrong)
    assert min(outcomes.values()) > 50, outcomes  # the corpus has plenty of both kinds


@PIL_WARNINGS
def test_open_image_reads_the_well_formed_oddities_as_rgb(malformed):
    by_name = {p.name: p for p in malformed}
    expected_sizes = {"one_pixel.png": (1, 1), "strip_10000x10.png": (10_000, 10), "strip_10x10000.jpg": (10, 10_000),
                      "exif_rotated.jpg": (10, 30), "animated.gif": (24, 24), "animated.png": (24, 24),
                      "rgb_16bit.png": (5, 4), "rgba_16bit.png": (5, 4), "la_16bit.png": (5, 4),
                      "grey_2bit.png": (8, 2), "palette_transparent.png": (24, 24), "png_named.jpg": None,
                      "jpeg_named.png": None}
    for name, size in expected_sizes.items():
        img = open_image(by_name[name])
        assert img.mode == "RGB", name
        if size is not None:
            assert img.size == size, name
    for name in ("huge_100000x100000.png", "huge_65535x65535.png", "huge_10000x9000.png", "huge_frame.jpg"):
        with pytest.raises(BadImageError, match="decompression bomb"):
            open_image(by_name[name])


@pytest.fixture(scope="module")
def demo_handler(trained_checkpoint):
    """(demo module, its captioner) when the demo's upload handler can be imported."""
    pytest.importorskip("gradio")
    demo = load_script("demo/app.py")
    if not hasattr(demo, "describe_photo"):
        pytest.skip("demo/app.py has no describe_photo handler")
    from captioning.inference import ImageCaptioner
    return demo, ImageCaptioner.from_checkpoint(trained_checkpoint, "cpu")


@PIL_WARNINGS
def test_demo_handler_on_malformed_uploads_shows_a_message_or_a_caption(malformed, demo_handler):
    demo, captioner = demo_handler
    readable = []
    for path in malformed:
        with contextlib.suppress(Exception):
            open_image(path)
            readable.append(path)
    captioned = set(readable[:: max(1, len(readable) // 10)])  # the model's share of the time stays small
    wrong = []
    for path in [p for p in malformed if p not in readable or p in captioned]:
        try:
            with deadline(20, f"describe_photo({path.name})"):
                photo, caption, rows, _ = demo.describe_photo(captioner, str(path), 1, 4)
        except Exception as e:
            wrong.append(f"{path.name}: {type(e).__name__}: {e}")
            continue
        if photo is None:
            if "caption-problem" not in caption or html.escape(path.name) not in caption:
                wrong.append(f"{path.name}: refused without naming the file: {caption}")
        elif photo.mode != "RGB" or not rows:
            wrong.append(f"{path.name}: photo mode {photo.mode}, {len(rows)} captions")
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------------------------------- config mistakes


def _edited_checkpoint(edit):
    """A mistake: loading the trained checkpoint saved again after edit(state)."""
    def mistake(tmp_path: Path, trained_checkpoint: Path) -> None:
        state = load_checkpoint(trained_checkpoint)
        edit(state)
        save_checkpoint(state, tmp_path / "edited.pt")
        load_model(tmp_path / "edited.pt")
    return mistake


def _double_hidden(state: dict) -> None:
    state["config"]["model"]["hidden_dim"] *= 2


def _config_file(tmp_path: Path, text: str) -> Path:
    (tmp_path / "bad.yaml").write_text(text)
    return tmp_path / "bad.yaml"


CONFIG_MISTAKES = {  # name -> (the mistake, the exception, words of the fix that the message must carry)
    "unknown-key": (lambda tmp, ckpt: load_config(None, ["train.lrr=1e-3"]), ConfigError, "train.lr"),
    "unknown-section": (lambda tmp, ckpt: load_config(None, ["trian.lr=1e-3"]), ConfigError, "train"),
    "unknown-key-in-file": (lambda tmp, ckpt: load_config(_config_file(tmp, "model:\n  hiden_dim: 8\n")),
                            ConfigError, "model.hidden_dim"),
    "wrong-type": (lambda tmp, ckpt: load_config(None, ["train.epochs=ten"]), ConfigError, "must be int"),
    "wrong-choice": (lambda tmp, ckpt: load_config(None, ["model.cell=transformer"]), ConfigError, "lstm"),
    "coco-without-root": (lambda tmp, ckpt: build_source(load_config(None, ["data.dataset=coco"]).data, "train"),
                          ValueError, "data.root"),
    "coco-root-missing": (lambda tmp, ckpt: build_source(
        load_config(None, ["data.dataset=coco", f"data.root={tmp / 'nowhere'}"]).data, "train"),
        FileNotFoundError, "Download http://images.cocodataset.org/annotations"),
    "flickr8k-root-missing": (lambda tmp, ckpt: build_source(
        load_config(None, ["data.dataset=flickr8k", f"data.root={tmp / 'nowhere'}"]).data, "train"),
        FileNotFoundError, "Flickr8k_text.zip"),
    "vocab-mismatch": (_edited_checkpoint(lambda state: state["vocab"]["itos"].append("zebra")), CheckpointError,
                       "vocabulary"),
    "weights-of-another-model": (_edited_checkpoint(_double_hidden), CheckpointError, "of another shape: "),
    "vocab-empty": (_edited_checkpoint(lambda state: state["vocab"].update(itos=[])), CheckpointError,
                    "its vocabulary is damaged"),
    "vocab-not-a-table": (_edited_checkpoint(lambda state: state.update(vocab="itos")), CheckpointError,
                          "its vocabulary is damaged"),
    "weights-not-finite": (_edited_checkpoint(lambda state: state["model"]["decoder.out.bias"].fill_(float("nan"))),
                           CheckpointError, "use an earlier checkpoint"),
    "config-not-a-table": (_edited_checkpoint(lambda state: state.update(config="model")), CheckpointError,
                           "its config is not a table of settings"),
}


@pytest.mark.parametrize("name", list(CONFIG_MISTAKES))
def test_config_mistakes_give_one_line_with_the_fix(tmp_path, trained_checkpoint, name):
    mistake, error, fix = CONFIG_MISTAKES[name]
    with pytest.raises(error) as info:
        mistake(tmp_path, trained_checkpoint)
    message = str(info.value)
    assert fix in message and "\n" not in message, message


def test_vocabulary_mismatch_is_refused_by_name(tmp_path, trained_checkpoint):
    with pytest.raises(CheckpointError) as info:
        CONFIG_MISTAKES["vocab-mismatch"][0](tmp_path, trained_checkpoint)
    assert str(tmp_path / "edited.pt") in str(info.value)


def test_train_script_rejects_a_bad_key_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--set", "train.lrr=1e-3",
                           f"train.out_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=CHILD_ENV,
                          cwd=REPO, timeout=120)
    assert done.returncode != 0
    assert "unknown config key 'train.lrr'" in done.stderr and "train.lr" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def _main_fails_cleanly(tmp_path: Path, argv: list[str]) -> str:
    """scripts/train.py's main() on `argv` -> its one-line exit message (SystemExit, not a traceback)."""
    script = load_script("scripts/train.py")
    with pytest.raises(SystemExit) as info:
        script.main(script.get_args_parser().parse_args(argv))
    assert isinstance(info.value.code, str) and "\n" not in info.value.code, info.value.code
    return info.value.code


@pytest.mark.parametrize("case", ["coco-root-missing", "coco-without-root", "malformed-yaml", "run-exists",
                                  "word-vectors-missing", "out-dir-under-a-file"])
def test_train_script_reports_data_and_file_mistakes_without_a_traceback(tmp_path, case):
    out = tmp_path / "run"
    argv = ["--set", f"train.out_dir={out}"]
    if case == "out-dir-under-a-file":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "run"
        argv = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--set", f"train.out_dir={out}",
                "data.num_train=16", "data.num_val=4", f"data.feature_cache={tmp_path / 'features'}"]
    elif case == "word-vectors-missing":
        argv += ["model.encoder_weights=null", f"model.word_vectors={tmp_path / 'glove.txt'}"]
    elif case == "coco-root-missing":
        argv += ["data.dataset=coco", f"data.root={tmp_path / 'nowhere'}"]
    elif case == "coco-without-root":
        argv += ["data.dataset=coco"]
    elif case == "malformed-yaml":
        argv = ["--config", str(_config_file(tmp_path, "train: {epochs: 3\n")), *argv]
    else:
        out.mkdir()
        (out / "last.pt").write_bytes(b"")
    message = _main_fails_cleanly(tmp_path, argv)
    assert message.startswith("error: ")
    if case == "word-vectors-missing":
        assert f"model.word_vectors {tmp_path / 'glove.txt'}: no such file" in message
    if case == "out-dir-under-a-file":
        assert message.startswith(f"error: train.out_dir {out} cannot be written (Not a directory); ")
