"""Typed run configuration: defaults live here, YAML files and `--set key=value` flags override them.

Unknown keys and wrong types are errors, so a typo in a config never silently trains the wrong model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | coco | karpathy | flickr8k
    root: str = ""  # coco: folder holding annotations/ and train2017/...; flickr8k: folder of the text files
    image_dir: str = ""  # images folder when it is not in the dataset's default place (karpathy: the image root)
    karpathy_json: str = ""  # dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json
    year: int = 2017  # coco only: 2014 or 2017
    use_restval: bool = True  # karpathy coco: train on train + restval, as is standard
    num_train: int = 4000  # synthetic only: images per split
    num_val: int = 250
    num_test: int = 250
    synthetic_size: int = 128  # synthetic only: rendered image side in pixels
    image_size: int = 0  # encoder input side; 0 = the crop size of the encoder weights' transforms
    augment: bool = True  # mild random resized crop while training (no flips: they swap "left" and "right")
    min_word_count: int = 5  # rarer training words become <unk>
    max_caption_len: int = 30  # training captions are cut to this many words
    captions_per_image: int = 1  # reference captions used per image per epoch (image encoded once)
    num_workers: int = 2
    feature_cache: str = ""  # folder of precomputed encoder features; "" = run the encoder in the loop
    feature_dtype: str = "float16"  # float16 | float32: how cached features are stored


@dataclass
class ModelConfig:
    encoder: str = "resnet101"  # any torchvision classification model name
    encoder_weights: str | None = "DEFAULT"  # torchvision weights name, path to a state_dict file, or null
    trainable_layers: int = 0  # fine-tune the last N stages of the encoder (0 = frozen)
    grid_size: int = 0  # average-pool the spatial grid to grid_size x grid_size; 0 = the backbone's own grid
    decoder: str = "attention"  # attention (Show, Attend and Tell) | show_tell (Show and Tell)
    cell: str = "lstm"  # lstm | gru | rnn
    num_layers: int = 1
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5
    word_vectors: str = ""  # word2vec/GloVe text file to initialise the embeddings (embed_dim must match)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64  # images per step (times data.captions_per_image captions)
    lr: float = 4e-4
    encoder_lr: float = 1e-4  # for the fine-tuned encoder stages
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max gradient norm; 0 = off
    lr_schedule: str = "cosine"  # constant | cosine | step | plateau
    lr_step_epochs: int = 8  # step schedule: multiply the LR by lr_gamma every lr_step_epochs
    lr_gamma: float = 0.5
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    attention_penalty: float = 1.0  # doubly stochastic attention regularisation (lambda in Show, Attend and Tell)
    scheduled_sampling: float = 0.0  # final probability of feeding the model's own word (ramps up linearly)
    scst_epochs: int = 0  # self-critical epochs (CIDEr-D reward) after the `epochs` of cross-entropy
    scst_lr: float = 5e-5  # constant learning rate of the self-critical epochs
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the mean reward of the others
    scst_bleu_weight: float = 0.0  # the self-critical reward is CIDEr-D + this x the sample's sentence BLEU-4
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with a scaler); on a CPU see cpu_bf16
    cpu_bf16: bool = False  # with amp: bf16 on a CPU with bf16 matrix units (Intel AMX), refused on other CPUs
    compile: bool = False  # torch.compile the decoder's one-word step
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    val_beam_size: int = 1  # beam size of the per-epoch validation decoding (1 = greedy)
    max_decode_len: int = 20
    select_metric: str = "Bleu_4"  # metric picking the best checkpoint and driving early stopping
    early_stop_patience: int = 5  # epochs without improvement before stopping; 0 = never stop early
    average_epochs: int = 0  # also write RUN/averaged.pt: the mean of the weights after each of the last N epochs
    save_every_steps: int = 0  # also write `last` every N steps inside an epoch; 0 = at epoch ends only
    out_dir: str = "runs/default"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        cfg = cls()
        _merge(cfg, _without_retired(d), "")
        return validate(cfg)


class ConfigError(ValueError):
    pass


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Return `value` as the annotated type or raise ConfigError naming the key."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return None
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str) and _looks_numeric(value):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if t in (int, str, bool, float) and type(value) is t:
            return value
    names = " | ".join("null" if t is type(None) else t.__name__ for t in options)
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r} ({type(value).__name__})")


# Keys that did nothing and were removed; configs saved in earlier runs' checkpoints still hold them.
_RETIRED = {"train.log_every"}


def _without_retired(saved: dict[str, Any]) -> dict[str, Any]:
    """A config saved in a checkpoint, less the keys removed since (a config file or --set naming one is refused)."""
    return {section: {name: v for name, v in values.items() if f"{section}.{name}" not in _RETIRED}
            if isinstance(values, dict) else values for section, values in saved.items()}


def _merge(obj: Any, updates: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            valid = ", ".join(f"{prefix}{f.name}" for f in dataclasses.fields(obj))
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {valid}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a mapping of its fields, got {value!r}")
            _merge(current, value, f"{key}.")
        else:
            setattr(obj, name, _check_type(value, hints[name], key))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['train.lr=1e-3', 'model.cell=gru'] -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.lr=1e-3")
        value = yaml.safe_load(raw) if raw else ""
        node = nested
        *parents, leaf = key.split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # e.g. --set train=1 train.lr=1e-3
                section = ".".join(parents[:depth + 1])
                raise ConfigError(f"config key '{section}' must be a mapping of its fields, got {node!r}; set its "
                                  f"fields one by one, e.g. {key}={raw}")
        node[leaf] = value
    return nested


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise ConfigError(f"line {key.start_mark.line + 1}: key '{key.value}' is written twice (only the "
                                      "last would count); merge the two into one")
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults (or `base`, e.g. a checkpoint's saved config) <- YAML file <- command-line overrides."""
    cfg = Config()
    if base is not None:
        _merge(cfg, _without_retired(base), "")
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; name a YAML file (the shipped ones are in configs/)")
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; the shipped ones are in configs/")
        try:
            text = path.read_bytes().decode("utf-8-sig")
            if "\0" in text:
                raise UnicodeError
        except UnicodeError:  # a checkpoint, an image...
            raise ConfigError(f"config file {path} is not a YAML text file (for a checkpoint use train.py --resume)"
                              ) from None
        try:
            data = yaml.load(text, Loader=_UniqueKeySafeLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not a plain YAML mapping ({' '.join(str(e).split())}); "
                              "fix the syntax (python tags are never loaded)") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping with data/model/train sections")
        try:
            _merge(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    _merge(cfg, parse_overrides(overrides or []), "")
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


_CHOICES = {
    "data.dataset": ("synthetic", "coco", "karpathy", "flickr8k"),
    "data.year": (2014, 2017),
    "data.feature_dtype": ("float16", "float32"),
    "model.decoder": ("attention", "show_tell"),
    "model.cell": ("lstm", "gru", "rnn"),
    "train.lr_schedule": ("constant", "cosine", "step", "plateau"),
    # the metrics every epoch's validation computes (METEOR, which needs Java and minutes, only in evaluate.py)
    "train.select_metric": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"),
}
_AT_LEAST = {  # numbers with a lower bound (inclusive)
    "data.min_word_count": 1, "data.max_caption_len": 1, "data.num_workers": 0, "data.num_train": 1,
    "data.num_val": 1, "data.num_test": 1, "data.synthetic_size": 16, "data.image_size": 0,
    "model.trainable_layers": 0, "model.grid_size": 0, "model.num_layers": 1, "model.embed_dim": 1,
    "model.hidden_dim": 1, "model.attention_dim": 1, "model.dropout": 0.0,
    "train.epochs": 0, "train.batch_size": 1, "train.weight_decay": 0.0, "train.grad_clip": 0.0,
    "train.lr_step_epochs": 1, "train.warmup_steps": 0, "train.label_smoothing": 0.0, "train.attention_penalty": 0.0,
    "train.scheduled_sampling": 0.0, "train.scst_epochs": 0, "train.val_beam_size": 1, "train.max_decode_len": 1,
    "train.early_stop_patience": 0, "train.save_every_steps": 0,
    "train.scst_bleu_weight": 0.0, "train.average_epochs": 0, "data.captions_per_image": 1,
}
_BELOW = {"model.dropout": 1.0, "train.label_smoothing": 1.0}  # exclusive upper bounds
_AT_MOST = {"train.scheduled_sampling": 1.0}
_POSITIVE = ("train.lr", "train.encoder_lr", "train.scst_lr", "train.lr_gamma")


def validate(cfg: Config) -> Config:
    """Check values with a fixed set of choices, numeric ranges and the rules between keys; returns cfg for
    chaining."""
    d = cfg.to_dict()
    value = {f"{section}.{name}": v for section, values in d.items() for name, v in values.items()}
    for key, choices in _CHOICES.items():
        if value[key] not in choices:
            raise ConfigError(f"config key '{key}' is {value[key]!r}; choose one of {', '.join(map(str, choices))}")
    for key in _POSITIVE:
        if not 0 < value[key] < math.inf:
            raise ConfigError(f"config key '{key}' is {value[key]}; it must be a positive number")
    for key, low in _AT_LEAST.items():
        high, below = _AT_MOST.get(key, _BELOW.get(key, math.inf)), key in _BELOW
        if not (low <= value[key] and (value[key] < high if below else value[key] <= high)):
            bound = f" and {'below' if below else 'at most'} {high}" if high < math.inf else ""
            raise ConfigError(f"config key '{key}' is {value[key]}; it must be at least {low}{bound}")
    if cfg.train.epochs + cfg.train.scst_epochs < 1:
        raise ConfigError("config keys 'train.epochs' + 'train.scst_epochs' must add up to at least 1 epoch")
    if cfg.train.scst_epochs and cfg.train.scst_samples < 2:
        raise ConfigError("config key 'train.scst_samples' must be at least 2: each sample's baseline is the mean "
                          "reward of the image's other samples")
    if cfg.data.feature_cache and cfg.model.trainable_layers:
        raise ConfigError("config key 'data.feature_cache' needs a frozen encoder: features computed once cannot "
                          "follow an encoder that trains; set model.trainable_layers=0 or data.feature_cache=''")
    return cfg


def at_least(low: int):
    """An argparse type for a command-line count: an integer >= low, else a one-line usage error naming the option."""
    def integer(text: str) -> int:
        value = int(text)  # argparse reports "invalid integer value" when this fails
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return integer


def os_error_line(e: OSError) -> str:
    """A script's one-line message for an OSError: 'error: PATH: reason' when the error names its file."""
    return f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}"


def finite(text: str) -> float:
    """An argparse type for a command-line number that must be finite (not nan or inf)."""
    value = float(text)  # argparse reports "invalid finite value" when this fails
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
