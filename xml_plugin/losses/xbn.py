"""Cross-batch memory with (adaptive) cross-batch normalization: XBM, XBN, AXBN (docs/methods.md, XBN).

A drop-in for pytorch-metric-learning's ``CrossBatchMemory`` (same call, same ``embedding_memory``,
``label_memory``, ``queue_idx``, ``has_been_filled``) whose whole state lives in buffers, so that
``state_dict()`` / ``load_state_dict()`` restore the memory on resume. Before the batch is enqueued the
stored embeddings are moved, per dimension, to the batch's moments (``"xbn"``), to Kalman-filtered
moments (``"axbn"``) or to EMA-filtered moments (``"ema"``); ``"none"`` is plain XBM.
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import CrossBatchMemory
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..registry import register
from .moments import batch_moments, filter_moments, kalman_measure, kalman_predict, match_moments

ADAPTATIONS = ("none", "xbn", "axbn", "ema")
_STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _stats_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _STATS_DTYPES.values():
        return value
    if isinstance(value, str) and value in _STATS_DTYPES:
        return _STATS_DTYPES[value]
    raise ValueError(f"stats_dtype must be one of {list(_STATS_DTYPES)}, got {value!r}")


class CrossBatchNormMemory(CrossBatchMemory):
    """XBM whose stored embeddings are moment-matched to the current batch before each enqueue (XBN/AXBN).

    Per step: (1) estimate the target moments: the batch's (``xbn``), a Kalman filter's (``axbn``) or an
    EMA's (``ema``); (2) move the valid memory rows to them, ``z <- (z - mean_mem) / std_mem * std_t + mean_t``
    (no gradient); (3) enqueue the batch; (4) the loss of the batch against the memory, as in XBM.
    ``adaptation="none"`` skips (1)-(2) and is PML's ``CrossBatchMemory``, with a checkpointable state.
    """

    needs_histograms = False

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, adaptation="xbn",
                 q=1.0, r=0.01, p0=1.0, gain_interval=1, ema_gain=0.1, min_rows=2, std_eps=1e-6,
                 population_std=True, stats_dtype="float32", normalize=None, in_batch_loss=False,
                 warmup_iterations=0):
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation must be one of {list(ADAPTATIONS)}, got {adaptation!r}")
        if not (isinstance(embedding_size, int) and embedding_size >= 1):
            raise ValueError(f"embedding_size must be an int >= 1, got {embedding_size!r}")
        if not (isinstance(memory_size, int) and memory_size >= 1):
            raise ValueError(f"memory_size must be an int >= 1, got {memory_size!r}")
        if q < 0:
            raise ValueError(f"q must be >= 0, got {q}")
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if p0 < 0:
            raise ValueError(f"p0 must be >= 0, got {p0}")
        if adaptation == "axbn" and q == 0 and p0 == 0 and r == 0:
            raise ValueError("q, p0 and r are all 0: the Kalman gain 0/0 is undefined; make q or p0 > 0")
        if not (isinstance(gain_interval, int) and gain_interval >= 1):
            raise ValueError(f"gain_interval must be an int >= 1, got {gain_interval!r}")
        if not 0 < ema_gain <= 1:
            raise ValueError(f"ema_gain must be in (0, 1], got {ema_gain}")
        if not (isinstance(min_rows, int) and min_rows >= 2):
            raise ValueError(f"min_rows must be an int >= 2 (a std needs two rows), got {min_rows!r}")
        if not std_eps > 0:
            raise ValueError(f"std_eps must be > 0, got {std_eps}")
        if not (isinstance(warmup_iterations, int) and warmup_iterations >= 0):
            raise ValueError(f"warmup_iterations must be an int >= 0, got {warmup_iterations!r}")
        if normalize not in (None, True, False):
            raise ValueError(f"normalize must be None (auto), True or False, got {normalize!r}")
        self.adaptation = adaptation
        self.q, self.r, self.p0 = float(q), float(r), float(p0)
        self.gain_interval = gain_interval
        self.ema_gain = float(ema_gain)
        self.min_rows = min_rows
        self.std_eps = float(std_eps)
        self.population_std = bool(population_std)
        self.stats_dtype = _stats_dtype(stats_dtype)
        # auto: L2-normalise when adapting (the XBN setting), keep PML's raw behaviour for "none"
        self.normalize = (adaptation != "none") if normalize is None else normalize
        self.in_batch_loss = bool(in_batch_loss)
        self.warmup_iterations = warmup_iterations
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner)
        self.add_to_recordable_attributes(list_of_names=["last_gain"], is_stat=False)

    # ---- state: every piece is a buffer ----------------------------------------------------------

    def reset_queue(self):
        """Empty the memory and reset the filter (also called by the constructor)."""
        d, sd = self.embedding_size, self.stats_dtype
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, d))  # [M, d], float32
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))  # [M]
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))  # forward calls so far
        self.register_buffer("mean_hat", torch.zeros(d, dtype=sd))  # [d] filtered batch mean
        self.register_buffer("std_hat", torch.ones(d, dtype=sd))  # [d] filtered batch std
        self.register_buffer("p", torch.tensor(self.p0, dtype=sd))  # Kalman error variance
        self.register_buffer("gain", torch.tensor(self.ema_gain if self.adaptation == "ema" else 1.0, dtype=sd))
        self.register_buffer("filter_steps", torch.zeros((), dtype=torch.long))  # filter updates so far

    @property
    def queue_idx(self) -> int:
        return int(self.queue_pointer)

    @queue_idx.setter
    def queue_idx(self, value):
        self.queue_pointer.fill_(int(value))

    @property
    def has_been_filled(self) -> bool:
        return bool(self.filled)

    @has_been_filled.setter
    def has_been_filled(self, value):
        self.filled.fill_(bool(value))

    @property
    def last_gain(self) -> float:
        return float(self.gain)

    @property
    def num_valid_rows(self) -> int:
        return self.memory_size if self.has_been_filled else self.queue_idx

    def valid_memory(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored rows in use: ``([n, d], [n])`` with n = memory_size once filled."""
        n = self.num_valid_rows
        return self.embedding_memory[:n], self.label_memory[:n]

    def _follow_device(self, device: torch.device) -> None:
        if self.embedding_memory.device != device:
            for name, buf in list(self._buffers.items()):
                if buf is not None:
                    self._buffers[name] = buf.to(device)

    # ---- the cross-batch normalization step --------------------------------------------------------

    @torch.no_grad()
    def _filter_update(self, mean_b: torch.Tensor, std_b: torch.Tensor, batch_size: int):
        """AXBN / EMA: update (mean_hat, std_hat) with this batch's moments; returns them."""
        if int(self.filter_steps) == 0:  # initial estimates: the first batch's moments
            self.mean_hat.copy_(mean_b)
            self.std_hat.copy_(std_b)
        if self.adaptation == "axbn":
            # prediction (p <- p + q) every gain_interval steps; measurement (gain, p <- (1 - K) p) every step, so
            # that between two predictions the gain decays like 1/k
            p = kalman_predict(self.p, self.q) if int(self.filter_steps) % self.gain_interval == 0 else self.p
            k, p_new = kalman_measure(p, self.r, batch_size)
            self.gain.copy_(k)
            self.p.copy_(p_new)
        else:
            self.gain.fill_(self.ema_gain)
        mean_hat, std_hat = filter_moments(self.mean_hat, self.std_hat, mean_b, std_b, self.gain)
        self.mean_hat.copy_(mean_hat)
        self.std_hat.copy_(std_hat)
        self.filter_steps += 1
        return self.mean_hat, self.std_hat

    @torch.no_grad()
    def adapt_memory(self, batch: torch.Tensor) -> bool:
        """Move the valid memory rows to the target moments estimated from ``batch`` [B, d].

        Skipped (returns False) for ``"none"``, or when the batch or the memory has fewer than
        ``min_rows`` rows (for AXBN/EMA a too-small batch does not update the filter either).
        """
        if self.adaptation == "none" or batch.shape[0] < self.min_rows:
            return False
        device_type = batch.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            mean_b, std_b = batch_moments(batch, self.population_std, self.std_eps, self.stats_dtype)
            if self.adaptation == "xbn":
                mean_t, std_t = mean_b, std_b
            else:
                mean_t, std_t = self._filter_update(mean_b, std_b, batch.shape[0])
            n = self.num_valid_rows
            if n < self.min_rows:
                return False
            mem = self.embedding_memory[:n]  # [n, d]
            mean_m, std_m = batch_moments(mem, self.population_std, self.std_eps, self.stats_dtype)
            mem.copy_(match_moments(mem, mean_m, std_m, mean_t, std_t).to(mem.dtype))
        return True

    def add_to_memory(self, embeddings, labels, batch_size):
        """FIFO enqueue (PML's order and pointer arithmetic), stored in the memory's dtype (float32)."""
        self.curr_batch_idx = (
            torch.arange(self.queue_idx, self.queue_idx + batch_size, device=labels.device) % self.memory_size
        )
        self.embedding_memory[self.curr_batch_idx] = embeddings.detach().to(self.embedding_memory.dtype)
        self.label_memory[self.curr_batch_idx] = labels.detach().to(self.label_memory.dtype)
        prev = self.queue_idx
        self.queue_idx = (prev + batch_size) % self.memory_size
        if not self.has_been_filled and self.queue_idx <= prev:
            self.has_been_filled = True

    # ---- forward ------------------------------------------------------------------------------------

    def _in_batch_indices(self, embeddings, labels, indices_tuple):
        if self.miner is None:
            return indices_tuple
        mined = self.miner(embeddings, labels)
        if indices_tuple is None:
            return mined
        if len(indices_tuple) == 3 and len(mined) == 4:
            indices_tuple = lmu.convert_to_pairs(indices_tuple, labels)
        elif len(indices_tuple) == 4 and len(mined) == 3:
            indices_tuple = lmu.convert_to_triplets(indices_tuple, labels)
        return c_f.concatenate_indices_tuples(mined, indices_tuple)

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        """Adapt the memory, enqueue, then ``loss(batch vs memory)`` (+ the in-batch loss if enabled).

        ``embeddings`` [B, d], ``labels`` [B]; ``indices_tuple`` / ``enqueue_mask`` as in PML's
        ``CrossBatchMemory`` (mutually exclusive; with ``enqueue_mask`` only the masked rows are stored
        and only the others are queries). Before ``warmup_iterations`` forward calls, only the in-batch
        loss is returned, but the memory is still adapted and filled.
        """
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None and len(enqueue_mask) != len(embeddings):
            raise ValueError(f"enqueue_mask has {len(enqueue_mask)} entries for {len(embeddings)} embeddings")
        self.reset_stats()
        device = embeddings.device
        self._follow_device(device)
        labels = c_f.to_device(labels, device=device)
        if self.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=1)

        if enqueue_mask is not None:
            emb_for_queue, labels_for_queue = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            do_remove_self_comparisons = False
        else:
            emb_for_queue, labels_for_queue = embeddings, labels
            do_remove_self_comparisons = True
        if len(emb_for_queue) > self.memory_size:
            raise ValueError(f"{len(emb_for_queue)} rows to enqueue exceed memory_size={self.memory_size}")

        self.adapt_memory(emb_for_queue)
        self.add_to_memory(emb_for_queue, labels_for_queue, len(emb_for_queue))
        use_memory = int(self.iteration) >= self.warmup_iterations
        self.iteration += 1

        total = None
        if use_memory:
            e_mem, l_mem = self.valid_memory()
            e_mem = c_f.to_dtype(e_mem, dtype=embeddings.dtype)  # a copy for the loss; as PML, kept under autocast
            l_mem = l_mem.to(labels.dtype)
            mem_indices = self.create_indices_tuple(
                embeddings, labels, e_mem, l_mem, indices_tuple, do_remove_self_comparisons
            )
            total = self.loss(embeddings, labels, mem_indices, e_mem, l_mem)
        if not use_memory or self.in_batch_loss:
            in_batch = self.loss(embeddings, labels, self._in_batch_indices(embeddings, labels, indices_tuple))
            total = in_batch if total is None else total + in_batch
        return total

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, "
                f"adaptation={self.adaptation!r}, normalize={self.normalize}")


