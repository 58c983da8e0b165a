"""A tiny synthetic data set and a tiny trunk, registered the way a user registers their own components.

Imported by conftest.py, and run as a script (``python tests/tiny.py ARGS``) it is ``run.py`` with both registered,
for the tests that start real worker processes.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

import xml_plugin
from xml_plugin.data import DMLDataset
from xml_plugin.models.trunks import Trunk


class TinyShapes(DMLDataset):
    """``num_classes`` classes of 40 px images: class = (colour, shape), instances differ by position, size and noise."""

    name = "tiny_shapes"

    def __init__(self, root=None, transform=None, num_classes: int = 16, per_class: int = 6, size: int = 40):
        super().__init__(transform)
        self.size, self.per_class = size, per_class
        labels = np.repeat(np.arange(num_classes), per_class)
        self._set_items([f"img{i:04d}.png" for i in range(len(labels))], labels, [f"c{c}" for c in range(num_classes)])

    def options(self):
        return {"size": self.size, "per_class": self.per_class}

    def image(self, i: int) -> Image.Image:
        c = int(self.labels[i])
        rng = np.random.default_rng(1000 + i)
        hue = [(255, 40, 40), (40, 200, 40), (40, 40, 255), (220, 200, 30)][c % 4]
        img = Image.new("RGB", (self.size, self.size), (255, 255, 255))
        d = ImageDraw.Draw(img)
        r = int(rng.integers(8, 14))
        x, y = (int(v) for v in rng.integers(r, self.size - r, size=2))
        box = [x - r, y - r, x + r, y + r]
        shape = (c // 4) % 4
        if shape == 0:
            d.ellipse(box, fill=hue)
        elif shape == 1:
            d.rectangle(box, fill=hue)
        elif shape == 2:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=hue)
        else:
            d.line([(x - r, y), (x + r, y)], fill=hue, width=5)
            d.line([(x, y - r), (x, y + r)], fill=hue, width=5)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 20, size=(self.size, self.size, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def tiny_cnn(pretrained: bool = False, weights_path=None) -> Trunk:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())]
    return Trunk(blocks, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "tiny_cnn", "random-init-seed0", output_stride=4)


xml_plugin.register("dataset", TinyShapes, name="tiny_shapes")
xml_plugin.register("trunk", tiny_cnn, name="tiny_cnn")

if __name__ == "__main__":
    from xml_plugin.cli import main
    sys.exit(main(sys.argv[1:]))
