"""Encoder, attention and decoders; `build_model` / `load_model` assemble a Captioner."""

from captioning.models.captioner import Captioner, build_model, load_model

__all__ = ["Captioner", "build_model", "load_model"]
