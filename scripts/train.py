"""Train a captioner.

    python scripts/train.py --config configs/quickstart.yaml
    python scripts/train.py --config configs/coco_attention.yaml --set train.batch_size=128 data.root=data/coco
    python scripts/train.py --resume runs/coco_attention/last.pt
    torchrun --nproc_per_node=4 scripts/train.py --config configs/coco_attention.yaml
"""

import argparse
import logging
import sys
from pathlib import Path

from captioning.checkpoint import CheckpointError, load_checkpoint
from captioning.config import ConfigError, load_config, os_error_line
from captioning.engine import console_logging
from captioning.training import train


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file overriding the defaults in captioning/config.py")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. train.lr=1e-3 model.cell=gru (wins over the YAML file)")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue the run saved in CHECKPOINT (usually RUN/last.pt) with its own config; "
                        "--set still applies, e.g. train.epochs=30")
    return p


def main(args: argparse.Namespace) -> None:
    if args.resume and args.config:
        sys.exit("error: --resume continues with the config saved in the checkpoint; drop --config (--set still "
                 "applies)")
    try:
        base = None
        if args.resume:  # the run goes on in the checkpoint's folder, wherever the run folder has moved
            base = load_checkpoint(args.resume)["config"]
            base["train"]["out_dir"] = str(Path(args.resume).parent)
        cfg = load_config(None if args.resume else args.config, args.set, base)
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    try:
        train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")  # ValueError: data files in the wrong format, each named in its message
    except OSError as e:  # a missing data file, a run folder that cannot be written
        sys.exit(os_error_line(e))


if __name__ == "__main__":
    with console_logging(logging.INFO):
        main(get_args_parser().parse_args())
