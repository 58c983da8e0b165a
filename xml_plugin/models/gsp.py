"""GSP: generalized sum pooling by entropy-smoothed partial transport to prototypes (docs/methods.md, GSP).

Local features ``x_i`` (the projected feature map, ``n = H*W`` locations of mass ``1/n``) are partly
transported to ``m`` trainable prototypes: a fraction ``mu`` (``transport_ratio``) of the mass is kept, the
rest (``rho``) is discarded. The pooled embedding is the convex combination of the kept features,
``z = (1/n) sum_i w_i x_i`` with ``w_i = (1 - n rho_i) / mu``; the attributes ``a_k = sum_i pi_ki / mu`` (in the
simplex) are returned as the ``histogram``. ``mu = 1`` is plain GAP.

The transport solver is the one-scalar fixed point of docs/methods.md, run in the log domain; its backward is
the implicit derivative of the fixed point (derivation in docs/gsp.md), or autograd through the unrolled
iterations (``backward="unrolled"``, for checking).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from ..registry import register
from .pooling import Pooling, PoolingOutput
from .seeding import farthest_point_indices

BACKWARDS = ("analytic", "unrolled")
INITS = ("kcenter", "random")
SEEDINGS = ("authors", "local_features")  # what the k-center init collects (docs/gsp.md, "Prototype seeding")

# |D| (the implicit-gradient denominator, docs/gsp.md) is clamped to at least this, sign kept
DENOMINATOR_EPS = 1e-6


def _check_transport_args(transport_ratio: float, entropy: float, iterations: int, backward: str) -> None:
    if not (isinstance(transport_ratio, (int, float)) and 0 < transport_ratio <= 1):
        raise ValueError(f"transport_ratio must be in (0, 1], got {transport_ratio!r}")
    if not (isinstance(entropy, (int, float)) and math.isfinite(entropy) and entropy > 0):
        raise ValueError(f"entropy must be a finite number > 0, got {entropy!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")


def _solve_log_scale(log_k: torch.Tensor, transport_ratio: float, iterations: int) -> torch.Tensor:
    """The scalar fixed point of docs/methods.md (GSP) in the log domain: ``u = log s`` per image, [B].

    ``log_k`` [B, n] holds ``log sum_k K_ki``. The update ``s <- mu / sum_i p_i k_i`` with
    ``p_i = (1/n) / (1 + s k_i)`` is ``s <- mu s / G(s)``, ``G(s) = (1/n) sum_i s k_i / (1 + s k_i)``,
    i.e. ``u <- u + log mu - log G(u)``; start ``s = 1``. Differentiable (autograd unrolls it) if
    ``log_k`` requires grad.
    """
    n = log_k.shape[1]
    log_mu = math.log(transport_ratio)
    u = torch.zeros(log_k.shape[0], dtype=log_k.dtype, device=log_k.device)  # [B], s = 1
    for _ in range(iterations):
        log_g = torch.logsumexp(nn.functional.logsigmoid(u[:, None] + log_k), dim=1) - math.log(n)  # [B]
        u = u + (log_mu - log_g)
    return u


def _plan_from_scale(log_kernel: torch.Tensor, log_k: torch.Tensor, u: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The final update ``p = (1/n) / (1 + s k)`` and ``pi = s K p``, ``rho = p``, in stable form.

    ``pi_ki = (1/n) sigmoid(u + log k_i) K_ki / k_i`` and ``rho_i = (1/n) sigmoid(-(u + log k_i))``, so
    ``rho_i + sum_k pi_ki = 1/n`` holds for any ``u``. ``log_kernel`` [B, m, n], ``log_k`` [B, n], ``u`` [B].
    """
    n = log_kernel.shape[2]
    z = u[:, None] + log_k  # [B, n]
    kept = torch.sigmoid(z) / n  # [B, n] = sum_k pi_ki
    rho = torch.sigmoid(-z) / n  # [B, n]
    pi = kept[:, None, :] * torch.softmax(log_kernel, dim=1)  # [B, m, n]
    return pi, rho


def _guard(d: torch.Tensor, eps: float = DENOMINATOR_EPS) -> torch.Tensor:
    """``sign(d) * max(|d|, eps)`` with ``sign(0) = +1``."""
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return sign * d.abs().clamp_min(eps)


