"""Cross-batch memory with (adaptive) cross-batch normalization: XBM, XBN, AXBN (docs/methods.md, XBN).

A drop-in for pytorch-metric-learning's ``CrossBatchMemory`` (same call, same ``embedding_memory``,
``label_memory``, ``queue_idx``, ``has_been_filled``) whose whole state lives in buffers, so that
``state_dict()`` / ``load_state_dict()`` restore the memory on resume. Before the batch is enqueued the
stored embeddings are moved, per dimension, to the batch's moments (``"xbn"``), to Kalman-filtered
moments (``"axbn"``) or to EMA-filtered moments (``"ema"``); ``"none"`` is plain XBM.

The memory's size is ``memory_size`` rows, or ``memory_fraction`` of the training fold (``train_size`` images, passed
by the engine): :func:`resolve_memory_size`. Its dtype follows the embeddings, as PML's does.
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
DEFAULT_MEMORY_SIZE = 1024  # PML's default, used when neither memory_size nor a resolvable memory_fraction is given
_STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _stats_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _STATS_DTYPES.values():
        return value
    if isinstance(value, str) and value in _STATS_DTYPES:
        return _STATS_DTYPES[value]
    raise ValueError(f"stats_dtype must be one of {list(_STATS_DTYPES)}, got {value!r}")


def resolve_memory_size(memory_size: Optional[int] = None, memory_fraction: Optional[float] = None,
                        train_size: Optional[int] = None) -> int:
    """The memory's number of rows (docs/xbn.md, "Memory size").

    ``memory_size`` when given (a fixed size wins); else ``round(memory_fraction * train_size)`` clipped to
    ``[1, train_size]`` (Python's round: halves to even) when both are known; else ``DEFAULT_MEMORY_SIZE``
    (a fraction without a training-set size, e.g. a component built on placeholder sizes, cannot be resolved).
    """
    if memory_size is not None:
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(f"memory_size must be an int >= 1 (or null to use memory_fraction), got {memory_size!r}")
        return memory_size
    if memory_fraction is not None:
        if (isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float))
                or not 0 < memory_fraction <= 1):
            raise ValueError(f"memory_fraction must be in (0, 1] (a share of the training fold), got {memory_fraction!r}")
        if train_size is not None:
            if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
                raise ValueError(f"train_size must be an int >= 1, got {train_size!r}")
            return min(train_size, max(1, round(memory_fraction * train_size)))
    return DEFAULT_MEMORY_SIZE


class CrossBatchNormMemory(CrossBatchMemory):
    """XBM whose stored embeddings are moment-matched to the current batch before each enqueue (XBN/AXBN).

    Per step: (1) estimate the target moments: the batch's (``xbn``), a Kalman filter's (``axbn``) or an
    EMA's (``ema``); (2) move the valid memory rows to them, ``z <- (z - mean_mem) / std_mem * std_t + mean_t``
    (no gradient); (3) enqueue the batch; (4) the loss of the batch against the memory, as in XBM.
    ``adaptation="none"`` skips (1)-(2) and is PML's ``CrossBatchMemory``, with a checkpointable state.
    The returned loss is ``memory_weight * L(batch vs memory)`` (+ ``L(batch)`` with ``in_batch_loss``: the
    official XBM code's total, with ``memory_weight = 1``).
    """

    needs_histograms = False

    def __init__(self, loss, embedding_size, memory_size=None, miner=None, adaptation="xbn",
                 q=1.0, r=0.01, p0=1.0, gain_interval=1, ema_gain=0.1, min_rows=2, std_eps=1e-6,
                 population_std=True, stats_dtype="float32", normalize=None, in_batch_loss=False,
                 warmup_iterations=0, memory_fraction=None, train_size=None, memory_weight=1.0,
                 enqueue_during_warmup=True):
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation must be one of {list(ADAPTATIONS)}, got {adaptation!r}")
        if not (isinstance(embedding_size, int) and embedding_size >= 1):
            raise ValueError(f"embedding_size must be an int >= 1, got {embedding_size!r}")
        memory_size = resolve_memory_size(memory_size, memory_fraction, train_size)
        if not (isinstance(memory_weight, (int, float)) and not isinstance(memory_weight, bool)
                and 0 <= memory_weight < float("inf")):
            raise ValueError(f"memory_weight must be a finite number >= 0, got {memory_weight!r}")
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
        if not self.in_batch_loss and memory_weight == 0:
            raise ValueError("memory_weight is 0 and in_batch_loss is False: the loss would be 0; "
                             "enable in_batch_loss or make memory_weight > 0")
        self.warmup_iterations = warmup_iterations
        self.memory_fraction = None if memory_fraction is None else float(memory_fraction)
        self.memory_weight = float(memory_weight)
        self.enqueue_during_warmup = bool(enqueue_during_warmup)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner)
        self.add_to_recordable_attributes(list_of_names=["last_gain"], is_stat=False)

    # ---- state: every piece is a buffer ----------------------------------------------------------

    def reset_queue(self):
        """Empty the memory and reset the filter (also called by the constructor)."""
        d, sd = self.embedding_size, self.stats_dtype
        # [M, d]; float32 until the first batch, then the embeddings' dtype (as PML)
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, d))
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

    def _follow(self, device: torch.device, dtype: torch.dtype) -> None:
        """Buffers follow the embeddings' device; the memory also takes their dtype (PML's behaviour)."""
        if self.embedding_memory.device != device:
            for name, buf in list(self._buffers.items()):
                if buf is not None:
                    self._buffers[name] = buf.to(device)
        if self.embedding_memory.dtype != dtype:
            self.embedding_memory = self.embedding_memory.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a memory saved in another dtype (float64 embeddings ...) is restored in that dtype, not cast to ours
        saved = state_dict.get(prefix + "embedding_memory")
        if isinstance(saved, torch.Tensor) and saved.dtype != self.embedding_memory.dtype:
            self.embedding_memory = self.embedding_memory.to(saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        """FIFO enqueue (PML's order and pointer arithmetic), stored in the memory's dtype."""
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

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple, do_remove_self_comparisons):
        """The tuples of the batch against the memory (PML's: the miner's, or all pairs, minus self-comparisons),
        followed by the input ``indices_tuple``, whose reference indices (into the batch, as a miner on the batch
        gives them) are moved to the batch's slots in the memory. PML 2.9 appends them as memory positions, which pairs
        an anchor with an unrelated row (docs/xbn.md, "An input indices_tuple")."""
        indices = super().create_indices_tuple(embeddings, labels, E_mem, L_mem, None, do_remove_self_comparisons)
        if input_indices_tuple is None:
            return indices
        given = input_indices_tuple
        if len(given) == 3 and len(indices) == 4:
            given = lmu.convert_to_pairs(given, labels)
        elif len(given) == 4 and len(indices) == 3:
            given = lmu.convert_to_triplets(given, labels)
        slot = self.curr_batch_idx.to(given[1].device)  # [B] memory row of each batch row
        if len(given) == 4:
            given = (given[0], slot[given[1]], given[2], slot[given[3]])
        else:
            given = (given[0], slot[given[1]], slot[given[2]])
        return c_f.concatenate_indices_tuples(indices, given)

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
        """Adapt the memory, enqueue, then ``memory_weight * loss(batch vs memory)`` (+ the in-batch loss if enabled).

        ``embeddings`` [B, d], ``labels`` [B]; ``indices_tuple`` / ``enqueue_mask`` as in PML's
        ``CrossBatchMemory`` (mutually exclusive; with ``enqueue_mask`` only the masked rows are stored
        and only the others are queries). Before ``warmup_iterations`` forward calls, only the in-batch
        loss is returned; the memory is still adapted and filled then, unless ``enqueue_during_warmup`` is
        False (the official XBM code: the memory starts at the end of the warm-up).
        """
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None and len(enqueue_mask) != len(embeddings):
            raise ValueError(f"enqueue_mask has {len(enqueue_mask)} entries for {len(embeddings)} embeddings")
        self.reset_stats()
        device = embeddings.device
        self._follow(device, embeddings.dtype)
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

        use_memory = int(self.iteration) >= self.warmup_iterations
        self.iteration += 1
        if use_memory or self.enqueue_during_warmup:
            self.adapt_memory(emb_for_queue)
            self.add_to_memory(emb_for_queue, labels_for_queue, len(emb_for_queue))

        total = None
        if use_memory:
            e_mem, l_mem = self.valid_memory()
            e_mem = c_f.to_dtype(e_mem, dtype=embeddings.dtype)  # a copy for the loss; as PML, kept under autocast
            l_mem = l_mem.to(labels.dtype)
            mem_indices = self.create_indices_tuple(
                embeddings, labels, e_mem, l_mem, indices_tuple, do_remove_self_comparisons
            )
            total = self.loss(embeddings, labels, mem_indices, e_mem, l_mem)
            if self.memory_weight != 1.0:
                total = self.memory_weight * total
        if not use_memory or self.in_batch_loss:
            in_batch = self.loss(embeddings, labels, self._in_batch_indices(embeddings, labels, indices_tuple))
            total = in_batch if total is None else total + in_batch
        return total

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, "
                f"adaptation={self.adaptation!r}, normalize={self.normalize}, in_batch_loss={self.in_batch_loss}, "
                f"memory_weight={self.memory_weight}")


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

    def __init__(self, loss, embedding_size, memory_size=None, miner=None, normalize=None, in_batch_loss=False,
                 warmup_iterations=0, memory_fraction=None, train_size=None, memory_weight=1.0,
                 enqueue_during_warmup=True):
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, adaptation="none",
                         normalize=normalize, in_batch_loss=in_batch_loss, warmup_iterations=warmup_iterations,
                         memory_fraction=memory_fraction, train_size=train_size, memory_weight=memory_weight,
                         enqueue_during_warmup=enqueue_during_warmup)


register("loss_wrapper", CrossBatchNormMemory, name="xbn")
register("loss_wrapper", AdaptiveCrossBatchNormMemory, name="axbn")
register("loss_wrapper", CrossBatchMemoryXBM, name="xbm")

__all__ = ["CrossBatchNormMemory", "AdaptiveCrossBatchNormMemory", "CrossBatchMemoryXBM", "ADAPTATIONS",
           "resolve_memory_size", "DEFAULT_MEMORY_SIZE"]