class AdaptiveCrossBatchNormMemory(CrossBatchNormMemory):
    """AXBN: :class:`CrossBatchNormMemory` with ``adaptation="axbn"`` (Kalman-filtered target moments)."""

    def __init__(self, *args, **kwargs):
        bound = inspect.signature(AdaptiveCrossBatchNormMemory).bind(*args, **kwargs)
        bound.apply_defaults()
        super().__init__(**bound.arguments)


# same parameters as the parent, with adaptation="axbn" by default (what the registry and trainer read)
_parent_sig = inspect.signature(CrossBatchNormMemory.__init__)
AdaptiveCrossBatchNormMemory.__init__.__signature__ = _parent_sig.replace(parameters=[
    p.replace(default="axbn") if p.name == "adaptation" else p for p in _parent_sig.parameters.values()
])

class CrossBatchMemoryXBM(CrossBatchNormMemory):
    """XBM (the ``xbm`` method): :class:`CrossBatchNormMemory` without adaptation, numerically PML's
    ``CrossBatchMemory`` but with its memory in ``state_dict()`` (a resumed fold continues with its memory), and the
    same options as XBN (``warmup_iterations`` ...) so that the two are compared on equal terms."""

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, normalize=None, in_batch_loss=False,
                 warmup_iterations=0):
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, adaptation="none",
                         normalize=normalize, in_batch_loss=in_batch_loss, warmup_iterations=warmup_iterations)


register("loss_wrapper", CrossBatchNormMemory, name="xbn")
register("loss_wrapper", AdaptiveCrossBatchNormMemory, name="axbn")
register("loss_wrapper", CrossBatchMemoryXBM, name="xbm")

__all__ = ["CrossBatchNormMemory", "AdaptiveCrossBatchNormMemory", "CrossBatchMemoryXBM", "ADAPTATIONS"]