class _ImplicitTransport(torch.autograd.Function):
    """Forward: the solver without a graph. Backward: implicit differentiation of the fixed point."""

    @staticmethod
    def forward(ctx, cost: torch.Tensor, transport_ratio: float, entropy: float, iterations: int):
        log_kernel = -entropy * cost  # [B, m, n]
        log_k = torch.logsumexp(log_kernel, dim=1)  # [B, n]
        u = _solve_log_scale(log_k, transport_ratio, iterations)
        pi, rho = _plan_from_scale(log_kernel, log_k, u)
        ctx.save_for_backward(pi, rho)
        ctx.entropy = entropy
        return pi, rho

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pi: torch.Tensor, grad_rho: torch.Tensor):
        pi, rho = ctx.saved_tensors  # [B, m, n], [B, n]
        n = pi.shape[2]
        if grad_pi is None:
            grad_pi = torch.zeros_like(pi)
        if grad_rho is None:
            grad_rho = torch.zeros_like(rho)
        kept = pi.sum(dim=1)  # [B, n]
        gp_pi = grad_pi * pi  # [B, m, n]
        h = n * rho * grad_rho + n * gp_pi.sum(dim=1)  # [B, n]
        sigma = gp_pi.sum(dim=(1, 2)) - (h * kept).sum(dim=1)  # [B] = s dL/ds (explicit part)
        denom = _guard(n * (kept * rho).sum(dim=1))  # [B] = 1 - mu - n sum rho^2 at the fixed point
        inner = grad_pi - h[:, None, :] - (n * rho * (sigma / denom)[:, None])[:, None, :]  # [B, m, n]
        grad_cost = -ctx.entropy * pi * inner
        return grad_cost, None, None, None


