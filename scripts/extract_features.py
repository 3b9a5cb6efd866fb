"""Run a config's frozen encoder over its train and val splits once and store the features for training.

    python scripts/extract_features.py --config configs/flickr8k_attention.yaml
    python scripts/extract_features.py --config configs/coco_attention.yaml --splits train val --set data.root=...

The cache goes to the config's data.feature_cache folder; train.py then reads it instead of running the encoder. A
split already cached with the same settings is kept, so a stopped extraction goes on where it stopped; one made with
other settings is refused, as train.py refuses it, unless --overwrite replaces it.
"""

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import torch

from captioning.config import ConfigError, at_least, load_config
from captioning.data.datasets import Preprocess, build_source
from captioning.data.features import FeatureLoader, cache_record, extract_features
from captioning.engine import Stopped, console_logging, resolve_device
from captioning.models.encoder import Encoder


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val", "test"])
    p.add_argument("--overwrite", action="store_true", help="replace a split's cache made with other settings")
    p.add_argument("--batch-size", type=at_least(1),
                   help="images per encoder forward (default: 64 on a GPU, 8 on a CPU)")
    return p


def main(args: argparse.Namespace) -> None:
    try:
        cfg = load_config(args.config, args.set)
        device = resolve_device(cfg.train.device)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if not cfg.data.feature_cache:
        sys.exit("error: the config has no data.feature_cache folder; add --set data.feature_cache=DIR")
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # a random encoder (encoder_weights null) as train.py's run draws it
    try:
        encoder = Encoder(m.encoder, m.encoder_weights, 0, m.grid_size)
        preprocess = Preprocess.for_encoder(encoder, cfg.data.image_size)
        encoder.check_input_size(preprocess.size)
        encoder.to(device)
        sources = {split: build_source(cfg.data, split) for split in args.splits}
    except (FileNotFoundError, ValueError) as e:  # ConfigError too
        sys.exit(f"error: {e}")
    folder = Path(cfg.data.feature_cache)
    for split, source in sources.items():
        record = cache_record(cfg, encoder, preprocess, source)
        try:
            FeatureLoader(folder, split, record)
        except FileNotFoundError:  # none yet
            pass
        except ValueError as e:  # made with other settings, or its record is damaged
            if not args.overwrite:
                sys.exit(f"error: {e}; or pass --overwrite to replace it")
            print(f"{split}: replacing the cache in {folder}, which was made with other settings")
        else:
            print(f"{split}: already cached in {folder} with these settings; kept")
            continue
        try:
            path = extract_features(encoder, source, preprocess, folder, split, record, device, args.batch_size,
                                    cfg.data.num_workers)
        except ValueError as e:  # the cache folder is a file, or no image of the split could be read
            sys.exit(f"error: {e}")
        except (Stopped, KeyboardInterrupt) as e:  # KeyboardInterrupt: a second Ctrl-C, which stops at once
            print(f"stopped: the {split} split was not cached (splits finished before it are kept); run the same "
                  "command again to go on", file=sys.stderr)
            raise SystemExit(128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT)) from None
        unreadable = len(json.loads((folder / f"{split}.json").read_text())["unreadable"])
        left_out = f" ({unreadable} unreadable, left out)" if unreadable else ""
        size = path.stat().st_size
        print(f"{split}: {len(source) - unreadable} images{left_out} -> {path} ({size / 1e6:.0f} MB, "
              f"{size / 1e3 / len(source):.0f} KB/image)")


if __name__ == "__main__":
    with console_logging(logging.WARNING):
        main(get_args_parser().parse_args())
