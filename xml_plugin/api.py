"""``xml_plugin.load_model(run_dir)``: a saved model of an experiment (``runs/<method>/<hash>``) that embeds images."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .engine.model import build_head, build_trunk
from .engine.train import load_trainable
from .protocol.run_index import read_run

ImageLike = Union[str, Path, Image.Image]


class SavedModel:
    """The trunk, embedder and pooling of one training run with the run's evaluation transform."""

    def __init__(self, model: torch.nn.Module, transform, device: torch.device, info: Dict[str, Any]):
        self.model, self.transform, self.device, self.info = model.eval(), transform, device, info

    @property
    def method(self) -> str:
        return self.info["method"]

    @property
    def dim(self) -> int:
        return int(self.model.pooling.dim)

    @torch.no_grad()
    def embed(self, images: Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Embeddings [len(images), dim] (float32, not normalised) of image paths or PIL images."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = [self._load(im) for im in images[start:start + batch_size]]
            x = torch.stack([self.transform(im) for im in batch]).to(self.device)
            out.append(self.model(x).embedding.float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    @staticmethod
    def _load(im: ImageLike) -> Image.Image:
        if isinstance(im, Image.Image):
            return im.convert("RGB")
        with Image.open(im) as f:
            return f.convert("RGB")


def load_model(run_dir: Union[str, Path], device: str = "cpu") -> SavedModel:
    """The best model saved in ``run_dir`` (a folder of ``runs/index.csv``), rebuilt from its ``run.json``; a trunk or
    component registered by your own module must be registered (imported) first."""
    from .data import eval_transform

    run_dir = Path(run_dir)
    info = read_run(run_dir)
    cfg, resolved = info["config"], info["resolved"]
    dev = torch.device(device)
    trunk = build_trunk(cfg)
    model = build_head(cfg, trunk, int(resolved["frozen_blocks"])).to(dev)
    load_trainable(model, run_dir / "best.pt", dev)  # weights_only: a planted pickle cannot run code
    tf = eval_transform(int(resolved["image_size"]), trunk.mean, trunk.std, **dict((cfg.get("transforms") or {}).get("eval") or {}))
    return SavedModel(model, tf, dev, info)


__all__ = ["load_model", "SavedModel"]
