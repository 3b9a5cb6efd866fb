"""Caption sources: the on-disk formats of COCO, Karpathy's split files and Flickr8k, read into one list of Samples.

A source knows which images belong to a split and their raw reference captions; it knows nothing of tokens or
tensors. Every file-based image goes through `open_image`, so odd modes, rotations and broken files are handled in
one place.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools.coco import COCO

from captioning.files import not_utf8_error

try:  # HEIC/HEIF photos (phone cameras) open once the optional pillow-heif plugin is installed
    from pillow_heif import register_heif_opener
except ImportError:
    HEIF_HINT = "; HEIC/HEIF photos need the pillow-heif plugin: pip install pillow-heif"
else:
    register_heif_opener()
    HEIF_HINT = ""

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


@dataclass
class Sample:
    """One image and its reference captions."""

    image_id: int | str  # COCO: image id; Karpathy: cocoid if present else imgid; Flickr8k: file name
    path: str | None  # image file; None for images rendered in memory (synthetic)
    captions: list[str]  # raw references, exactly as written in the dataset


class BadImageError(ValueError):
    """An image file that cannot be used: empty, not an image, truncated/corrupt, or too large."""


class ReportedImageError(BadImageError):
    """An image already reported as unusable (by the feature extraction): skipped without another warning."""


class ImageTooLargeError(BadImageError):
    """An image above the pixel limit, refused from its header before it is decoded."""


DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0) -> Image.Image:
    """Decode any image Pillow reads into 8-bit RGB, fully loaded and detached from the file.

    EXIF orientation is applied; animations give their first frame; alpha is composited on white; 16-bit
    greyscale is scaled to 0..255. Raises BadImageError (naming the file and the reason) for empty, non-image,
    truncated or corrupt files and for images above `max_pixels` (checked from the header, before decoding).

    With `min_size`, for callers that shrink the image to min_size x min_size anyway, a JPEG is decoded at 1/2, 1/4
    or 1/8 of its size (Pillow's draft mode, as Image.thumbnail uses it) where both sides stay at least min_size
    pixels. A 4032x3024 photo then decoded in a third of the time on a 2-core CPU (39 against 118 ms at 224).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise BadImageError(f"{path}: empty file")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses twice its own limit outright; a caller's larger one wins
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice its limit; the explicit max_pixels check below replaces it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:  # Pillow refuses twice its own limit before the header is read
            raise ImageTooLargeError(f"{path}: decompression bomb: more than twice the limit of {max_pixels} pixels "
                                     "(raise the limit, such as caption.py's --max-pixels, only for trusted "
                                     "files)") from e
        except UnidentifiedImageError as e:
            hint = HEIF_HINT if path.suffix.lower() in (".heic", ".heif") else ""
            raise BadImageError(
                f"{path}: not an image (Pillow cannot identify the format or read its header){hint}") from e
        except FileNotFoundError:
            raise
        except Exception as e:  # Pillow's plugins raise OSError, ValueError, SyntaxError... on damaged headers
            raise BadImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{path}: decompression bomb: {width}x{height} pixels exceeds the limit of {max_pixels} "
                    "(raise the limit, such as caption.py's --max-pixels, only for trusted files)"
                )
            if min_size:
                img.draft(None, (min_size, min_size))  # only JPEG's loader acts on it
            try:
                img.load()  # decode now, so truncation surfaces here and not in a DataLoader worker later
                ImageOps.exif_transpose(img, in_place=True)
                return _to_rgb(img)  # always a new image, so closing the file below leaves it intact
            # Pillow's decoders raise many types for malformed data (OSError, SyntaxError, struct.error, ...).
            except Exception as e:
                raise BadImageError(f"{path}: truncated or corrupt image data ({type(e).__name__}: {e})") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to a new 8-bit RGB image."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)  # (H, W)
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling. 16-bit files arrive as 'I;16' or as
        # 32-bit 'I'; an 'I' image whose values all fit in 0..255 is already 8-bit data. A floating-point ('F') image
        # of values in 0..1 (scientific TIFFs) is scaled to 0..255.
        if img.mode == "F" and values.max(initial=0) <= 1:
            values = values * 255
        elif img.mode != "F" and (img.mode != "I" or values.max(initial=0) > 255):
            values = values / 257  # 65535 -> 255, 257 * k -> k
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # mode L
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class CaptionSource:
    """A list of Samples plus how to load sample i's image; blank_captions counts the empty or whitespace-only
    captions left out when the annotation files were read."""

    def __init__(self, samples: list[Sample], blank_captions: int = 0):
        self.samples, self.blank_captions = samples, blank_captions

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int, min_size: int = 0) -> Image.Image:
        """Sample i's image as 8-bit RGB; min_size as in open_image."""
        path = self.samples[i].path
        if path is None:
            raise ValueError(f"sample {i} has no image file; a source of in-memory images must override load_image")
        return open_image(path, min_size=min_size)


