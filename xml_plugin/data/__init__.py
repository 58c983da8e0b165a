"""Data sets (real formats and embedded builders), class-disjoint splits, transforms. Importing registers them."""
from . import embedded, real  # noqa: F401  (register cards, kanji, cub200, cars196, sop, inshop)
from .datasets import DMLDataset, cache_root, get_dataset
from .splits import Split, class_disjoint_splits, protocol_splits
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = ["get_dataset", "DMLDataset", "cache_root", "class_disjoint_splits", "protocol_splits", "Split",
           "train_transform", "eval_transform", "IMAGENET_MEAN", "IMAGENET_STD"]
