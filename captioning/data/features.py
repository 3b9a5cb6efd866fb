"""Encoder feature cache: run a frozen encoder over a split once, then train the decoder from disk.

One split is two files: `<split>.npy`, a (num_images, N, C) array memory-mapped on read, and `<split>.json`, the
encoder, a digest of its weights and the preprocessing that produced it, and which images could not be read. A cache
whose record does not match the run is refused, so a decoder never trains on features from another backbone, other
weights (a random encoder of another seed) or another resolution. Both files are written to temporary names
and renamed into place, so an interrupted extraction never leaves a cache that looks complete, and a stopped one
removes its temporary files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioning.config import Config, ConfigError
from captioning.data.datasets import EvalDataset, ImageLoader, Preprocess, collate_eval, report_unreadable
from captioning.data.sources import CaptionSource, ReportedImageError
from captioning.engine import StopFlag, Stopped, leave_signals_to_main
from captioning.files import is_full_disk
from captioning.models.encoder import Encoder


def weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights and buffers: equal digests, equal outputs (an encoder's features, a model's
    captions)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def cache_record(cfg: Config, encoder: Encoder, preprocess: Preprocess, source: CaptionSource) -> dict[str, Any]:
    """What makes features valid: backbone, weights, grid, preprocessing, and which images in which order."""
    ids = [str(s.image_id) for s in source.samples]
    return {"encoder": cfg.model.encoder, "weights": cfg.model.encoder_weights,
            "weights_digest": weights_digest(encoder), "grid_size": cfg.model.grid_size,
            "image_size": preprocess.size, "mean": list(preprocess.mean), "std": list(preprocess.std),
            "synthetic_size": cfg.data.synthetic_size if cfg.data.dataset == "synthetic" else None,
            "jpeg_draft": True,  # JPEGs decoded at the smallest scale covering image_size (open_image's min_size)
            "dtype": cfg.data.feature_dtype, "num_images": len(ids), "first_ids": ids[:3], "last_ids": ids[-3:]}


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of a file written through a memory map: the map itself reserves none, so a full disk
    would end the process with SIGBUS at some row; here it is an OSError (ENOSPC) before the first row."""
    if hasattr(os, "posix_fallocate"):  # Linux; elsewhere a full disk is found by the writes
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


@torch.no_grad()
def extract_features(encoder: Encoder, loader_source: CaptionSource, preprocess: Preprocess, folder: str | Path,
                     split: str, record: dict[str, Any], device: torch.device, batch_size: int | None = None,
                     num_workers: int = 2) -> Path:
    """Encode every image of the split into folder/<split>.npy (+ .json). Row i always belongs to image i; an
    unreadable image (the loader warns) gets zeros, and its index is listed in the record so that training skips it.
    SIGTERM or Ctrl-C stops after the batch at hand with Stopped, leaving no file of the split behind; so does a full
    disk, with a ValueError naming the folder (the array's space is reserved before the first row is written).

    batch_size None: 64 images per forward on a GPU, 8 on a CPU, where larger batches push the activations out of
    the caches (MobileNetV2 at 320 px in channels_last on 2 cores: 25 ms per image at 8, 43 ms at 32, loading
    included)."""
    batch_size = batch_size or (64 if device.type == "cuda" else 8)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"data.feature_cache {folder} is a file; name a folder for the feature cache")
    folder.mkdir(parents=True, exist_ok=True)
    encoder = encoder.eval()
    dataset = EvalDataset(ImageLoader(loader_source, preprocess), len(loader_source))
    loader = DataLoader(dataset, batch_size, collate_fn=collate_eval, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=leave_signals_to_main)
    dtype = np.dtype(record["dtype"])
    tmp, meta_tmp = folder / f".{split}.npy.tmp", folder / f".{split}.json.tmp"
    array, read = None, np.zeros(len(dataset), dtype=bool)
    try:  # a stopped or failed extraction leaves no temp file behind
        with StopFlag() as stop:
            for batch in tqdm(loader, desc=f"features {split}", dynamic_ncols=True):
                if report_unreadable(batch):
                    grid, _ = encoder(batch["inputs"].to(device, non_blocking=True))  # (B, N, C)
                    if array is None:
                        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                          shape=(len(dataset), *grid.shape[1:]))
                        _reserve(tmp)
                    array[batch["index"].numpy()] = grid.float().cpu().numpy().astype(dtype)
                    read[batch["index"].numpy()] = True
                if stop.signal is not None:
                    raise Stopped(stop.signal)
        if array is None:
            raise ValueError(f"none of the {len(dataset)} images of the {split} split could be read (each is named in "
                             "a warning above); nothing to cache")
        array.flush()
        del array
        meta_tmp.write_text(json.dumps({**record, "unreadable": np.flatnonzero(~read).tolist()}, indent=1))
        os.replace(tmp, folder / f"{split}.npy")
        os.replace(meta_tmp, folder / f"{split}.json")  # the record last: it marks the cache complete
    except OSError as e:
        if not is_full_disk(e):
            raise
        raise ValueError(f"no space left for the {split} split's feature cache in {folder} ({e.strerror}); free "
                         "space there or set data.feature_cache to a folder on another disk") from None
    finally:
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)
    return folder / f"{split}.npy"


