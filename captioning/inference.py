"""Images -> captions with a trained checkpoint; shared by the demo and the folder-captioning CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from time import monotonic

import torch
from PIL import Image

from captioning.data.datasets import Preprocess
from captioning.decoding import decode
from captioning.engine import autocast, check_cpu_bf16, resolve_device
from captioning.models import Captioner, load_model
from captioning.models.decoder import CaptionDecoder


@dataclass
class Caption:
    text: str
    score: float  # log-probability (length-normalised if asked)
    words: list[str]
    nbest: list[tuple[str, float]]  # (caption, score), best first; the first is this caption
    attention: torch.Tensor | None  # (len(words), side, side) grid weights per word; None without attention


def _check_deadline(deadline: float | None) -> None:
    """Raise TimeoutError once time.monotonic() has reached `deadline` (None: no limit)."""
    if deadline is not None and monotonic() >= deadline:
        raise TimeoutError("captioning reached its deadline and was stopped")


class _Deadlined:
    """A decoder that checks the deadline before every step, so that a long beam search stops at the deadline instead
    of running to its end; everything else is the decoder's own."""

    def __init__(self, decoder: CaptionDecoder, deadline: float):
        self.decoder, self.deadline = decoder, deadline

    def __getattr__(self, name: str):
        return getattr(self.decoder, name)

    def step(self, *args, **kwargs):
        _check_deadline(self.deadline)
        return self.decoder.step(*args, **kwargs)


class ImageCaptioner:
    """A trained model with its preprocessing on a device; `cpu_bf16` runs it in bf16 on a CPU (check_cpu_bf16)."""

    def __init__(self, model: Captioner, preprocess: Preprocess, device: torch.device, cpu_bf16: bool = False):
        self.model, self.preprocess, self.device, self.cpu_bf16 = model.eval(), preprocess, device, cpu_bf16

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", cpu_bf16: bool = False) -> ImageCaptioner:
        dev = resolve_device(device)
        if cpu_bf16:
            check_cpu_bf16(dev)
        model, cfg = load_model(path, dev)
        return cls(model, Preprocess.for_encoder(model.encoder, cfg.data.image_size), dev, cpu_bf16)

    @property
    def has_attention(self) -> bool:
        return hasattr(self.model.decoder, "attention")

    @torch.no_grad()
    def caption_batch(self, images: torch.Tensor, beam_size: int = 3, max_len: int = 20, n_best: int = 1,
                      length_penalty: float = 0.0, deadline: float | None = None) -> list[Caption]:
        """Preprocessed images (B, 3, H, W) -> one Caption per image. With a `deadline` (a time.monotonic() reading)
        the work stops with TimeoutError once it is reached: checked before encoding and before every decoder step."""
        _check_deadline(deadline)
        decoder = self.model.decoder if deadline is None else _Deadlined(self.model.decoder, deadline)
        with autocast(self.device, cpu_bf16=self.cpu_bf16):
            grid, pooled = self.model.encode(images.to(self.device, non_blocking=True))
            hyps = decode(decoder, grid, pooled, beam_size, max_len, length_penalty, n_best)
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
