"""Memory measurement helpers shared by the benchmark scripts (Linux)."""
from __future__ import annotations

from typing import Callable

import torch


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``forward()`` (shared storage counted per save)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return total[0]


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM`` ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