def _rebuild(folder: Path, split: str) -> str:
    """How to have a split's cache made again: a split without both files is extracted at the next run."""
    return (f"delete {split}.npy and {split}.json in {folder} (that split is extracted again), or point "
            "data.feature_cache elsewhere")


def _open_features(path: Path, record: dict[str, Any]) -> np.ndarray:
    """Memory-map a cached array, checked against its record: one (N, C) row of the record's dtype per image. A file cut
    short, overwritten or copied from another split is refused here, not in the middle of an epoch."""
    array, problem = None, None
    with open(path, "rb") as f:
        magic = f.read(len(np.lib.format.MAGIC_PREFIX))
    if magic != np.lib.format.MAGIC_PREFIX:  # numpy would try it as a pickle and advise allow_pickle
        problem = "an empty file" if not magic else "not a .npy array"
    else:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as e:  # cut short: "mmap length is greater than file size", a broken header
            problem = str(e) or type(e).__name__
    if array is not None and (array.ndim != 3 or array.dtype != np.dtype(record["dtype"])):
        problem = f"rows of shape {array.shape[1:]} and dtype {array.dtype}, not (N, C) of {record['dtype']}"
    elif array is not None and len(array) != record["num_images"]:
        problem = f"{len(array)} rows for the {record['num_images']} images of its record"
    if problem:
        raise ConfigError(f"feature cache {path} is damaged ({problem}); {_rebuild(path.parent, path.stem)}")
    return array


class FeatureLoader:
    """Sample i -> its cached features (N, C), read from a memory map (pages are loaded on demand)."""

    def __init__(self, folder: str | Path, split: str, record: dict[str, Any]):
        folder = Path(folder)
        meta_path, array_path = folder / f"{split}.json", folder / f"{split}.npy"
        if not meta_path.is_file() or not array_path.is_file():
            raise FileNotFoundError(f"no feature cache for split '{split}' in {folder}; make it with "
                                    f"scripts/extract_features.py (train.py does this when data.feature_cache is set)")
        try:
            stored = json.loads(meta_path.read_text())
        except ValueError as e:  # cut short or overwritten by something else
            raise ConfigError(f"feature cache record {meta_path} is damaged ({e}); {_rebuild(folder, split)}") from None
        self.unreadable = set(stored.pop("unreadable", []))  # images the extraction could not read
        if stored != record:
            diff = {k: (stored.get(k), v) for k, v in record.items() if stored.get(k) != v}
            raise ConfigError(f"feature cache {array_path} was made with other settings (cached, wanted): {diff}; "
                              f"{_rebuild(folder, split)}")
        self.array, self.meta_path = _open_features(array_path, stored), meta_path

    def __len__(self) -> int:
        return len(self.array)

    def __call__(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if index in self.unreadable:
            raise ReportedImageError(f"image {index} could not be read when the feature cache was made "
                                     f"({self.meta_path}); replace the file and delete the cache to include it")
        return torch.from_numpy(np.array(self.array[index]))  # (N, C), copied out of the memory map
