"""Image transforms of the protocol (METHODS.md section 4): random resized crop + flip for training,
resize + center crop for evaluation, both ending in ToTensor and Normalize."""
from __future__ import annotations

from typing import Sequence, Tuple

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_size(image_size: int) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _normalize(mean: Sequence[float], std: Sequence[float]) -> T.Normalize:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (RGB), got mean={mean!r}, std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be > 0 in every channel, got {std!r}")
    return T.Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std))


def train_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, scale: Tuple[float, float] = (0.16, 1.0),
                    flip: bool = True) -> T.Compose:
    """Training views: RandomResizedCrop(image_size, scale), horizontal flip (unless ``flip=False``:
    a mirrored glyph or card is another glyph), ToTensor, Normalize(mean, std)."""
    _check_size(image_size)
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale!r}")
    steps = [T.RandomResizedCrop(image_size, scale=(float(lo), float(hi)))]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), _normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Evaluation views: resize the shorter side to round(image_size * 256 / 224), center crop
    image_size (224 -> 256/224, 227 -> 259/227), ToTensor, Normalize(mean, std)."""
    _check_size(image_size)
    return T.Compose([
        T.Resize(round(image_size * 256 / 224)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        _normalize(mean, std),
    ])


__all__ = ["train_transform", "eval_transform", "IMAGENET_MEAN", "IMAGENET_STD"]
