"""From a caption source to batches: preprocessing, per-epoch caption choice, collation, resumable sampling."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset, Sampler

from captioning.config import ConfigError, DataConfig
from captioning.data.sources import (
    BadImageError,
    CaptionSource,
    ReportedImageError,
    coco_source,
    flickr8k_source,
    karpathy_source,
)
from captioning.data.synthetic import SyntheticShapes
from captioning.vocab import PAD_ID, Vocabulary, tokenize

log = logging.getLogger(__name__)

# A loader maps (index, generator for augmentation) -> model input: an image (3, H, W) or cached features (N, C).
InputLoader = Callable[[int, torch.Generator | None], torch.Tensor]


def seed_of(*parts: int) -> int:
    """A seed that follows from `parts` alone (e.g. seed, epoch, image): hash of ints is stable across processes."""
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


def build_source(cfg: DataConfig, split: str) -> CaptionSource:
    """The configured dataset's split ('train', 'val' or 'test'); a split without images is a ValueError."""
    if cfg.dataset == "synthetic":
        n = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}[split]
        return SyntheticShapes(split, n, seed=0, image_size=cfg.synthetic_size)
    if cfg.dataset == "karpathy" and not (cfg.karpathy_json and (cfg.image_dir or cfg.root)):
        raise ConfigError("data.dataset=karpathy needs data.karpathy_json (dataset_coco.json, dataset_flickr8k.json or "
                          "dataset_flickr30k.json) and data.image_dir, the folder its image paths start from; see "
                          "the README's dataset section")
    if cfg.dataset != "karpathy" and not cfg.root:
        raise ConfigError(f"data.dataset={cfg.dataset} needs data.root, the folder of its annotation files; see the "
                          "README's dataset section")
    if cfg.dataset == "coco":
        source = coco_source(cfg.root, split, cfg.year, cfg.image_dir or None)
    elif cfg.dataset == "karpathy":
        source = karpathy_source(cfg.karpathy_json, cfg.image_dir or cfg.root, split, cfg.use_restval)
    else:
        source = flickr8k_source(cfg.root, split, cfg.image_dir or None)
    if not len(source):
        raise ValueError(f"the {split} split of data.dataset '{cfg.dataset}' has no images with captions; check "
                         "data.root and its annotation files (scripts/check_data.py lists what it finds)")
    if source.blank_captions:
        log.warning("the %s split's annotations hold %d blank captions; they are left out", split,
                    source.blank_captions)
    return source


class Preprocess:
    """PIL RGB image -> normalised (3, size, size) tensor, with an optional mild random resized crop (never a flip:
    it would swap "left" and "right"). The whole image is resized, so no centre crop cuts objects off."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size, self.mean, self.std = size, list(mean), list(std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None:
            w, h = image.size
            scale, aspect = torch.empty(2).uniform_(0.8, 1.0, generator=generator).tolist()
            cw, ch = round(w * scale), round(h * min(1.0, scale * (0.9 + 0.2 * aspect)))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            image = image.crop((left, top, left + cw, top + ch))
        x = TF.to_image(image)
        x = TF.resize(x, [self.size, self.size], antialias=True)
        x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, self.mean, self.std)  # (3, size, size)

    @classmethod
    def for_encoder(cls, encoder, image_size: int = 0) -> Preprocess:
        """The preprocessing that belongs with the encoder's weights; image_size 0 keeps their crop size."""
        return cls(image_size or encoder.image_size, encoder.mean, encoder.std)


