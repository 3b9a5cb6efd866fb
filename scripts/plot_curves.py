"""Plot training curves (training loss, validation BLEU-4 and CIDEr per epoch) of one or more runs into a PNG.

    python scripts/plot_curves.py runs/flickr8k_attention runs/flickr8k_show_tell --out docs/flickr8k_curves.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default="curves.png")
    return p


def main(args: argparse.Namespace) -> None:
    # self-critical epochs record the mean reward instead of a loss: no point there
    panels = [("training loss (cross-entropy epochs)", lambda r: r.get("train_loss", float("nan"))),
              ("validation BLEU-4 (greedy decoding)", lambda r: r["val"]["Bleu_4"]),
              ("validation CIDEr (greedy decoding)", lambda r: r["val"]["CIDEr"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    for run in map(Path, args.runs):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r["epoch"] + 1 for r in rows]
        for ax, (_, value) in zip(axes, panels):
            ax.plot(epochs, [value(r) for r in rows], marker="o", label=run.name)
    for ax, (title, _) in zip(axes, panels):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
