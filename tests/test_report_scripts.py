"""scripts/plot_curves.py and check_data.py, run in-process on hand-written metrics.jsonl files and tiny datasets."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from conftest import load_script

from captioning.config import load_config, save_config

plot_curves, check_data = load_script("scripts/plot_curves.py"), load_script("scripts/check_data.py")


def _epoch_row(epoch: int, reward: bool = False) -> str:
    """One metrics.jsonl line as captioning/training.py writes it after an epoch."""
    val = {"Bleu_1": 0.5, "Bleu_2": 0.3, "Bleu_3": 0.2, "Bleu_4": 0.1 + epoch / 100, "ROUGE_L": 0.4,
           "CIDEr": 0.3 + epoch / 10}
    loss = "train_reward" if reward else "train_loss"
    return json.dumps({"epoch": epoch, "step": 10 * (epoch + 1), loss: 3.0 - epoch, "lr": 1e-3, "val": val,
                       "seconds": 12.5})


def _run(folder: Path, lines: list[str], val_beam_size: int | None = None) -> Path:
    """A run folder with these metrics.jsonl lines and, given a beam size, the config.yaml train.py writes."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
    if val_beam_size is not None:
        save_config(load_config(None, [f"train.val_beam_size={val_beam_size}"]), folder / "config.yaml")
    return folder


def _plot(*argv) -> plt.Figure:
    plot_curves.main(plot_curves.get_args_parser().parse_args([str(a) for a in argv]))
    return plt.gcf()


def _error(*argv) -> str:
    """The one-line message plot_curves exits with."""
    with pytest.raises(SystemExit) as exc:
        _plot(*argv)
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def _labels(fig: plt.Figure) -> list[str]:
    return fig.axes[1].get_legend_handles_labels()[1]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_plots_epoch_rows_of_several_runs_into_a_png(tmp_path):
    a = _run(tmp_path / "attention", [_epoch_row(0), _epoch_row(1), _epoch_row(2, reward=True)], val_beam_size=1)
    b = _run(tmp_path / "show_tell", [_epoch_row(0), json.dumps({"epoch": 1, "train_loss": 2.0})], val_beam_size=1)
    out = tmp_path / "new" / "folder" / "curves.png"  # a missing parent folder is created
    fig = _plot(a, b, "--out", out)
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert _labels(fig) == ["attention", "show_tell"]
    loss, bleu = fig.axes[0].lines[0].get_ydata(), fig.axes[1].lines[1].get_ydata()
    assert list(loss[:2]) == [3.0, 2.0] and loss[2] != loss[2]  # the self-critical epoch has no loss: NaN
    assert bleu[1] != bleu[1]  # a row without validation scores: NaN
    assert [ax.get_title() for ax in fig.axes] == ["training loss (cross-entropy epochs)",
                                                   "validation BLEU-4 (greedy decoding)",
                                                   "validation CIDEr (greedy decoding)"]


def test_only_epoch_rows_are_plotted(tmp_path):
    lines = [_epoch_row(0), json.dumps({"averaged_epochs": [0, 1], "val": {"Bleu_4": 0.9, "CIDEr": 0.9}}),
             _epoch_row(1)]
    run = _run(tmp_path / "run", lines)
    assert [row["epoch"] for row in plot_curves.read_epochs(run / "metrics.jsonl")] == [0, 1]
    fig = _plot(run, "--out", tmp_path / "c.png")
    assert list(fig.axes[2].lines[0].get_xdata()) == [1, 2]


def test_metrics_file_instead_of_its_folder(tmp_path):
    run = _run(tmp_path / "my_run", [_epoch_row(0)])
    fig = _plot(run / "metrics.jsonl", "--out", tmp_path / "c.png")
    assert (tmp_path / "c.png").is_file()
    assert _labels(fig) == ["my_run"]


def test_folder_without_metrics_is_an_error(tmp_path):
    (tmp_path / "empty_run").mkdir()
    message = _error(tmp_path / "empty_run", "--out", tmp_path / "c.png")
    assert str(tmp_path / "empty_run") in message and "scripts/train.py" in message
    assert not (tmp_path / "c.png").exists()


def test_empty_metrics_is_an_error(tmp_path):
    run = _run(tmp_path / "run", [])
    assert str(run / "metrics.jsonl") in _error(run, "--out", tmp_path / "c.png")


def test_cut_short_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    run = _run(tmp_path / "run", [_epoch_row(0), _epoch_row(1), _epoch_row(2)[:25]])
    fig = _plot(run, "--out", tmp_path / "c.png")
    assert f"warning: {run / 'metrics.jsonl'}: skipped line 3" in capsys.readouterr().out
    assert list(fig.axes[1].lines[0].get_xdata()) == [1, 2]


def test_cut_short_only_line_is_an_error(tmp_path):
    run = _run(tmp_path / "run", [_epoch_row(0)[:25]])
    assert "no epoch rows" in _error(run, "--out", tmp_path / "c.png")


