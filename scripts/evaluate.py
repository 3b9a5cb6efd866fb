"""Score a trained captioner on a dataset split with the COCO caption metrics.

    python scripts/evaluate.py --checkpoint runs/flickr8k_attention/best.pt --split test --beam-size 3
    python scripts/evaluate.py --checkpoint best.pt --split val --set data.root=/data/coco   # data moved

Writes <out>/captions_<split>.json (COCO results format: image_id, caption) and <out>/scores_<split>.json (the
scores with the decoding and data settings that produced them), replacing those of an earlier evaluation of the split.
Images that cannot be read are named in warnings, left out of the scores and counted in the scores file
(unreadable_images) and the last lines printed; with --strict the exit status is then 1.
"""

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from captioning.checkpoint import CheckpointError
from captioning.config import ConfigError, at_least, finite, load_config
from captioning.data.datasets import EvalDataset, ImageLoader, Preprocess, build_source, collate_eval
from captioning.decoding import check_beam_size
from captioning.engine import check_cpu_bf16, console_logging, evaluate, leave_signals_to_main, resolve_device
from captioning.files import check_writable, write_whole
from captioning.models import load_model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by scripts/train.py")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--beam-size", type=at_least(1), default=3)
    p.add_argument("--max-len", type=at_least(1), default=20)
    p.add_argument("--length-penalty", type=finite, default=0.0, help="divide beam scores by length**this")
    p.add_argument("--no-repeat-ngram", type=at_least(0), default=3, metavar="N",
                   help="never repeat an N-gram within a caption (0 = allow repeats)")
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--num-workers", type=at_least(0), default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true",
                   help="score the model run in bfloat16 on a CPU with bf16 matrix units (Intel AMX), as "
                        "caption.py --bf16 runs it")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (the slowest metric; needs Java)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's data settings, e.g. data.root=/elsewhere/coco")
    p.add_argument("--out", help="folder for the captions and scores (default: the checkpoint's folder)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 if any image could not be read (the scores cover only the others)")
    return p


def main(args: argparse.Namespace) -> dict:
    try:
        device = resolve_device(args.device)
        if args.bf16:
            check_cpu_bf16(device)
        model, cfg = load_model(args.checkpoint, device)
        check_beam_size(args.beam_size, len(model.vocab))
        ignored = [item for item in args.set if not item.startswith("data.")]
        if ignored:
            raise ConfigError(f"--set {' '.join(ignored)}: evaluation takes the model and decoding from the checkpoint "
                              "and the options above; --set changes data.* keys only")
        cfg = load_config(None, args.set, base=cfg.to_dict())
        source = build_source(cfg.data, args.split)
        out = Path(args.out or Path(args.checkpoint).parent)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; name a folder for the captions and scores")
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:  # found now, not after every image is decoded
        check_writable(out)
    except OSError as e:
        sys.exit(f"error: --out {out} cannot hold the captions and scores ({e.strerror}); name another folder")
    preprocess = Preprocess.for_encoder(model.encoder, cfg.data.image_size)
    dataset = EvalDataset(ImageLoader(source, preprocess), len(source))
    loader = DataLoader(dataset, args.batch_size, collate_fn=collate_eval, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=leave_signals_to_main)
    try:
        scores, predictions = evaluate(model, loader, [s.captions for s in source.samples], device, args.beam_size,
                                       args.max_len, args.length_penalty, meteor=not args.no_meteor,
                                       no_repeat_ngram=args.no_repeat_ngram, cpu_bf16=args.bf16)
    except ValueError as e:  # no image of the split could be read
        sys.exit(f"error: {args.split} split: {e}")
    results = [{"image_id": source.samples[i].image_id, "caption": c} for i, c in sorted(predictions.items())]
    unreadable = len(source) - len(results)
    report = {"checkpoint": str(args.checkpoint), "split": args.split, "images": len(results),
              "unreadable_images": unreadable, "beam_size": args.beam_size, "max_len": args.max_len,
              "length_penalty": args.length_penalty, "no_repeat_ngram": args.no_repeat_ngram, "bf16": args.bf16,
              "data": cfg.to_dict()["data"], **scores}
    names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    print("  ".join(f"{n} {scores[n]:.4f}" for n in names if n in scores))  # first: a failed write keeps them
    try:
        write_whole({out / f"captions_{args.split}.json": json.dumps(results, indent=1),
                     out / f"scores_{args.split}.json": json.dumps(report, indent=2)})
    except OSError as e:  # a full disk, most likely
        sys.exit(f"error: {e.filename}: {e.strerror}; the scores are printed above, and an earlier evaluation's "
                 f"captions and scores in {out} are as they were")
    for note in scores.get("notes", []):
        print(f"note: {note}")
    if unreadable:
        print(f"warning: {unreadable} of the {len(source)} {args.split} images could not be read (each named "
              f"above in a 'skipping image' line); the scores cover the other {len(results)}")
    print(f"{len(results)} {args.split} images, beam {args.beam_size}: captions and scores in {out}")
    if args.strict and unreadable:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    with console_logging(logging.WARNING):
        try:
            main(get_args_parser().parse_args())
        except KeyboardInterrupt:  # the captions and scores are written once every image is scored
            print("stopped: no captions or scores were written; run the same command again", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None