class ImageLoader:
    """Sample i of a source -> preprocessed image; augmented when given a generator and `augment` is on. Without
    augmentation a JPEG is decoded at the smallest scale that covers the model's input size (open_image's min_size),
    as folder captioning and the demo decode it; a random crop takes the whole-size image, so that the crop is never
    enlarged."""

    def __init__(self, source: CaptionSource, preprocess: Preprocess, augment: bool = False):
        self.source, self.preprocess, self.augment = source, preprocess, augment

    def __call__(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        crop = generator if self.augment else None
        image = self.source.load_image(index, min_size=0 if crop is not None else self.preprocess.size)
        return self.preprocess(image, crop)


def encode_captions(source: CaptionSource, vocab: Vocabulary, max_len: int) -> list[list[list[int]]]:
    """For every image, each reference caption as <start> ... <end> ids (tokenised once, here)."""
    return [[vocab.encode(tokenize(c), max_len) for c in s.captions] for s in source.samples]


def build_vocab(source: CaptionSource, min_count: int) -> Vocabulary:
    return Vocabulary.build((tokenize(c) for s in source.samples for c in s.captions), min_count)


class TrainDataset(Dataset):
    """Item i: (input, `per_image` of image i's captions drawn for this epoch, i); an unreadable image yields the
    message naming it (None if reported already)."""

    def __init__(self, load: InputLoader, captions: list[list[list[int]]], per_image: int = 1, seed: int = 0):
        self.load, self.captions, self.per_image, self.seed = load, captions, per_image, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[torch.Tensor], int] | str | None:
        # Randomness depends on (seed, epoch, i) only, so a resumed run sees exactly the batches it would have seen.
        g = torch.Generator().manual_seed(seed_of(self.seed, self.epoch, i))
        refs = self.captions[i]
        picks = torch.randperm(len(refs), generator=g).tolist()
        chosen = [refs[picks[j % len(refs)]] for j in range(self.per_image)]
        try:
            x = self.load(i, g)
        except ReportedImageError:
            return None
        except (BadImageError, OSError) as e:
            return f"skipping training image {i}: {e}"
        return x, [torch.tensor(c) for c in chosen], i


def _readable(items: list) -> tuple[list, list[str]]:
    """A batch's items -> (those read, the messages naming those that could not be). A worker returns the message
    instead of printing it, which would land inside the main process's progress bar."""
    return [it for it in items if isinstance(it, tuple)], [it for it in items if isinstance(it, str)]


def report_unreadable(batch: dict) -> bool:
    """Warn of the batch's unreadable images -> whether any image of the batch was read."""
    for message in batch["skipped"]:
        log.warning(message)
    return "inputs" in batch


def collate_train(items: list) -> dict:
    """-> inputs (B, ...), captions (B*k, T) padded with <pad>, image_index (B*k,) row of each caption's image,
    index (B,) dataset index of each image, skipped: messages naming the unreadable images (alone when no image was
    read)."""
    items, skipped = _readable(items)
    if not items:
        return {"skipped": skipped}
    inputs = torch.stack([x for x, _, _ in items])
    caps = [c for _, cs, _ in items for c in cs]
    image_index = torch.tensor([b for b, (_, cs, _) in enumerate(items) for _ in cs])
    captions = torch.nn.utils.rnn.pad_sequence(caps, batch_first=True, padding_value=PAD_ID)
    index = torch.tensor([i for _, _, i in items])
    return {"inputs": inputs, "captions": captions, "image_index": image_index, "index": index, "skipped": skipped}


class EvalDataset(Dataset):
    """Item i: (input, i); an unreadable image yields the message naming it (None if reported already)."""

    def __init__(self, load: InputLoader, size: int):
        self.load, self.size = load, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | str | None:
        try:
            return self.load(i, None), i
        except ReportedImageError:
            return None
        except (BadImageError, OSError) as e:
            return f"skipping image {i}: {e}"


def collate_eval(items: list) -> dict:
    """-> inputs (B, ...), index (B,), skipped: messages naming the unreadable images (alone when none was read)."""
    items, skipped = _readable(items)
    if not items:
        return {"skipped": skipped}
    return {"inputs": torch.stack([x for x, _ in items]), "index": torch.tensor([i for _, i in items]),
            "skipped": skipped}


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices, a fixed permutation per (seed, epoch), sharded over `world_size` ranks like
    DistributedSampler, and able to start part-way through an epoch when a run resumes."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.shuffle, self.seed, self.rank, self.world_size = size, shuffle, seed, rank, world_size
        self.epoch, self.skip = 0, 0
        self.per_rank = -(-size // world_size)  # ceil: ranks get equal counts, a few indices repeat

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use `epoch`'s permutation; leave out this rank's first `skip` indices (already trained on)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        order = order.repeat(-(-self.per_rank * self.world_size // self.size))[: self.per_rank * self.world_size]
        return iter(order[self.rank::self.world_size][self.skip:].tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)  # skip overshoots by a partial last batch: the epoch is done