def test_corrupt_middle_line_is_an_error_naming_it(tmp_path):
    run = _run(tmp_path / "run", [_epoch_row(0), "{not json", _epoch_row(2)])
    assert f"{run / 'metrics.jsonl'} line 2 " in _error(run, "--out", tmp_path / "c.png")


@pytest.mark.parametrize("name", ["curves.txt", "curves"])
def test_out_matplotlib_cannot_write_is_an_error(tmp_path, name):
    run = _run(tmp_path / "run", [_epoch_row(0)])
    message = _error(run, "--out", tmp_path / name)
    assert ".png, .pdf or .svg" in message
    assert not (tmp_path / name).exists()


def test_out_that_is_a_folder_is_an_error(tmp_path):
    run = _run(tmp_path / "run", [_epoch_row(0)])
    assert "is a folder" in _error(run, "--out", tmp_path)


def test_titles_name_the_validation_beam_from_config(tmp_path):
    a = _run(tmp_path / "a", [_epoch_row(0)], val_beam_size=3)
    b = _run(tmp_path / "b", [_epoch_row(0)], val_beam_size=3)
    fig = _plot(a, b, "--out", tmp_path / "c.png")
    assert fig.axes[1].get_title() == "validation BLEU-4 (beam 3)"
    assert _labels(fig) == ["a", "b"]


def test_labels_name_the_beam_when_runs_differ(tmp_path):
    a = _run(tmp_path / "a", [_epoch_row(0)], val_beam_size=1)
    b = _run(tmp_path / "b", [_epoch_row(0)], val_beam_size=3)
    c = _run(tmp_path / "c", [_epoch_row(0)])
    fig = _plot(a, b, c, "--out", tmp_path / "c.png")
    assert fig.axes[2].get_title() == "validation CIDEr"
    assert _labels(fig) == ["a (greedy decoding)", "b (beam 3)", "c"]


def test_no_config_names_no_decoding(tmp_path):
    fig = _plot(_run(tmp_path / "run", [_epoch_row(0)]), "--out", tmp_path / "c.png")
    assert fig.axes[1].get_title() == "validation BLEU-4"


def _check_data(*argv) -> int:
    return check_data.main(check_data.get_args_parser().parse_args([str(a) for a in argv]))


def test_check_data_loads_coco_and_flickr8k_and_lists_the_image_that_fails(make_coco, make_flickr8k, tmp_path, capsys):
    """scripts/check_data.py with its defaults on generated files laid out as the README lays out data/."""
    for split in ("train", "val"):
        make_coco(tmp_path, split=split, n_images=3)
    make_flickr8k(tmp_path)
    (tmp_path / "flickr8k" / "Flicker8k_Dataset" / "bad.jpg").write_bytes(b"not a jpeg")
    with open(tmp_path / "flickr8k" / "Flickr_8k.devImages.txt", "a") as f:
        f.write("bad.jpg\n")
    with open(tmp_path / "flickr8k" / "Flickr8k.token.txt", "a") as f:
        f.write("bad.jpg#0\tA broken file .\n")

    assert _check_data("--data-root", tmp_path) == 1
    out = capsys.readouterr().out
    assert "coco2017/val: 3 images, 16 captions" in out and "flickr8k/train: 4 images, 20 captions" in out
    assert "bad.jpg: not an image" in out
    assert out.strip().splitlines()[-1].startswith("check_data: 4/4 splits loaded, 13 images, 63 captions, 12/13")


def test_check_data_missing_coco_names_the_option(make_flickr8k, tmp_path, capsys):
    make_flickr8k(tmp_path)
    assert _check_data("--data-root", tmp_path) == 1
    out = capsys.readouterr().out
    assert "coco2017/val: FAILED to load" in out
    assert f"this script: --coco-dir (relative to --data-root) names the COCO folder, now {tmp_path}/coco" in out
    assert "check_data: 2/4 splits loaded" in out


def test_check_data_checks_only_the_datasets_named(make_flickr8k, tmp_path, capsys):
    make_flickr8k(tmp_path, image_dir="images")
    assert _check_data("--data-root", tmp_path, "--datasets", "flickr8k") == 1
    assert "--flickr8k-images (relative to --flickr8k-dir)" in capsys.readouterr().out
    assert _check_data("--data-root", tmp_path, "--datasets", "flickr8k", "--flickr8k-images", "images") == 0
    out = capsys.readouterr().out
    assert "coco" not in out
    assert out.strip().splitlines()[-1].startswith("check_data: 2/2 splits loaded")


@pytest.mark.parametrize("argv", [["--max-images", "-5"], ["--max-images", "0"], ["--show-failures", "-1"]])
def test_check_data_counts_below_their_minimum_are_usage_errors(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        check_data.get_args_parser().parse_args(["--data-root", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert f"argument {argv[0]}: must be at least" in capsys.readouterr().err
