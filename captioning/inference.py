"""Images -> captions with a trained checkpoint; shared by the demo and the folder-captioning CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from captioning.data.datasets import Preprocess
from captioning.decoding import decode
from captioning.engine import autocast, resolve_device
from captioning.models import Captioner, load_model


@dataclass
class Caption:
    text: str
    score: float  # log-probability (length-normalised if asked)
    words: list[str]
    nbest: list[tuple[str, float]]  # (caption, score), best first; the first is this caption
    attention: torch.Tensor | None  # (len(words), side, side) grid weights per word; None without attention


class ImageCaptioner:
    def __init__(self, model: Captioner, preprocess: Preprocess, device: torch.device):
        self.model, self.preprocess, self.device = model.eval(), preprocess, device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> ImageCaptioner:
        dev = resolve_device(device)
        model, cfg = load_model(path, dev)
        return cls(model, Preprocess.for_encoder(model.encoder, cfg.data.image_size), dev)

    @property
    def has_attention(self) -> bool:
        return hasattr(self.model.decoder, "attention")

    @torch.no_grad()
    def caption_batch(self, images: torch.Tensor, beam_size: int = 3, max_len: int = 20, n_best: int = 1,
                      length_penalty: float = 0.0) -> list[Caption]:
        """Preprocessed images (B, 3, H, W) -> one Caption per image."""
        with autocast(self.device):
            grid, pooled = self.model.encode(images.to(self.device, non_blocking=True))
            hyps = decode(self.model.decoder, grid, pooled, beam_size, max_len, length_penalty, n_best)
        side = math.isqrt(grid.size(1))
        results = []
        for image_hyps in hyps:
            texts = [" ".join(self.model.vocab.decode(h.tokens)) for h in image_hyps]
            best = image_hyps[0]
            attention = best.attention.view(-1, side, side) if best.attention is not None else None
            results.append(Caption(texts[0], best.score, self.model.vocab.decode(best.tokens),
                                   [(t, h.score) for t, h in zip(texts, image_hyps)], attention))
        return results

    def caption(self, images: list[Image.Image], **kwargs) -> list[Caption]:
        """RGB PIL images -> captions (kwargs as in caption_batch)."""
        return self.caption_batch(torch.stack([self.preprocess(im) for im in images]), **kwargs)