def _require_file(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. {fix}")


def _require_dir(path: Path, what: str, fix: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} is not a folder. {fix}")


def _read_text(path: Path) -> str:
    """A text file as UTF-8 (a byte-order mark is dropped); anything else is a ValueError naming the file and line."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8_error(path, path.read_bytes()) from None


def _check_entries(path: Path, entries: object, where: str, keys: dict[str, type], optional: tuple[str, ...] = ()
                   ) -> None:
    """Each of `entries` (the file's list at `where`) must be an object holding `keys` with values of their types
    (`optional` ones only where present); a ValueError names the file, the entry (index, and id) and the key."""
    if not isinstance(entries, list):
        raise ValueError(f"{path}: '{where}' must be a list, got {type(entries).__name__}; the file is damaged or not "
                         "in this dataset's format")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {where}[{i}] must be an object, got {entry!r}; the file is damaged or not in "
                             "this dataset's format")
        for key, kind in keys.items():
            value = entry.get(key)
            if (key in entry or key not in optional) and (not isinstance(value, kind) or isinstance(value, bool)):
                entry_id = next((f" ({k} {entry[k]!r})" for k in ("id", "imgid") if k in entry), "")
                problem = "has no" if key not in entry else f"has {value!r} as"
                raise ValueError(f"{path}: {where}[{i}]{entry_id} {problem} '{key}' ({kind.__name__} expected); the "
                                 "file is damaged or not in this dataset's format")


def _without_blank(samples: list[Sample], path: Path, split: str) -> CaptionSource:
    """Leave out blank captions (counted), then the images left without one; a split of blank captions only is an
    error naming the file."""
    kept, blank = [], 0
    for s in samples:
        captions = [c for c in s.captions if c.strip()]
        blank += len(s.captions) - len(captions)
        if captions:
            kept.append(Sample(s.image_id, s.path, captions))
    if blank and not kept:
        raise ValueError(f"{path}: all {blank} captions of the {split} split are blank; fix or replace the file")
    return CaptionSource(kept, blank)


def coco_source(root: str | Path, split: str, year: int = 2017, image_dir: str | Path | None = None) -> CaptionSource:
    """COCO captions: root/annotations/captions_{split}{year}.json, images in root/{split}{year}/ (or image_dir).

    Samples are sorted by image id; images without captions are left out.
    """
    if split == "test":
        raise ValueError(
            "COCO's test images have no public captions (they are scored on the evaluation server only); "
            "to evaluate on held-out captioned images use the Karpathy split: data.dataset=karpathy"
        )
    if split not in ("train", "val"):
        raise ValueError(f"COCO split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    ann_path = root / "annotations" / f"captions_{split}{year}.json"
    _require_file(
        ann_path,
        "COCO caption annotations",
        f"Download http://images.cocodataset.org/annotations/annotations_trainval{year}.zip and unzip it into {root}.",
    )
    image_dir = Path(image_dir) if image_dir is not None else root / f"{split}{year}"
    _require_dir(
        image_dir,
        "COCO images",
        f"Download http://images.cocodataset.org/zips/{split}{year}.zip and unzip it into {root}, "
        f"or set data.image_dir (--set data.image_dir=DIR) to the folder holding the {split}{year} JPEGs.",
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = COCO(str(ann_path))
    except UnicodeDecodeError:
        raise not_utf8_error(ann_path, ann_path.read_bytes()) from None
    except (ValueError, AssertionError, KeyError, TypeError) as e:  # not JSON, or not COCO's layout
        raise ValueError(f"{ann_path}: not a COCO caption annotation file ({type(e).__name__}: {e}); download "
                         f"annotations_trainval{year}.zip again") from None
    _check_entries(ann_path, coco.dataset.get("images", []), "images", {"file_name": str})
    _check_entries(ann_path, coco.dataset.get("annotations", []), "annotations", {"caption": str})
    samples = [
        Sample(
            image_id=img_id,
            path=str(image_dir / coco.imgs[img_id]["file_name"]),
            captions=[ann["caption"] for ann in coco.imgToAnns[img_id]],
        )
        for img_id in sorted(coco.imgs)
        if coco.imgToAnns[img_id]
    ]
    return _without_blank(samples, ann_path, split)


def karpathy_source(
    json_path: str | Path, image_root: str | Path, split: str, use_restval: bool = True
) -> CaptionSource:
    """Karpathy's split file (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json).

    Image paths are image_root/filepath/filename (only the COCO file has `filepath`). With `use_restval`, the
    train split also takes COCO's 'restval' images (the usual ~113k-image training set).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"Karpathy split must be 'train', 'val' or 'test', got {split!r}")
    json_path, image_root = Path(json_path), Path(image_root)
    _require_file(json_path, "Karpathy split file", f"It comes from {KARPATHY_URL}; set data.karpathy_json "
                   "(--set data.karpathy_json=FILE) to its path.")
    _require_dir(
        image_root,
        "image root",
        "Set data.image_dir (--set data.image_dir=DIR) to the folder holding train2014/ and val2014/ for COCO, or "
        "to the Flickr image folder.",
    )
    text = _read_text(json_path)
    try:
        data = json.loads(text)
    except ValueError as e:  # not JSON
        raise ValueError(f"{json_path}: not a Karpathy split file ({e}); download {KARPATHY_URL} again") from None
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{json_path}: not a Karpathy split file (expected a JSON object with an 'images' list)")
    images = data["images"]
    _check_entries(json_path, images, "images", {"imgid": int, "cocoid": int, "split": str, "filepath": str,
                                                 "filename": str, "sentences": list}, optional=("cocoid", "filepath"))
    for i, img in enumerate(images):
        _check_entries(json_path, img["sentences"], f"images[{i}].sentences", {"raw": str})
    wanted = {split, "restval"} if split == "train" and use_restval else {split}
    samples = [
        Sample(
            image_id=img.get("cocoid", img["imgid"]),
            path=str(image_root / img.get("filepath", "") / img["filename"]),
            captions=[sentence["raw"] for sentence in img["sentences"]],
        )
        for img in images
        if img["split"] in wanted
    ]
    for folder in sorted({Path(s.path).parent for s in samples}):  # a few folders at most (train2014, val2014)
        _require_dir(folder, "image folder", f"{json_path.name} expects it under data.image_dir {image_root}; set "
                    "data.image_dir (--set data.image_dir=DIR) to the folder that holds it.")
    return _without_blank(samples, json_path, split)


def flickr8k_source(root: str | Path, split: str, image_dir: str | Path | None = None) -> CaptionSource:
    """Flickr8k in its original distribution: Flickr8k.token.txt plus the Flickr_8k.{train,dev,test}Images.txt lists.

    split is 'train', 'val' (the dev list) or 'test'. Images default to root/Flicker8k_Dataset (sic, the official
    zip's folder name). Token lines for images outside the split list are ignored.
    """
    if split not in FLICKR8K_SPLIT_FILES:
        raise ValueError(f"Flickr8k split must be one of {sorted(FLICKR8K_SPLIT_FILES)}, got {split!r}")
    root = Path(root)
    token_path = root / "Flickr8k.token.txt"
    split_path = root / FLICKR8K_SPLIT_FILES[split]
    _require_file(token_path, "Flickr8k caption file", "Set data.root (--set data.root=DIR) to the folder unzipped "
                  "from Flickr8k_text.zip; it holds the caption file and the split lists.")
    _require_file(split_path, f"Flickr8k {split} split list", f"It comes in Flickr8k_text.zip with {token_path.name}; "
                  f"unzip the whole archive into {root}.")
    image_dir = Path(image_dir) if image_dir is not None else root / "Flicker8k_Dataset"
    _require_dir(image_dir, "Flickr8k images", "Set data.image_dir (--set data.image_dir=DIR) to the folder unzipped "
                                                     "from Flickr8k_Dataset.zip.")

    names = [line.strip() for line in _read_text(split_path).splitlines() if line.strip()]
    captions: dict[str, list[str]] = defaultdict(list)
    wanted = set(names)
    for lineno, line in enumerate(_read_text(token_path).split("\n"), 1):  # line ends are "\n" once read
        if not line:
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            raise ValueError(f"{token_path}:{lineno}: expected '<image>#<n><TAB><caption>', got {line!r}")
        name = key.rsplit("#", 1)[0]
        if name in wanted:
            captions[name].append(caption)
    missing = [name for name in names if name not in captions]
    if missing:
        raise ValueError(
            f"{len(missing)} images of {split_path.name} have no captions in {token_path.name} "
            f"(first: {missing[:3]}); the two files do not belong together"
        )
    samples = [Sample(image_id=name, path=str(image_dir / name), captions=captions[name]) for name in names]
    return _without_blank(samples, token_path, split)
