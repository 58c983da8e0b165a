"""Image transforms: random resized crop (+ flip) for training; for evaluation the protocol's resize + center crop, or
the whole image (resized, or padded to a square); all end in ToTensor and Normalize (docs/data.md says which data set
uses which, and why)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_size(image_size: int) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"transforms.image_size must be a positive int, got {image_size!r}")
    return image_size


def _normalize(mean: Sequence[float], std: Sequence[float]) -> T.Normalize:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (RGB), got mean={mean!r}, std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be > 0 in every channel, got {std!r}")
    return T.Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std))


class RandomCropPadToSquare:
    """A random crop that keeps the image's own aspect ratio, padded to a square with ``fill`` and resized.

    The crop covers a fraction in ``scale`` of the image's area, with an aspect ratio between 3/4 and 4/3 of the
    image's own (RandomResizedCrop's rule, relative to the image instead of to a square): a crop of a portrait card is
    a portrait piece of the card, never its margins, and it is not stretched to a square but padded.
    """

    def __init__(self, size: int, scale: Tuple[float, float], fill=(255, 255, 255)):
        self.size, self.scale, self.fill = int(size), (float(scale[0]), float(scale[1])), tuple(int(v) for v in fill)
        self.pad = PadToSquare(self.fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        aspect = w / h
        top, left, ch, cw = T.RandomResizedCrop.get_params(img, self.scale, (aspect * 3 / 4, aspect * 4 / 3))
        return self.pad(img.crop((left, top, left + cw, top + ch))).resize((self.size, self.size), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"RandomCropPadToSquare(size={self.size}, scale={self.scale}, fill={self.fill})"


def train_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, scale: Tuple[float, float] = (0.16, 1.0),
                    flip: bool = True, pad: Optional[bool] = False) -> T.Compose:
    """Training views: RandomResizedCrop(image_size, scale), horizontal flip (unless ``flip=False``:
    a mirrored glyph or card is another glyph), ToTensor, Normalize(mean, std). ``pad=True``: the crop keeps the
    image's aspect ratio and is padded to a square instead of stretched (:class:`RandomCropPadToSquare`)."""
    _check_size(image_size)
    if not isinstance(flip, bool):
        raise ValueError(f"transforms.train.flip must be true or false, got {flip!r}")
    if pad is not None and not isinstance(pad, bool):
        raise ValueError(f"transforms.train.pad must be true, false or null, got {pad!r}")
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"transforms.train.scale must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
    steps = [RandomCropPadToSquare(image_size, (lo, hi)) if pad else T.RandomResizedCrop(image_size, scale=(lo, hi))]
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
                   fill: Sequence[int] = (255, 255, 255), short_side: Optional[int] = None) -> T.Compose:
    """Evaluation views, then ToTensor and Normalize(mean, std). ``mode``:

    * ``center_crop`` (the protocol's): resize the shorter side to ``short_side`` (None: round(image_size * 256 / 224),
      i.e. 256 for 224 px; the Reality Check's 227 px crops come from 256, set with ``short_side=256``), center crop
      image_size: the borders of the longer side are cut;
    * ``resize``: the whole image resized to image_size x image_size (nothing cut; the aspect ratio changes);
    * ``pad``: padded to a square with ``fill`` (the aspect ratio kept), then resized: nothing cut.
    """
    _check_size(image_size)
    if (not isinstance(fill, (list, tuple)) or len(fill) != 3
            or not all(isinstance(v, int) and 0 <= v <= 255 for v in fill)):
        raise ValueError(f"transforms.eval.fill must be 3 ints in 0..255 (RGB), got {fill!r}")
    if short_side is None:
        short_side = round(image_size * 256 / 224)
    if not isinstance(short_side, int) or isinstance(short_side, bool) or short_side < image_size:
        raise ValueError(f"transforms.eval.short_side must be an int >= image_size ({image_size}) or null, "
                         f"got {short_side!r}")
    if mode == "center_crop":
        steps = [T.Resize(short_side), T.CenterCrop(image_size)]
    elif mode == "resize":
        steps = [T.Resize((image_size, image_size))]
    elif mode == "pad":
        steps = [PadToSquare(fill), T.Resize((image_size, image_size))]
    else:
        raise ValueError(f"transforms.eval.mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    return T.Compose(steps + [T.ToTensor(), _normalize(mean, std)])


__all__ = ["train_transform", "eval_transform", "PadToSquare", "RandomCropPadToSquare", "EVAL_MODES", "IMAGENET_MEAN", "IMAGENET_STD"]
