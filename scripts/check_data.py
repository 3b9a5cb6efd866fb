"""Load the caption data under --data-root through the project's own loaders and report what is there.

    python scripts/check_data.py                                        # data/coco and data/flickr8k
    python scripts/check_data.py --datasets flickr8k --max-images 200   # one dataset, 200 images per split

Expects COCO in <data-root>/coco (annotations/captions_{train,val}<year>.json, {train,val}<year>/) and Flickr8k in
<data-root>/flickr8k (Flickr8k.token.txt, Flickr_8k.{train,dev}Images.txt, and the images in Flicker8k_Dataset/, the
official zip's spelling); other folder names are set with --coco-dir, --flickr8k-dir and --flickr8k-images. Prints per
split the image and caption counts, the blank captions left out, captions per image, mean caption length in tokens and
the images that fail to open; exits with status 1 if any split fails to load (one whose captions are all blank does)
or any image fails to open.
"""

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from captioning.config import at_least
from captioning.data.sources import BadImageError, CaptionSource, coco_source, flickr8k_source
from captioning.vocab import tokenize


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path("data"), help="folder holding the datasets (default: data)")
    p.add_argument("--datasets", nargs="+", choices=("coco", "flickr8k"), default=["coco", "flickr8k"],
                   help="which datasets to check (default: both)")
    p.add_argument("--coco-dir", default="coco", help="COCO root, relative to --data-root (default: coco)")
    p.add_argument("--coco-year", type=int, choices=(2014, 2017), default=2017, help="COCO release (default: 2017)")
    p.add_argument("--flickr8k-dir", default="flickr8k",
                   help="Flickr8k root, relative to --data-root (default: flickr8k)")
    p.add_argument("--flickr8k-images", default="Flicker8k_Dataset",
                   help="Flickr8k image folder, relative to --flickr8k-dir (default: Flicker8k_Dataset)")
    p.add_argument("--max-images", type=at_least(1), default=None, help="open at most this many images per split")
    p.add_argument("--show-failures", type=at_least(0), default=10,
                   help="list at most this many failed images per split")
    return p


def spread(values: list[int]) -> str:
    return f"mean {statistics.mean(values):.2f} (min {min(values)}, max {max(values)})"


def check_source(name: str, build: Callable[[], CaptionSource], paths_hint: str, max_images: int | None,
                 show: int) -> dict:
    """Load one split, print its statistics and open its images; returns counts for the summary.

    paths_hint names this script's options for the split's folders; it follows a missing-file message, whose own fix
    names train.py's settings (the loaders serve both)."""
    try:
        source = build()
    except (FileNotFoundError, ValueError) as e:
        print(f"{name}: FAILED to load: {e}")
        if isinstance(e, FileNotFoundError):
            print(f"  this script: {paths_hint}")
        return {"loaded": False, "images": 0, "captions": 0, "opened": 0, "bad": 0}
    per_image = [len(s.captions) for s in source.samples]
    lengths = [len(tokenize(c)) for s in source.samples for c in s.captions]
    print(f"{name}: {len(source)} images, {sum(per_image)} captions")
    if source.blank_captions:
        print(f"  blank captions left out: {source.blank_captions}")
    if source.samples:
        print(f"  captions per image: {spread(per_image)}")
        print(f"  caption length in tokens: {spread(lengths)}")
        print(f"  first: {source.samples[0].image_id} {source.samples[0].captions[0]!r}")

    count = len(source) if max_images is None else min(max_images, len(source))
    failures, widths, heights = [], [], []
    for i in tqdm(range(count), desc=f"opening {name}", leave=False):
        try:
            img = source.load_image(i)
        except (BadImageError, FileNotFoundError) as e:
            failures.append(str(e))
            continue
        widths.append(img.width)
        heights.append(img.height)
    if widths:
        print(f"  images opened: {len(widths)}/{count}, width {min(widths)}..{max(widths)}, "
              f"height {min(heights)}..{max(heights)}")
    print(f"  images that failed to open: {len(failures)}")
    for message in failures[:show]:
        print(f"    {message}")
    return {"loaded": True, "images": len(source), "captions": sum(per_image), "opened": count, "bad": len(failures)}


def main(args: argparse.Namespace) -> int:
    coco_root = args.data_root / args.coco_dir
    flickr_root = args.data_root / args.flickr8k_dir
    flickr_images = flickr_root / args.flickr8k_images
    coco_hint = f"--coco-dir (relative to --data-root) names the COCO folder, now {coco_root}"
    flickr_hint = (f"--flickr8k-dir (relative to --data-root) names the folder of the token file and split lists, "
                   f"now {flickr_root}; --flickr8k-images (relative to --flickr8k-dir) the image folder, now "
                   f"{flickr_images}")
    year = args.coco_year
    checks = {}
    if "coco" in args.datasets:
        for split in ("val", "train"):
            checks[f"coco{year}/{split}"] = (lambda split=split: coco_source(coco_root, split, year), coco_hint)
    if "flickr8k" in args.datasets:
        for split in ("train", "val"):
            checks[f"flickr8k/{split}"] = (
                lambda split=split: flickr8k_source(flickr_root, split, image_dir=flickr_images), flickr_hint)
    results = [check_source(name, build, hint, args.max_images, args.show_failures)
               for name, (build, hint) in checks.items()]
    not_loaded = sum(not r["loaded"] for r in results)
    bad = sum(r["bad"] for r in results)
    print(
        f"check_data: {len(results) - not_loaded}/{len(results)} splits loaded, "
        f"{sum(r['images'] for r in results)} images, {sum(r['captions'] for r in results)} captions, "
        f"{sum(r['opened'] for r in results) - bad}/{sum(r['opened'] for r in results)} images opened, "
        f"{bad} bad -> {'OK' if not (not_loaded or bad) else 'PROBLEMS'}"
    )
    return 1 if not_loaded or bad else 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
