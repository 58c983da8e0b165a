"""Image transforms: random resized crop (+ flip) for training; for evaluation the protocol's resize + center crop, or
the whole image (resized, or padded to a square); all end in ToTensor and Normalize (docs/data.md says which data set
uses which, and why)."""
from __future__ import annotations

from typing import Sequence, Tuple

from PIL import Image
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


EVAL_MODES = ("center_crop", "resize", "pad")


class PadToSquare:
    """Pad a PIL image to a square with ``fill`` (RGB), the image centred: the aspect ratio is kept."""

    def __init__(self, fill=(255, 255, 255)):
        self.fill = tuple(int(v) for v in fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        side = max(w, h)
        if w == h:
            return img
        out = Image.new(img.mode, (side, side), self.fill if img.mode == "RGB" else self.fill[0])
        out.paste(img, ((side - w) // 2, (side - h) // 2))
        return out

    def __repr__(self) -> str:
        return f"PadToSquare(fill={self.fill})"


def eval_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, mode: str = "center_crop",
                   fill: Sequence[int] = (255, 255, 255)) -> T.Compose:
    """Evaluation views, then ToTensor and Normalize(mean, std). ``mode``:

    * ``center_crop`` (the protocol's): resize the shorter side to round(image_size * 256 / 224), center crop
      image_size (224 -> 256/224, 227 -> 259/227): the borders of the longer side are cut;
    * ``resize``: the whole image resized to image_size x image_size (nothing cut; the aspect ratio changes);
    * ``pad``: padded to a square with ``fill`` (the aspect ratio kept), then resized: nothing cut.
    """
    _check_size(image_size)
    if mode == "center_crop":
        steps = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    elif mode == "resize":
        steps = [T.Resize((image_size, image_size))]
    elif mode == "pad":
        steps = [PadToSquare(fill), T.Resize((image_size, image_size))]
    else:
        raise ValueError(f"transforms.eval.mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    return T.Compose(steps + [T.ToTensor(), _normalize(mean, std)])


__all__ = ["train_transform", "eval_transform", "PadToSquare", "EVAL_MODES", "IMAGENET_MEAN", "IMAGENET_STD"]
