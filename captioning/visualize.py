"""Attention heat maps over a photo: one overlay per generated word; shared by the demo and the batch CLI."""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

TITLE_HEIGHT = 26  # pixels above each panel of attention_figure for its word


def overlay(image: Image.Image, weights: torch.Tensor, alpha: float = 0.7, cmap: str = "jet") -> Image.Image:
    """Blend a colour-mapped attention map over an RGB image of any size.

    weights (side, side) are one word's weights over the encoder grid; they are stretched to 0..1 (least to most
    attended cell, as matplotlib's imshow would) and upsampled bicubically, so a coarse 4x4 grid still gives a smooth
    map. The colour is as opaque as the attention is strong (at most `alpha`), so the photo stays visible where the
    model looks little.
    """
    w = weights.detach().float().cpu()
    w = (w - w.min()) / (w.max() - w.min()).clamp(min=1e-12)  # (side, side) in 0..1
    width, height = image.size
    heat = F.interpolate(w[None, None], size=(height, width), mode="bicubic", align_corners=False)[0, 0]  # (H, W)
    heat = heat.clamp(0, 1).numpy()
    colours = matplotlib.colormaps[cmap](heat)[..., :3]  # (H, W, 3) in 0..1
    photo = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3)
    opacity = alpha * heat[..., None]  # (H, W, 1)
    blended = (1 - opacity) * photo + opacity * colours
    return Image.fromarray(np.rint(blended * 255).astype(np.uint8))


def word_overlays(image: Image.Image, words: list[str], attention: torch.Tensor, size: int = 224
                  ) -> list[tuple[Image.Image, str]]:
    """(overlay, word) for every word; attention is (len(words), side, side). The photo is first resized so its
    longer side is `size` pixels, which keeps many panels cheap to draw."""
    if attention.size(0) != len(words):
        raise ValueError(f"attention has {attention.size(0)} maps for {len(words)} words; they must match")
    photo = image.convert("RGB")
    photo.thumbnail((size, size), Image.Resampling.LANCZOS)
    return [(overlay(photo, weights), word) for weights, word in zip(attention, words)]


def attention_figure(image: Image.Image, words: list[str], attention: torch.Tensor, panel: int = 160,
                     columns: int = 5) -> Image.Image:
    """One image of panels in a grid: the photo, then each word's heat map with the word as its title."""
    photo = image.convert("RGB")
    photo.thumbnail((panel, panel), Image.Resampling.LANCZOS)
    panels = [(photo, "image")] + word_overlays(photo, words, attention, panel)
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    cell_w, cell_h = panel + 8, panel + TITLE_HEIGHT + 8
    figure = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default(size=16)
    for k, (picture, title) in enumerate(panels):
        x, y = (k % columns) * cell_w + 4, (k // columns) * cell_h + 4
        draw.text((x + panel // 2, y + TITLE_HEIGHT // 2), title, fill="black", font=font, anchor="mm")
        figure.paste(picture, (x + (panel - picture.width) // 2, y + TITLE_HEIGHT + (panel - picture.height) // 2))
    return figure
