"""Caption image files, folders and lists of paths with a trained checkpoint.

    python scripts/caption.py --checkpoint runs/quickstart/<run>/best.pt photos/ --out captions.jsonl
    python scripts/caption.py --checkpoint best.pt photos/ more.txt --format csv --n-best 3
    python scripts/caption.py --checkpoint best.pt val2014/ --out captions_val2014.json   # COCO results format

Folders are searched recursively (--flat: top level only); a .txt file lists image files or folders, one per line,
relative to the list file. Results are flushed after every batch, and a second run with the same checkpoint and
decoding options skips the images the output already holds (--overwrite starts afresh). Unreadable files are
reported and skipped; the exit code is non-zero only with --strict. COCO output keeps its progress in
<out stem>.progress.jsonl and writes the JSON array when a run ends.
"""

import argparse
import signal
import sys
from pathlib import Path

from captioning.batch import FORMATS, IMAGE_SUFFIXES, caption_files, expand_inputs, format_for, open_writer
from captioning.checkpoint import CheckpointError
from captioning.config import at_least, os_error_line
from captioning.data.features import weights_digest
from captioning.data.sources import DEFAULT_MAX_PIXELS
from captioning.decoding import check_beam_size
from captioning.engine import Stopped
from captioning.inference import ImageCaptioner

DEFAULT_OUT = {"jsonl": "captions.jsonl", "csv": "captions.csv", "coco": "captions.json"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by scripts/train.py")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, or .txt lists of them")
    p.add_argument("--out", help="results file (default: captions.jsonl, .csv or .json after --format)")
    p.add_argument("--format", choices=FORMATS, help="default: from --out's extension (.csv, .json = coco), else jsonl")
    p.add_argument("--beam-size", type=at_least(1), default=3)
    p.add_argument("--max-len", type=at_least(1), default=20, help="most words per caption")
    p.add_argument("--n-best", type=at_least(1), default=1,
                   help="also write the N best captions with scores (N <= beam)")
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--num-workers", type=at_least(0), default=2, help="DataLoader processes decoding images")
    p.add_argument("--flat", action="store_true", help="take only the images directly inside each folder")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any image failed")
    p.add_argument("--overwrite", action="store_true", help="start the output afresh instead of resuming it")
    p.add_argument("--attention-dir", help="save each image's per-word attention heat maps here (attention models)")
    p.add_argument("--max-pixels", type=at_least(1), default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (decompression bombs); raise it only for trusted files")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action="store_true",
                   help="run the model in bfloat16 on a CPU with bf16 matrix units (Intel AMX, Xeon 4th generation "
                        "and later): 2-3x faster, a few captions change by a word")
    return p


def report_unreadable_folder(error: OSError) -> None:
    print(f"failed: {error.filename}: cannot read the folder ({error.strerror})", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.n_best <= args.beam_size:
        sys.exit(f"error: --n-best must be between 1 and --beam-size ({args.beam_size}), got {args.n_best}")
    fmt = args.format or (format_for(args.out) if args.out else "jsonl")
    out = Path(args.out or DEFAULT_OUT[fmt])
    if out.suffix.lower() in IMAGE_SUFFIXES:  # --overwrite would replace a photo with captions
        sys.exit(f"error: --out {out} names an image file; write the captions to a .jsonl, .csv or .json file")
    unreadable = []
    try:
        if args.attention_dir:
            maps = Path(args.attention_dir).resolve()
            for folder in (Path(i) for i in args.inputs if Path(i).is_dir()):
                if folder.resolve().is_relative_to(maps):
                    raise ValueError(f"--attention-dir {args.attention_dir} holds the input folder {folder}, so the "
                                     "maps would be captioned next time; name a folder outside it")
        paths = list(expand_inputs(args.inputs, not args.flat, on_error=unreadable.append, skip=args.attention_dir))
        if not paths and not unreadable:
            raise ValueError(f"no image files in {' '.join(args.inputs)} (JPEG, PNG, WebP, ... by their extension"
                             f"{'; --flat takes only the top level of a folder' if args.flat else ''})")
        captioner = ImageCaptioner.from_checkpoint(args.checkpoint, args.device, args.bf16)
        check_beam_size(args.beam_size, len(captioner.model.vocab))
        if args.attention_dir and not captioner.has_attention:
            raise ValueError(f"--attention-dir needs a model with attention; {args.checkpoint} has none")
        # What makes the captions, so a resume with others is refused. The device is left out so that a run can
        # move between machines, although a GPU's mixed precision may change a word as --bf16 does.
        settings = {"checkpoint": args.checkpoint, "weights": weights_digest(captioner.model),
                    "beam_size": args.beam_size, "max_len": args.max_len, "n_best": args.n_best, "bf16": args.bf16}
        writer = open_writer(out, fmt, args.n_best, args.overwrite, settings)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a missing input, an output or list file that cannot be read or written
        sys.exit(os_error_line(e))
    for error in unreadable:
        report_unreadable_folder(error)
    try:
        with writer:
            summary = caption_files(captioner, paths, writer, args.beam_size, args.max_len, args.n_best,
                                    args.batch_size, args.num_workers, args.max_pixels, args.attention_dir)
    except (Stopped, KeyboardInterrupt) as e:  # KeyboardInterrupt: a second Ctrl-C, which stops at once
        print(f"stopped: the captions written so far are kept in {writer.path}; run the same command again to caption "
              "the rest", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT)
    except OSError as e:  # the results file or an attention map could not be written
        sys.exit(f"error: {e.filename or writer.path}: {e.strerror or e}; the captions written so far are kept in "
                 f"{writer.path}")
    summary.failed += len(unreadable)
    print(f"{summary} -> {out}")
    if summary.without_map:
        print(f"note: {summary.without_map} images captioned by an earlier run into {out} have no attention map "
              f"(maps are drawn as images are captioned); to draw theirs, caption them again into another --out")
    return 1 if args.strict and summary.failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops a run as Ctrl-C does
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except KeyboardInterrupt:  # while the model loads: nothing is written yet
        print("stopped before captioning began", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
