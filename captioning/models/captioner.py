"""The whole captioner: encoder + decoder, built from a config, rebuilt from a checkpoint alone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from captioning import decoding  # the module: decoding imports models.decoder, which imports this package
from captioning.checkpoint import CheckpointError, check_finite, load_checkpoint
from captioning.config import Config, ConfigError, ModelConfig
from captioning.models.decoder import build_decoder
from captioning.models.encoder import Encoder, pool
from captioning.vocab import Vocabulary


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocabulary, encoder_weights: str | None = None):
        super().__init__()
        self.vocab = vocab
        self.encoder = Encoder(cfg.encoder, encoder_weights, cfg.trainable_layers, cfg.grid_size)
        self.decoder = build_decoder(cfg, len(vocab), self.encoder.out_channels)

    def encode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) through the encoder, or cached encoder features (B, N, C) as they are
        -> grid (B, N, C), pooled (B, C)."""
        if inputs.dim() == 3:
            grid = inputs.float()
            return grid, pool(grid)
        return self.encoder(inputs)

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor | None, image_index: torch.Tensor | None = None,
                sample_prob: float = 0.0, samples: int = 5, max_len: int = 20
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training pass; inputs: B images or cached features.

        Teacher forcing: captions (R, T) with image_index (R,) naming each caption's image (several captions may share
        one encoded image) -> logits (R, T-1, V), attention (R, T-1, N) or None.
        Self-critical: captions None -> `samples` sampled captions per image, tokens (B*samples, T) and the
        log-probability of each token (B*samples, T). Both go through forward so that DistributedDataParallel sees
        them."""
        grid, pooled = self.encode(inputs)
        if captions is None:
            tokens, token_logp, _ = decoding.rollout(self.decoder, grid, pooled, max_len, 1.0, samples)
            return tokens, token_logp
        return self.decoder(grid, pooled, captions, image_index, sample_prob)


def build_model(cfg: Config, vocab: Vocabulary) -> Captioner:
    """A new model for training; the encoder weights named in the config are loaded (downloaded if needed)."""
    return Captioner(cfg.model, vocab, cfg.model.encoder_weights)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Captioner, Config]:
    """Rebuild a trained model from its checkpoint alone (config, vocabulary and weights), in eval mode."""
    state = load_checkpoint(path)
    missing = [key for key in ("config", "vocab") if key not in state]
    if missing:
        raise CheckpointError(f"{path} holds weights without the {' and '.join(missing)} to rebuild the model; use a "
                              "checkpoint written by scripts/train.py (RUN/best.pt)")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: its config is not a table of settings; use a checkpoint as scripts/train.py "
                              "wrote it (RUN/best.pt)")
    try:
        cfg = Config.from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not fit this version of the code: {e}") from None
    try:
        vocab = Vocabulary.from_dict(state["vocab"])
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: its vocabulary is damaged ({type(e).__name__}: {e}); use a checkpoint as "
                              "scripts/train.py wrote it (RUN/best.pt)") from None
    stored_words = state["model"].get("decoder.embed.weight", torch.empty(0)).shape[0]
    if stored_words != len(vocab):
        raise CheckpointError(f"{path}: its vocabulary has {len(vocab)} words but its weights {stored_words}; use the "
                              "checkpoint as the run wrote it (RUN/best.pt), or retrain")
    check_finite(state["model"], path)
    model = Captioner(cfg.model, vocab, encoder_weights=None)  # all weights come from the checkpoint
    mismatch = _mismatch(model.state_dict(), state["model"])
    if mismatch:
        raise CheckpointError(f"{path}: its weights do not match the model its config describes ({mismatch}); use "
                              "the checkpoint as the run wrote it (RUN/best.pt), or retrain")
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def _mismatch(expected: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> str:
    """One line on how stored weights differ from a model's: missing and unexpected names, shapes that differ
    ('' when they fit). load_state_dict's own message lists every key over many lines."""
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    shapes = [f"{k} {tuple(stored[k].shape)} instead of {tuple(v.shape)}"
              for k, v in expected.items() if k in stored and stored[k].shape != v.shape]
    parts = [(f"{len(keys)} {what}: " + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else ""))
             for what, keys in [("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)] if keys]
    return "; ".join(parts)