def gsp_transport(cost: torch.Tensor, transport_ratio: float = 0.3, entropy: float = 5.0, iterations: int = 100,
                  backward: str = "analytic") -> Tuple[torch.Tensor, torch.Tensor]:
    """Entropy-smoothed partial transport of ``n`` locations (mass ``1/n`` each) to ``m`` prototypes.

    ``cost`` [B, m, n] -> plan ``pi`` [B, m, n] and residual ``rho`` [B, n], with ``K = exp(-entropy * cost)``,
    ``rho_i + sum_k pi_ki = 1/n`` (exact) and ``sum pi = transport_ratio`` (at convergence) (docs/methods.md, GSP;
    "Transport plan", "Solver"): ``iterations`` scalar updates from ``s = 1``, then the final ``p`` update.
    ``backward="analytic"`` differentiates the fixed point implicitly; ``"unrolled"`` lets autograd go through
    the iterations. ``transport_ratio = 1`` is the exact limit ``s -> inf``: ``rho = 0``, ``pi_ki = K_ki / (n k_i)``.
    """
    _check_transport_args(transport_ratio, entropy, iterations, backward)
    if cost.dim() != 3:
        raise ValueError(f"cost must be [B, m, n], got shape {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise ValueError(f"cost must be a floating-point tensor, got {cost.dtype}")
    transport_ratio, entropy = float(transport_ratio), float(entropy)
    n = cost.shape[2]
    if transport_ratio == 1.0:  # all mass kept: the solver's limit, taken exactly
        pi = torch.softmax(-entropy * cost, dim=1) / n  # [B, m, n]
        rho = torch.zeros(cost.shape[0], n, dtype=cost.dtype, device=cost.device)
        return pi, rho
    if backward == "analytic":
        return _ImplicitTransport.apply(cost, transport_ratio, entropy, iterations)
    log_kernel = -entropy * cost
    log_k = torch.logsumexp(log_kernel, dim=1)
    u = _solve_log_scale(log_k, transport_ratio, iterations)
    return _plan_from_scale(log_kernel, log_k, u)


def _unit_ball(v: torch.Tensor) -> torch.Tensor:
    """``N(v) = v / max(||v||, 1)`` over the last dim; finite gradient at ``v = 0``."""
    return v / v.pow(2).sum(dim=-1, keepdim=True).clamp_min(1.0).sqrt()


def prototype_cost(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``C_ki = ||N(w_k) - N(x_i)||_2``: features [B, n, d], prototypes [m, d] -> [B, m, n].

    The square root has zero gradient where the distance is (numerically) zero, instead of NaN.
    """
    nw = _unit_ball(prototypes)  # [m, d]
    nx = _unit_ball(features)  # [B, n, d]
    sq = (nw.pow(2).sum(-1)[None, :, None] + nx.pow(2).sum(-1)[:, None, :]
          - 2 * torch.einsum("md,bnd->bmn", nw, nx)).clamp_min(0)  # [B, m, n]
    tiny = torch.finfo(sq.dtype).tiny ** 0.5
    positive = sq > tiny
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def kcenter(points: torch.Tensor, k: int) -> torch.Tensor:
    """Farthest-point (k-center) selection: indices [k] into ``points`` [N, d].

    Starts from the point farthest from the mean, then repeatedly takes the point farthest from the chosen
    ones. Deterministic; with fewer distinct points than ``k`` some are chosen twice.
    """
    if points.dim() != 2 or points.shape[0] < 1:
        raise ValueError(f"kcenter needs points [N, d] with N >= 1, got {tuple(points.shape)}")
    first = int((points - points.mean(dim=0)).pow(2).sum(dim=1).argmax())
    return farthest_point_indices(points, k, first)


def kcenter_from_seeds(points: torch.Tensor, seeds: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center whose distances start from a seed set (the GSP authors' seeding): indices [k] into ``points``.

    ``points`` [N, d], ``seeds`` [s, d]. ``nearest_i = min_j ||p_i - s_j||^2``; then ``k`` times: take the point
    with the largest ``nearest`` (ties: lowest index) and lower ``nearest`` by its distances. The seeds only start the
    distances: they are not returned. With fewer than ``k`` points apart from the seeds some indices repeat.
    """
    if points.dim() != 2 or seeds.dim() != 2 or points.shape[1] != seeds.shape[1] or len(points) < 1:
        raise ValueError(f"kcenter_from_seeds needs points [N, d] (N >= 1) and seeds [s, d], got "
                         f"{tuple(points.shape)} and {tuple(seeds.shape)}")
    pts, sds = points.float(), seeds.float()
    nearest = torch.cdist(pts, sds).pow(2).min(dim=1).values if len(sds) else torch.full((len(pts),), float("inf"))
    chosen = []
    for _ in range(k):
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (pts - pts[nxt]).pow(2).sum(dim=1))
    return torch.tensor(chosen, dtype=torch.long, device=points.device)


@register("pooling", name="gsp")
class GeneralizedSumPooling(Pooling):
    """GSP (docs/methods.md, GSP): ``z = (1/n) sum_i w_i x_i``, ``w_i = (1 - n rho_i) / mu``, histogram ``a = sum_i pi / mu``.

    ``dim`` is the projected feature size ``d``; ``num_prototypes`` ``m``; ``transport_ratio`` ``mu``;
    ``entropy`` the inverse temperature ``gamma``. ``init="kcenter"`` collects ``init_features`` detached rows over
    the first training batches (plain GAP and ``histogram=None`` until then), then sets the prototypes by k-center:
    ``seeding="authors"`` (the authors' code) collects the images' GAP embeddings ``N(z)``, one row per image, and
    seeds k-center with the first ``m`` rows (:func:`kcenter_from_seeds`), the prototypes being ``N(z)`` rows of the
    rest; ``seeding="local_features"`` collects random local features, starts k-center at the one farthest from
    their mean and copies the raw rows. ``init="random"`` starts from random prototypes at once.
    The ``initialized`` buffer keeps that state in checkpoints.
    """

    gives_histogram = True
    # several processes (engine/distributed.py): all-gathers a detached [b, ...] batch tensor across them, so that the
    # k-center pool collects the global batch's features, identically on every rank; None: one process
    gather_fn = None

    def __init__(self, dim: int, num_prototypes: int = 64, transport_ratio: float = 0.3, entropy: float = 5.0,
                 iterations: int = 100, backward: str = "analytic", init: str = "kcenter", init_features: int = 1024,
                 seeding: str = "authors"):
        super().__init__(dim)
        _check_transport_args(transport_ratio, entropy, iterations, backward)
        if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, int) or num_prototypes < 1:
            raise ValueError(f"num_prototypes must be an integer >= 1, got {num_prototypes!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if seeding not in SEEDINGS:
            raise ValueError(f"seeding must be one of {SEEDINGS}, got {seeding!r}")
        least = 2 * num_prototypes if seeding == "authors" else num_prototypes  # authors: m seeds + m candidates
        if isinstance(init_features, bool) or not isinstance(init_features, int) or init_features < least:
            raise ValueError(f"init_features must be an integer >= {'2 * ' if seeding == 'authors' else ''}"
                             f"num_prototypes ({least}) with seeding={seeding!r}, got {init_features!r}")
        self.num_prototypes = num_prototypes
        self.transport_ratio = float(transport_ratio)
        self.entropy = float(entropy)
        self.iterations = iterations
        self.backward = backward
        self.init = init
        self.init_features = init_features
        self.seeding = seeding
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, self.dim) / math.sqrt(self.dim))  # [m, d]
        self.register_buffer("initialized", torch.tensor(init == "random"))
        self.register_buffer("collected", torch.zeros(init_features if init == "kcenter" else 0, self.dim))
        self.register_buffer("num_collected", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_prototypes={self.num_prototypes}, transport_ratio={self.transport_ratio}, "
                f"entropy={self.entropy}, iterations={self.iterations}, backward={self.backward!r}, "
                f"init={self.init!r}, seeding={self.seeding!r}")

    @torch.no_grad()
    def _collect(self, features: torch.Tensor) -> None:
        """Add detached local features [B, n, d] to the k-center pool; initialise once it is full."""
        start = int(self.num_collected)
        take = min(self.init_features - start, features.shape[0] * features.shape[1])
        flat = features.reshape(-1, self.dim)
        rows = flat[torch.randperm(flat.shape[0], device=flat.device)[:take]]
        self.collected[start:start + take] = rows.to(self.collected.dtype)
        self.num_collected += take
        if int(self.num_collected) >= self.init_features:
            pool = self.collected.to(self.prototypes.dtype)
            chosen = kcenter(_unit_ball(pool), self.num_prototypes)
            self.prototypes.copy_(pool[chosen])
            self.initialized.fill_(True)

    @torch.no_grad()
    def _collect_embeddings(self, embeddings: torch.Tensor) -> None:
        """The authors' memory: add ``N(z)`` of the images' GAP embeddings [B, d] in order; a batch that would run
        past the end is written at the last ``B`` rows instead. Once ``init_features`` rows have been written,
        k-center seeded with the first ``m`` rows picks the prototypes among the others."""
        rows = _unit_ball(embeddings.reshape(-1, self.dim))[-self.init_features:]  # [b, d]
        start = min(int(self.num_collected), self.init_features - rows.shape[0])
        self.collected[start:start + rows.shape[0]] = rows.to(self.collected.dtype)
        self.num_collected += rows.shape[0]
        if int(self.num_collected) >= self.init_features:
            m = self.num_prototypes
            pool = self.collected.to(self.prototypes.dtype)
            chosen = kcenter_from_seeds(pool[m:], pool[:m], m)
            self.prototypes.copy_(pool[m:][chosen])
            self.initialized.fill_(True)

    def transport(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``pi`` [B, m, n] and ``rho`` [B, n] for local features [B, n, d]."""
        cost = prototype_cost(features, self.prototypes.to(features.dtype))
        return gsp_transport(cost, self.transport_ratio, self.entropy, self.iterations, self.backward)

    def forward(self, feature_map: torch.Tensor) -> PoolingOutput:
        if feature_map.dim() != 4 or feature_map.shape[1] != self.dim:
            raise ValueError(f"GSP expects a feature map [B, {self.dim}, H, W], got {tuple(feature_map.shape)}")
        # the cost, the solver and the weighting run in float32 (or float64), also under autocast (AMP), like XML's
        # histogram: the transport's exponentials and fixed point are not safe in float16
        with torch.autocast(device_type=feature_map.device.type, enabled=False):
            dtype = torch.promote_types(feature_map.dtype, torch.float32)
            features = feature_map.to(dtype).flatten(2).transpose(1, 2)  # [B, n, d]
            if not bool(self.initialized):
                gap = features.mean(dim=1)  # [B, d]
                if not self.training:
                    return PoolingOutput(gap, None)
                if self.seeding == "authors":  # the batch that fills the memory is still pooled by GAP
                    self._collect_embeddings(gap.detach() if self.gather_fn is None else self.gather_fn(gap.detach()))
                    return PoolingOutput(gap, None)
                self._collect(features.detach() if self.gather_fn is None else self.gather_fn(features.detach()))
                if not bool(self.initialized):
                    return PoolingOutput(gap, None)
            pi, rho = self.transport(features)  # [B, m, n], [B, n]
            mu = self.transport_ratio
            histogram = pi.sum(dim=2) / mu  # [B, m]
            if mu == 1.0:  # w_i = 1: GAP exactly
                embedding = features.mean(dim=1)
            else:
                n = features.shape[1]
                weights = (1 - n * rho) / mu  # [B, n]
                embedding = torch.einsum("bn,bnd->bd", weights, features) / n  # [B, d]
        return PoolingOutput(embedding, histogram)


__all__ = ["GeneralizedSumPooling", "gsp_transport", "prototype_cost", "kcenter", "kcenter_from_seeds", "SEEDINGS"]
