"""scripts/train.py, evaluate.py and extract_features.py end to end, in subprocesses, on tiny synthetic and COCO-format
data."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script

from captioning import engine
from captioning.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"dataset": "synthetic", "num_train": 16, "num_val": 8, "num_test": 8, "synthetic_size": 32,
             "image_size": 32, "min_word_count": 1, "num_workers": 0, "augment": False},
    "model": {"encoder": "resnet18", "encoder_weights": None, "embed_dim": 16, "hidden_dim": 32,
              "attention_dim": 16, "dropout": 0.0},
    "train": {"epochs": 1, "batch_size": 8, "max_decode_len": 12, "out_dir": "runs/should_not_be_used"},
}


train_script, evaluate_script = load_script("scripts/train.py"), load_script("scripts/evaluate.py")
caption_script = load_script("scripts/caption.py")


def _script(name: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run scripts/<name> with this interpreter; cwd is a temporary folder so nothing lands in the repository."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is as fast, and immune to busy cores
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A non-zero exit with a one-line message on stderr and no traceback."""
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "Traceback" not in result.stderr
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message


def _check_evaluation(out: Path, split: str, image_ids: list, beam_size: int) -> None:
    captions = json.loads((out / f"captions_{split}.json").read_text())
    assert isinstance(captions, list)
    assert all(set(c) == {"image_id", "caption"} and isinstance(c["caption"], str) for c in captions)
    assert sorted(c["image_id"] for c in captions) == sorted(image_ids)
    scores = json.loads((out / f"scores_{split}.json").read_text())
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"):
        assert isinstance(scores[name], float) and 0.0 <= scores[name] <= 10.0
    assert "METEOR" not in scores  # --no-meteor
    assert scores["images"] == len(image_ids) and scores["split"] == split and scores["beam_size"] == beam_size
    assert scores["unreadable_images"] == 0


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("scripts")
    config = _write_yaml(tmp / "tiny.yaml", TINY)
    run = tmp / "run"
    result = _script("train.py", "--config", config, "--set", f"train.out_dir={run}", "train.epochs=2", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_train_script_writes_a_run_folder(synthetic_run):
    run, result = synthetic_run
    for name in ("config.yaml", "vocab.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2  # --set wins over the file
    assert saved["model"]["hidden_dim"] == 32  # the file wins over the defaults
    assert saved["train"]["out_dir"] == str(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all("Bleu_4" in r["val"] for r in rows)
    assert "done: best Bleu_4" in result.stdout.strip().splitlines()[-1]
    assert not (run.parent / "runs").exists()


def test_evaluate_script_writes_coco_results_and_scores(synthetic_run, tmp_path):
    run, _ = synthetic_run
    result = _script("evaluate.py", "--checkpoint", run / "best.pt", "--split", "test", "--beam-size", "2",
                     "--no-meteor", "--num-workers", "0", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_evaluation(run, "test", list(range(TINY["data"]["num_test"])), beam_size=2)
    assert "8 test images, beam 2" in result.stdout


def test_train_script_with_an_unknown_key_exits_with_one_line(tmp_path):
    config = _write_yaml(tmp_path / "tiny.yaml", TINY)
    result = _script("train.py", "--config", config, "--set", "train.lrr=1e-3", f"train.out_dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    _assert_clean_error(result, "unknown config key 'train.lrr'")
    assert not (tmp_path / "run").exists()


def test_train_script_with_an_unknown_key_in_the_file(tmp_path):
    config = _write_yaml(tmp_path / "tiny.yaml", {**TINY, "model": {**TINY["model"], "hiden_dim": 8}})
    with pytest.raises(SystemExit) as info:
        train_script.main(train_script.get_args_parser().parse_args(["--config", str(config)]))
    assert info.value.code == f"error: {config}: unknown config key 'model.hiden_dim'; valid keys here: " + ", ".join(
        f"model.{name}" for name in ModelConfig.__dataclass_fields__)


@pytest.mark.parametrize("script", [train_script, evaluate_script], ids=["train", "evaluate"])
def test_every_set_flag_applies(script):
    # `--set a=1 --set b=2` must not silently drop a=1 (it does with argparse's default "store" action).
    argv = ["--set", "data.root=/a", "data.year=2014", "--set", "data.num_workers=0"]
    if script is evaluate_script:
        argv += ["--checkpoint", "x.pt"]
    assert script.get_args_parser().parse_args(argv).set == ["data.root=/a", "data.year=2014", "data.num_workers=0"]


@pytest.mark.parametrize("option, value", [("--max-len", "0"), ("--beam-size", "0"), ("--batch-size", "-2"),
                                           ("--num-workers", "-1"), ("--max-len", "ten")])
@pytest.mark.parametrize("script", [caption_script, evaluate_script], ids=["caption", "evaluate"])
def test_counts_out_of_range_are_a_usage_error_naming_the_option(script, option, value, capsys):
    argv = ["--checkpoint", "x.pt", *(["photos"] if script is caption_script else [])]
    with pytest.raises(SystemExit) as exit_info:
        script.get_args_parser().parse_args([*argv, option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err
    args = script.get_args_parser().parse_args([*argv, option, "1"])
    assert getattr(args, option[2:].replace("-", "_")) == 1


def test_benchmark_runs_and_its_batched_beam_search_gives_the_captions_of_one_image_at_a_time(tmp_path):
    """scripts/benchmark.py at quick sizes: it exits non-zero when the batched beam search it times gives other
    captions than the same search one image at a time, and ends with the summary line of every area it ran."""
    result = _script("benchmark.py", "beam", "train", "--quick", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "captions identical      : 8/8 " in result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary (cpu, ") and "beam " in summary, summary
    assert "(1/image)" in summary and "(5/image)" in summary, summary


@pytest.mark.skipif(not engine.has_cpu_bf16(), reason="benchmark.py --bf16 needs a CPU with bf16 matrix units")
def test_benchmark_train_under_bf16_also_times_the_cached_steps_in_fp32(tmp_path):
    """What train.cpu_bf16 buys is printed beside the bf16 figures, for both captions-per-image settings."""
    result = _script("benchmark.py", "train", "--quick", "--bf16", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("cached features in fp32 :") == 2, result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert "train.cpu_bf16 " in summary and summary.count("(5/image)") == 2, summary


def test_evaluate_script_with_a_missing_checkpoint_exits_with_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "best.pt"
    result = _script("evaluate.py", "--checkpoint", missing, "--no-meteor", "--device", "cpu", cwd=tmp_path)
    _assert_clean_error(result, str(missing), "not found")


def test_evaluate_script_refuses_settings_it_would_not_use(synthetic_run, tmp_path):
    run, _ = synthetic_run
    for flags, message in [(["--set", "model.hidden_dim=8"], "--set changes data.* keys only"),
                           (["--device", "gpu"], "unknown device 'gpu'")]:
        result = _script("evaluate.py", "--checkpoint", run / "best.pt", "--no-meteor", *flags, cwd=tmp_path)
        _assert_clean_error(result, message)


def test_evaluate_script_on_a_split_it_cannot_read_or_an_out_that_is_a_file(synthetic_run, make_coco, tmp_path):
    run, _ = synthetic_run
    root = make_coco(tmp_path, split="val", n_images=3)
    for image in (root / "val2017").iterdir():
        image.write_bytes(b"not a jpeg")
    result = _script("evaluate.py", "--checkpoint", run / "best.pt", "--no-meteor", "--split", "val", "--set",
                     "data.dataset=coco", f"data.root={root}", "data.year=2017", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == ("error: val split: none of the 3 images could be read (each is "
                                                      "named in a warning above)")
    (tmp_path / "a_file").write_text("")
    result = _script("evaluate.py", "--checkpoint", run / "best.pt", "--no-meteor", "--out", tmp_path / "a_file",
                     cwd=tmp_path)
    _assert_clean_error(result, "is a file; name a folder")
    result = _script("evaluate.py", "--checkpoint", run / "best.pt", "--no-meteor", "--out",
                     tmp_path / "a_file" / "eval", cwd=tmp_path)  # refused before decoding, not after
    _assert_clean_error(result, "a_file/eval cannot hold the captions and scores (Not a directory)")


@pytest.mark.parametrize("full_at", ["captions", "scores"])
def test_evaluate_script_on_a_full_disk_prints_the_scores_and_keeps_the_earlier_files(synthetic_run, tmp_path,
                                                                                     monkeypatch, capsys, full_at):
    run, _ = synthetic_run
    earlier = {"captions_test.json": "earlier captions", "scores_test.json": "earlier scores"}
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    write_text = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        if path.parent != tmp_path or full_at not in path.name:
            return write_text(path, text, *args, **kwargs)
        path.open("w").close()  # opened, and so emptied, before the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    argv = ["--checkpoint", str(run / "best.pt"), "--split", "test", "--no-meteor", "--num-workers", "0",
            "--device", "cpu", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=rf"{full_at}_test\.json: No space left on device; the scores are printed"):
        evaluate_script.main(evaluate_script.get_args_parser().parse_args(argv))
    assert "Bleu_4 " in capsys.readouterr().out
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == earlier  # both as they were, no temp file left


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "x"])
def test_evaluate_script_refuses_a_length_penalty_that_is_not_a_finite_number(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.get_args_parser().parse_args(["--checkpoint", "x.pt", "--length-penalty", value])
    assert exit_info.value.code == 2
    assert "argument --length-penalty: " in capsys.readouterr().err
    args = evaluate_script.get_args_parser().parse_args(["--checkpoint", "x.pt", "--length-penalty", "-0.5"])
    assert args.length_penalty == -0.5


def test_evaluate_script_counts_the_images_it_could_not_read(synthetic_run, make_coco, tmp_path):
    run, _ = synthetic_run
    root = make_coco(tmp_path, split="val", n_images=4)
    bad = sorted((root / "val2017").iterdir())[1]
    bad.write_bytes(b"not a jpeg")
    result = _script("evaluate.py", "--checkpoint", run / "best.pt", "--no-meteor", "--split", "val", "--num-workers",
                     "0", "--out", tmp_path / "eval", "--set", "data.dataset=coco", f"data.root={root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert bad.name in result.stderr
    assert "warning: 1 of the 4 val images could not be read" in result.stdout
    scores = json.loads((tmp_path / "eval" / "scores_val.json").read_text())
    assert (scores["images"], scores["unreadable_images"]) == (3, 1)
    assert scores["data"]["dataset"] == "coco" and scores["data"]["root"] == str(root)  # what was scored
    assert len(json.loads((tmp_path / "eval" / "captions_val.json").read_text())) == 3
    strict = _script("evaluate.py", "--checkpoint", run / "best.pt", "--no-meteor", "--split", "val",
                     "--num-workers", "0", "--out", tmp_path / "eval", "--strict", "--set", "data.dataset=coco",
                     f"data.root={root}", cwd=tmp_path)
    assert strict.returncode == 1 and "warning: 1 of the 4 val images could not be read" in strict.stdout


def test_train_and_evaluate_on_a_coco_format_dataset(make_coco, tmp_path):
    root = make_coco(tmp_path, split="train", n_images=6)
    assert make_coco(tmp_path, split="val", n_images=4) == root
    config = _write_yaml(tmp_path / "coco.yaml", {
        "data": {**{k: v for k, v in TINY["data"].items() if not k.startswith(("num_", "synthetic"))},
                 "dataset": "coco", "root": str(root), "year": 2017},
        "model": TINY["model"],
        "train": {**TINY["train"], "out_dir": str(tmp_path / "run")},
    })
    train_result = _script("train.py", "--config", config, cwd=tmp_path)
    assert train_result.returncode == 0, train_result.stderr[-3000:]
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())["itos"]
    assert "photo" in vocab and "table" in vocab

    result = _script("evaluate.py", "--checkpoint", tmp_path / "run" / "best.pt", "--split", "val", "--beam-size", "2",
                     "--no-meteor", "--num-workers", "0", "--device", "cpu", "--out", tmp_path / "eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    annotations = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    _check_evaluation(tmp_path / "eval", "val", [im["id"] for im in annotations["images"]], beam_size=2)


def test_extract_features_script_caches_each_split_once_and_refuses_what_training_would(tmp_path):
    config = _write_yaml(tmp_path / "tiny.yaml", TINY)
    cache = tmp_path / "features"
    result = _script("extract_features.py", "--config", config, "--set", f"data.feature_cache={cache}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == ["train.json", "train.npy", "val.json", "val.npy"]
    made = (cache / "train.npy").stat().st_mtime_ns
    again = _script("extract_features.py", "--config", config, "--set", f"data.feature_cache={cache}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: already cached" in again.stdout and "val: already cached" in again.stdout
    assert (cache / "train.npy").stat().st_mtime_ns == made
    # a run of the same config trains from this cache without extracting
    run = _script("train.py", "--config", config, "--set", f"data.feature_cache={cache}",
                  f"train.out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (cache / "train.npy").stat().st_mtime_ns == made

    other = ["--set", f"data.feature_cache={cache}", "data.image_size=48"]
    _assert_clean_error(_script("extract_features.py", "--config", config, *other, cwd=tmp_path),
                        "was made with other settings", "'image_size': (32, 48)", "pass --overwrite to replace it")
    assert (cache / "train.npy").stat().st_mtime_ns == made  # refused: the cache is untouched
    replaced = _script("extract_features.py", "--config", config, *other, "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "train: replacing the cache" in replaced.stdout
    assert json.loads((cache / "train.json").read_text())["image_size"] == 48

    (tmp_path / "a_file").write_text("")
    for flags, message in [([f"data.feature_cache={tmp_path / 'a_file'}"], "is a file; name a folder"),
                           ([f"data.feature_cache={cache}", "model.trainable_layers=1"], "needs a frozen encoder"),
                           ([f"data.feature_cache={cache}", "model.encoder=alexnet", "data.image_size=16"],
                            "data.image_size 16 is too small for model.encoder alexnet")]:
        _assert_clean_error(_script("extract_features.py", "--config", config, "--set", *flags, cwd=tmp_path),
                            message)


def test_extract_features_script_counts_the_images_it_left_out(make_coco, tmp_path):
    root = make_coco(tmp_path, split="val", n_images=3)
    sorted((root / "val2017").iterdir())[0].write_bytes(b"not a jpeg")
    cache = tmp_path / "features"
    result = _script("extract_features.py", "--config", _write_yaml(tmp_path / "tiny.yaml", TINY), "--splits", "val",
                     "--set", "data.dataset=coco", f"data.root={root}", "data.year=2017", f"data.feature_cache={cache}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    size = (cache / "val.npy").stat().st_size  # decimal units, as the README's sizes per image
    assert f"val: 2 images (1 unreadable, left out) -> {cache / 'val.npy'} ({size / 1e6:.0f} MB, " \
           f"{size / 1e3 / 3:.0f} KB/image)" in result.stdout


def test_evaluate_script_scores_the_model_run_in_bf16(synthetic_run, tmp_path, monkeypatch):
    run, _ = synthetic_run
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # bf16 runs on any CPU, only slowly
    decoded = []
    predict = engine.predict
    monkeypatch.setattr(engine, "predict", lambda *a, **k: decoded.append(k["cpu_bf16"]) or predict(*a, **k))
    argv = ["--checkpoint", str(run / "best.pt"), "--split", "test", "--no-meteor", "--num-workers", "0",
            "--device", "cpu", "--bf16", "--out", str(tmp_path)]
    report = evaluate_script.main(evaluate_script.get_args_parser().parse_args(argv))
    assert decoded == [True] and report["bf16"] is True
    assert report["images"] == TINY["data"]["num_test"] and 0.0 <= report["Bleu_4"] <= 1.0
