"""Plot training curves (train loss, validation BLEU-4 and CIDEr per epoch) of one or more runs into a PNG.

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
    fig, (loss_ax, bleu_ax, cider_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    for run in map(Path, args.runs):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r["epoch"] + 1 for r in rows]
        loss_ax.plot(epochs, [r["train_loss"] for r in rows], marker="o", label=run.name)
        bleu_ax.plot(epochs, [r["val"]["Bleu_4"] for r in rows], marker="o", label=run.name)
        cider_ax.plot(epochs, [r["val"]["CIDEr"] for r in rows], marker="o", label=run.name)
    loss_ax.set(title="training loss", xlabel="epoch")
    bleu_ax.set(title="validation BLEU-4 (greedy decoding)", xlabel="epoch")
    cider_ax.set(title="validation CIDEr (greedy decoding)", xlabel="epoch")
    for ax in (loss_ax, bleu_ax, cider_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
