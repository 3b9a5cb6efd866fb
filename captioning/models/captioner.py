"""The whole captioner: encoder + decoder, built from a config, rebuilt from a checkpoint alone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from captioning import decoding  # the module: decoding imports models.decoder, which imports this package
from captioning.checkpoint import CheckpointError, load_checkpoint
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
    try:
        cfg = Config.from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not fit this version of the code: {e}") from None
    vocab = Vocabulary.from_dict(state["vocab"])
    stored_words = state["model"].get("decoder.embed.weight", torch.empty(0)).shape[0]
    if stored_words != len(vocab):
        raise CheckpointError(f"{path}: its vocabulary has {len(vocab)} words but its weights {stored_words}; use the "
                              "checkpoint as the run wrote it (RUN/best.pt), or retrain")
    model = Captioner(cfg.model, vocab, encoder_weights=None)  # all weights come from the checkpoint
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model its config describes "
                              f"(vocabulary of {len(vocab)} words): {e}") from None
    return model.to(device).eval(), cfg
