"""Plot training curves (training loss, validation BLEU-4 and CIDEr per epoch) of one or more runs into an image.

    python scripts/plot_curves.py runs/flickr8k_attention runs/flickr8k_show_tell --out docs/flickr8k_curves.png

A run is a folder written by scripts/train.py (or its metrics.jsonl). A last line cut short by a run killed while
writing it is skipped with a warning. The validation panels name the decoding (train.val_beam_size in config.yaml);
when the runs differ in it, the legend does.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl (or the metrics.jsonl files)")
    p.add_argument("--out", default="curves.png", help="image file; its extension picks the format (png, pdf, svg)")
    return p


def read_epochs(path: Path) -> list[dict]:
    """The per-epoch rows of a metrics.jsonl, skipping a last line cut short; exits with a message on other damage."""
    if not path.is_file():
        sys.exit(f"error: {path.parent} has no metrics.jsonl; scripts/train.py writes it there after each epoch "
                 "(name a run folder)")
    lines = path.read_text(errors="replace").rstrip().splitlines()  # damaged bytes become a bad line, named below
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n < len(lines):
                sys.exit(f"error: {path} line {n} is not a JSON row ({e}); delete or repair that line")
            print(f"warning: {path}: skipped line {n}, cut short (the run was stopped while writing it)")
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    if not rows:
        sys.exit(f"error: {path} holds no epoch rows: the run stopped before its first epoch ended; "
                 "leave it out until it has trained an epoch")
    return rows


def val_beam(run: Path) -> int | None:
    """train.val_beam_size in the run's config.yaml; None without one."""
    path = run / "config.yaml"
    if not path.is_file():
        return None
    # only this key is read, not the whole config through load_config: an older run's keys may have been renamed
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        sys.exit(f"error: {path} is not valid YAML ({' '.join(str(e).split())}); repair or delete it")
    return cfg.get("train", {}).get("val_beam_size") if isinstance(cfg, dict) else None


def decoding(beam: int) -> str:
    return "greedy decoding" if beam == 1 else f"beam {beam}"


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.is_dir():
        sys.exit(f"error: --out {out} is a folder; name the image file, e.g. --out {out / 'curves.png'}")
    if out.suffix[1:].lower() not in FigureCanvasAgg.get_supported_filetypes():
        sys.exit(f"error: --out {out}: matplotlib cannot write {out.suffix or 'a file without an extension'}; "
                 "end the name in .png, .pdf or .svg")
    paths = [Path(run) if Path(run).is_file() else Path(run) / "metrics.jsonl" for run in args.runs]
    runs = [(path.parent, read_epochs(path), val_beam(path.parent)) for path in paths]
    beams = {beam for _, _, beam in runs}
    shared = f" ({decoding(beams.pop())})" if len(beams) == 1 and None not in beams else ""
    nan = float("nan")
    # self-critical epochs record the mean reward instead of a loss: no point there
    panels = [("training loss (cross-entropy epochs)", lambda r: r.get("train_loss", nan)),
              (f"validation BLEU-4{shared}", lambda r: r.get("val", {}).get("Bleu_4", nan)),
              (f"validation CIDEr{shared}", lambda r: r.get("val", {}).get("CIDEr", nan))]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    for run, rows, beam in runs:
        name = run.resolve().name  # "metrics.jsonl" or "." given inside the run folder still name it
        label = name if shared or beam is None else f"{name} ({decoding(beam)})"
        for ax, (_, metric) in zip(axes, panels):
            ax.plot([r["epoch"] + 1 for r in rows], [metric(r) for r in rows], marker="o", label=label)
    for ax, (title, _) in zip(axes, panels):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as e:
        sys.exit(f"error: --out {out}: cannot write it ({e}); choose another path")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
