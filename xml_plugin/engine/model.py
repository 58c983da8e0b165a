"""Assemble the embedding model from the config: trunk (frozen part + trainable tail) -> 1x1 embedder -> pooling."""
from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

import torch
from torch import nn

from .. import registry
from ..config import ConfigError
from ..models.pooling import GlobalAveragePooling, PoolingOutput


class EmbeddingModel(nn.Module):
    """``frozen`` (never trained, may be replaced by the feature cache) -> ``tail`` -> ``embedder`` -> ``pooling``.

    ``forward(x, from_cache=False)``: ``x`` is an image batch, or with ``from_cache`` the frozen part's output
    ([B, C, h, w], or [B, C] from a pooled cache: its spatial mean, seen as a 1x1 map).
    Only the trainable part (tail, embedder, pooling) goes into checkpoints: see :meth:`trainable_state_dict`.
    """

    def __init__(self, frozen: nn.Module, tail: nn.Module, embedder: nn.Module, pooling: nn.Module):
        super().__init__()
        self.frozen, self.tail, self.embedder, self.pooling = frozen, tail, embedder, pooling
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # the frozen part always runs in inference mode
        return self

    def forward(self, x: torch.Tensor, from_cache: bool = False) -> PoolingOutput:
        if not from_cache:
            with torch.no_grad():
                x = self.frozen(x)
        if x.dim() == 2:  # pooled cache [B, C]: only a linear embedder and GAP may follow (GAP of a 1x1 map = identity)
            if len(self.tail) or not isinstance(self.pooling, GlobalAveragePooling):
                raise RuntimeError("pooled features reached a model that is not 'linear embedder, then GAP'")
            x = x[:, :, None, None]  # [B, C, 1, 1]
        x = self.tail(x)
        linear = getattr(self.embedder, "linear", None)
        if linear is not None:  # a linear embedder: the pooling may skip projecting every location (GAP, hard XML)
            out = self.pooling.pool_linear(x, *linear())
            if out is not None:
                return out
        return self.pooling(self.embedder(x))

    def trainable_state_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frozen.")}

    def load_trainable_state_dict(self, state: Dict[str, Any]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("frozen.")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")


def build_trunk(cfg: Dict[str, Any]):
    name, opts = registry.split_spec(cfg["trunk"])
    opts = {k: v for k, v in opts.items() if k not in ("frozen_blocks",)}
    return registry.build("trunk", {"name": name, "options": opts})


def frozen_blocks(cfg: Dict[str, Any], trunk, device: torch.device) -> int:
    """How many of the trunk's blocks are frozen: ``trunk.frozen_blocks`` (``auto``: all on CPU, none on CUDA)."""
    value = cfg["trunk"].get("frozen_blocks", "auto") if isinstance(cfg["trunk"], dict) else "auto"
    n = trunk.num_blocks
    if value in ("auto", None):
        return n if device.type == "cpu" else 0
    if value == "all":
        return n
    value = int(value)
    if value < 0:  # -k: all but the last k blocks
        value = n + value
    if not 0 <= value <= n:
        raise ConfigError(f"trunk.frozen_blocks must be in [-{n}, {n}] (or auto/all) for {trunk.name}, got {value}")
    return value


def split_trunk(trunk, k: int) -> Tuple[nn.Module, nn.Module]:
    blocks = list(trunk.blocks)
    # the tail is copied: every fold and trial trains its own, from the pristine pretrained weights
    return nn.Sequential(*blocks[:k]), copy.deepcopy(nn.Sequential(*blocks[k:]))


def build_head(cfg: Dict[str, Any], trunk, k: int) -> EmbeddingModel:
    """The model for a trunk whose first ``k`` blocks are frozen."""
    frozen, tail = split_trunk(trunk, k)
    emb_name, emb_opts = registry.split_spec(cfg["embedder"])
    embedder = registry.build("embedder", emb_name, in_channels=trunk.out_channels, **emb_opts)
    dim = getattr(embedder, "out_channels", None) or emb_opts.get("size", trunk.out_channels)
    pooling = registry.build("pooling", cfg["pooling"], dim=dim)
    return EmbeddingModel(frozen, tail, embedder, pooling)


def embedding_size(model: EmbeddingModel) -> int:
    return model.pooling.dim
