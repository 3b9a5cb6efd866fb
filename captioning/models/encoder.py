"""CNN encoder: a torchvision classification backbone without its head, returning the spatial feature grid."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from captioning.checkpoint import load_failure
from captioning.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.")


def resolve_weights(name: str, weights: str | None) -> torchvision.models.WeightsEnum | Path | None:
    """'DEFAULT' / 'IMAGENET1K_V2' / 'ResNet50_Weights.IMAGENET1K_V2' -> torchvision weights; a file path -> Path."""
    if weights is None or weights.lower() in ("", "none", "null"):
        return None
    if weights.endswith((".pth", ".pt", ".bin")) or "/" in weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights file {path} not found (model.encoder_weights)")
        return path
    try:
        if "." in weights:
            return torchvision.models.get_weight(weights)
        return torchvision.models.get_model_weights(name)[weights]
    except (KeyError, ValueError):
        try:
            choices = ", ".join(torchvision.models.get_model_weights(name).__members__)
        except ValueError:
            choices = "its torchvision weights names"
        raise ConfigError(f"model.encoder_weights '{weights}' is not a weights name of {name}; use one of {choices}, "
                          "a path to a state_dict file, or null") from None


def _trunk_and_stages(model: nn.Module, name: str) -> tuple[nn.Module, list[nn.Module]]:
    """The convolutional trunk of a classifier, and its stages from input to output (for partial fine-tuning)."""
    if hasattr(model, "layer4"):  # resnet, resnext, wide_resnet
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        stages = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
        return nn.Sequential(*stages), stages
    if hasattr(model, "features"):  # mobilenet, efficientnet, convnext, vgg, densenet, alexnet
        return model.features, list(model.features.children())
    if hasattr(model, "trunk_output"):  # regnet
        stages = [model.stem, *model.trunk_output.children()]
        return nn.Sequential(*stages), stages
    raise ConfigError(f"model.encoder '{name}' has no convolutional trunk this encoder understands; use a ResNet, "
                      "ResNeXt, Wide ResNet, RegNet, MobileNet, EfficientNet, ConvNeXt, VGG or DenseNet")


class Encoder(nn.Module):
    """images (B, 3, H, W) -> grid (B, N, C), N = h*w feature positions, and pooled (B, C).

    Frozen stages are kept in eval mode and excluded from autograd, so their BatchNorm statistics never move;
    BatchNorm layers of fine-tuned stages keep their ImageNet statistics too (batches are too small to re-estimate).
    """

    def __init__(self, name: str = "resnet101", weights: str | None = None, trainable_layers: int = 0,
                 grid_size: int = 0):
        super().__init__()
        if name not in torchvision.models.list_models(torchvision.models):
            raise ConfigError(f"model.encoder '{name}' is not a torchvision classification model (such as resnet101, "
                              "mobilenet_v2 or efficientnet_b3)")
        resolved = resolve_weights(name, weights)
        try:
            model = torchvision.models.get_model(name, weights=None if isinstance(resolved, Path) else resolved)
        except _LOAD_ERRORS as e:
            if not isinstance(resolved, torchvision.models.WeightsEnum):
                raise
            # torch.hub keeps a finished download as <hub dir>/checkpoints/<the URL's file name>
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(resolved.url).path).name
            if cached.is_file():  # downloaded, but damaged since (or cut short by a full disk)
                raise ConfigError(f"model.encoder_weights '{weights}': the downloaded weights file {cached} is "
                                  f"damaged ({load_failure(e)}); delete it and it is downloaded again") from None
            raise ConfigError(f"model.encoder_weights '{weights}': could not get {resolved.url} ({e}); on a machine "
                              "without internet, download the file elsewhere and set model.encoder_weights to its "
                              "path, or use null for random weights") from None
        if isinstance(resolved, Path):
            _load_trunk_state(model, resolved)
        self.name = name
        self.trunk, stages = _trunk_and_stages(model, name)
        if not 0 <= trainable_layers <= len(stages):
            raise ConfigError(f"model.trainable_layers is {trainable_layers}, but {name} has {len(stages)} stages")
        self.trainable = nn.ModuleList(stages[len(stages) - trainable_layers:] if trainable_layers else [])
        self.requires_grad_(False)
        self.trainable.requires_grad_(True)
        self.grid_size = grid_size
        # NHWC convolutions: the layout tensor cores want, and oneDNN's faster path on CPUs (2 cores, batch 8:
        # MobileNetV2 at 320 px 28 against 51 ms per image, ResNet-50 at 224 67 against 104)
        self.channels_last = True

        # Preprocessing that belongs with the weights (torchvision's ImageClassification preset).
        preset = resolved.transforms() if isinstance(resolved, torchvision.models.WeightsEnum) else None
        self.mean = tuple(preset.mean) if preset else IMAGENET_MEAN
        self.std = tuple(preset.std) if preset else IMAGENET_STD
        self.image_size = preset.crop_size[0] if preset else 224
        with torch.no_grad():
            self.out_channels = self.trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
        self.train()

    def check_input_size(self, size: int) -> None:
        """Refuse an input side the trunk cannot take (its strides and pools would leave no feature grid), naming the
        least side it takes, and a model.grid_size above the grid the trunk gives (pooling up only repeats cells)."""
        side = self._grid_side(size)
        if side and self.grid_size > side:
            raise ConfigError(f"model.grid_size {self.grid_size} is larger than the {side}x{side} grid {self.name} "
                              f"gives at data.image_size {size}, so its cells would only repeat; use at most {side}, "
                              "or 0 for the grid as it is")
        if side:
            return
        low, high = size, 2 * size
        while not self._grid_side(high):
            low, high = high, 2 * high
        while high - low > 1:  # the least side that works lies in (low, high]
            mid = (low + high) // 2
            low, high = (low, mid) if self._grid_side(mid) else (mid, high)
        raise ConfigError(f"data.image_size {size} is too small for model.encoder {self.name}: its trunk reduces a "
                          f"{size}x{size} image to nothing; use at least {high}, or 0 for the weights' own size")

    def _grid_side(self, size: int) -> int:
        """The side of the trunk's grid for a size x size image; 0 when the trunk cannot take it."""
        mode, device = self.training, next(self.parameters()).device
        try:
            with torch.no_grad():
                return self.trunk.eval()(torch.zeros(1, 3, size, size, device=device)).shape[-1]
        except RuntimeError:  # "Output size is too small", or a kernel larger than its padded input
            return 0
        finally:
            self.train(mode)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        if mode:
            frozen = set(self.trunk.modules()) - set(self.trainable.modules())
            for m in frozen:
                m.training = False
        return self

    @property
    def frozen(self) -> bool:
        return len(self.trainable) == 0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self.trunk(images)  # (B, C, h, w)
        if self.grid_size:
            x = F.adaptive_avg_pool2d(x, self.grid_size)  # (B, C, g, g)
        grid = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return grid, pool(grid)


def pool(grid: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, C): the global average pool a classifier head would see."""
    return grid.mean(dim=1)


# What torch.load raises for a file cut short or not written by torch.save (an OSError without a file name among them)
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, pickle.UnpicklingError)


def _load_trunk_state(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:
        if isinstance(e, OSError) and e.filename:  # unreadable (permissions...): reported with its file name
            raise
        raise ConfigError(f"model.encoder_weights {path} is damaged or cut short ({load_failure(e)}); download or copy "
                          "it again") from None
    if not isinstance(state, dict):
        raise ConfigError(f"model.encoder_weights {path} does not hold a state_dict (a dict of tensors)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]  # the classifier head is not needed
    if missing or unexpected:
        raise ConfigError(f"model.encoder_weights {path} does not match torchvision's {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
