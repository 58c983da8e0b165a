"""Several processes for one model (``torchrun``): process group, rank-0-only writing, the per-rank share of a batch,
and the all-gathers that let every cross-batch part see the global batch (docs/distributed.md).

With one process (no ``WORLD_SIZE`` in the environment, or 1) every helper is the identity or a no-op, so the
engine calls them unconditionally.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError

TIMEOUT_ENV = "XML_PLUGIN_DIST_TIMEOUT"  # seconds a collective may wait (rank 0 builds the cache, evaluates ...)
DEFAULT_TIMEOUT = 6 * 3600


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> int:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``):
    NCCL when CUDA is available (each process on ``cuda:LOCAL_RANK``), gloo otherwise. Idempotent; returns the
    world size (1: nothing to do)."""
    world = env_world_size()
    if world <= 1 or dist.is_initialized():
        return world_size() if dist.is_initialized() else 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: start several processes with "
                          f"torchrun --nproc_per_node N run.py ... (see docs/distributed.md)")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=timeout)
    return world_size()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, results, logs and reports and talks to Optuna."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s values (in place)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def local_part(batch: np.ndarray) -> np.ndarray:
    """This rank's share of a global batch: the contiguous ``rank``-th of ``world`` equal chunks, so that the
    ranks' shares, concatenated in rank order, are the global batch."""
    world = world_size()
    if world == 1:
        return batch
    if len(batch) % world:
        raise ConfigError(f"trainer.batch_size {len(batch)} does not split into {world} processes: use a batch size "
                          f"divisible by the number of processes (torchrun --nproc_per_node x --nnodes)")
    share = len(batch) // world
    return batch[rank() * share:(rank() + 1) * share]


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """The ranks' ``x`` [b, ...] concatenated in rank order -> [world * b, ...], without gradient (same shapes)."""
    if world_size() == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather`, but this rank's slice is ``x`` itself, so it keeps its autograd graph (the other ranks'
    slices are constants). A loss of the result, scaled by the world size, gives after DDP's gradient averaging
    the single-process gradient: each rank contributes the part that flows through its own slice."""
    if world_size() == 1:
        return x
    parts = list(all_gather(x).chunk(world_size()))
    parts[rank()] = x
    return torch.cat(parts)


def gather_batch(embeddings: torch.Tensor, histograms: Optional[torch.Tensor]):
    """The global batch's embeddings [B, d] and histograms [B, m] (or None), with gradient for the local part."""
    return all_gather_with_grad(embeddings), None if histograms is None else all_gather_with_grad(histograms)


def set_gather_hooks(model: nn.Module, fn: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Give every submodule that updates state from the batch in forward (``gather_fn`` attribute: XML's prototype
    recursion and seeding, GSP's k-center initialisation) the all-gather, so it updates from the global batch."""
    for m in model.modules():
        if hasattr(m, "gather_fn"):
            m.gather_fn = fn


def wrap_model(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` with the pooling's gather hooks set (identity with one process).

    Buffers are broadcast from rank 0 once, not before each forward: every buffer is updated from the global batch
    identically on every rank (the equivalence test checks it). A pooling with parameters may leave them unused (GSP before its
    k-center initialisation), so unused parameters are looked for then.
    """
    if world_size() == 1:
        return model
    set_gather_hooks(model, all_gather)
    pooling = getattr(model, "pooling", None)
    unused = pooling is not None and any(p.requires_grad for p in pooling.parameters())
    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False,
                                               find_unused_parameters=unused)


def unscale_replicated_grads(params: Sequence[torch.Tensor]) -> None:
    """Gradients of parameters outside DDP (the loss's own, e.g. proxies) computed from the global batch on every
    rank: the loss was multiplied by the world size for DDP's averaging, so divide them back (no communication,
    they are the same on every rank)."""
    world = world_size()
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad.div_(world)


# ------------------------------------------------------------------------------------------------------------------
# the experiment: rank 0 runs the Optuna bookkeeping, the other ranks train the same folds in lockstep

def lead(unit: Optional[List[Any]]) -> None:
    """Rank 0: tell the followers the next training unit (``None``: no more)."""
    if world_size() > 1 and is_main():
        broadcast_object(unit)


def follow(train: Callable[..., Any], expected: Sequence[type] = ()) -> None:
    """Ranks > 0: train every unit rank 0 announces (:func:`lead`) until it announces ``None``. Exceptions in
    ``expected`` (e.g. a NaN loss, raised on every rank alike) end the unit, not the loop."""
    while True:
        unit = broadcast_object(None)
        if unit is None:
            return
        try:
            train(*unit)
        except tuple(expected):
            pass


__all__ = ["init_from_env", "world_size", "rank", "is_main", "barrier", "broadcast_object", "broadcast_module",
           "local_part", "all_gather", "all_gather_with_grad", "gather_batch", "set_gather_hooks", "wrap_model",
           "unscale_replicated_grads", "lead", "follow", "env_world_size"]
