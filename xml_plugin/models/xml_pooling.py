"""XML's prototype pooling: GAP embedding plus the histogram operator over prototypes (docs/methods.md, XML).

The embedding is exactly GAP, ``z = (1/n) sum_i f_i``, in training and at evaluation (no inference cost).
Beside it, each image gets a histogram ``h`` in the simplex: the share of its ``n = H*W`` local features
assigned to each of ``m`` prototypes (by the largest inner product, the appendix's Def. 4 / Claim 1, or by the
nearest prototype). The prototypes ``W`` [m, d] are the weights of a linear predictor ``z ~= W^T h``, learnt
without gradient by recursive least squares with forgetting over the training batches.

Everything the recursion needs (``prototypes``, ``rls_p``, ``rls_q``, ``initialized``) is a buffer: it is
saved in checkpoints and never touched by an optimizer.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..registry import register
from .pooling import Pooling, PoolingOutput
from .seeding import farthest_point_indices

ASSIGNMENTS = ("hard", "soft")
ASSIGNMENT_RULES = ("inner_product", "nearest")
INITS = ("kmeans++", "kcenter")


# ---------------------------------------------------------------------------------------------
# pure functions for the math

def squared_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``||f - w||^2 = ||f||^2 - 2 f.w + ||w||^2`` for features [N, d] and prototypes [m, d] -> [N, m], float32+.

    Clamped at 0 (the expansion can go slightly negative by rounding).
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    f, w = features.to(dtype), prototypes.to(dtype)
    d2 = (f * f).sum(1, keepdim=True) - 2.0 * (f @ w.T) + (w * w).sum(1)[None, :]  # [N, m]
    return d2.clamp_min(0.0)


def unit_ball(local_features: torch.Tensor) -> torch.Tensor:
    """The map into the unit ball that the appendix's Lemma 1 assumes: per image, ``x_i / max_j ||x_j||``.

    ``local_features`` [B, n, d] -> [B, n, d]. A uniform scaling of each image's features (a similarity: every
    distance between them shrinks by the same factor, so relative distances are kept), the farthest one on the
    unit sphere; per image, so that an image's histogram does not depend on the batch. An all-zero image stays 0.
    """
    radius = local_features.norm(dim=-1).amax(dim=-1, keepdim=True).clamp_min(1e-12)  # [B, 1]
    return local_features / radius[..., None]


def assignment_scores(local_features: torch.Tensor, prototypes: torch.Tensor, assignment_rule: str = "inner_product",
                      map_to_unit_ball: bool = True) -> torch.Tensor:
    """Scores [B*n, m] of local features [B, n, d] against prototypes [m, d], larger = preferred, float32+.

    ``inner_product`` (Def. 4 / Claim 1): ``w_k^T x~_i`` with ``x~ = unit_ball(x)`` (``map_to_unit_ball=False``:
    ``w_k^T x_i``, the same argmax per location). ``nearest``: ``-||f_i - w_k||^2``.
    """
    b, n, d = local_features.shape
    if assignment_rule == "inner_product":
        dtype = torch.promote_types(local_features.dtype, torch.float32)
        x = local_features.to(dtype)
        x = (unit_ball(x) if map_to_unit_ball else x).reshape(b * n, d)
        return x @ prototypes.to(dtype).T  # [B*n, m]
    if assignment_rule == "nearest":
        return -squared_distances(local_features.reshape(b * n, d), prototypes)  # [B*n, m]
    raise ValueError(f"assignment_rule must be one of {ASSIGNMENT_RULES}, got {assignment_rule!r}")


def prototype_histogram(local_features: torch.Tensor, prototypes: torch.Tensor, assignment: str = "hard",
                        temperature: float = 0.1, assignment_rule: str = "inner_product") -> torch.Tensor:
    """Histogram operator (docs/methods.md, XML): local features [B, n, d] -> histograms [B, m], rows in the simplex.

    With ``s_ik`` the :func:`assignment_scores` (``inner_product``: ``w_k^T x~_i``; ``nearest``: ``-||f_i - w_k||^2``):
    ``hard``: ``h_k = (1/n) #{i : argmax_j s_ij = k}`` (ties go to the lowest index; no gradient).
    ``soft``: ``h_k = (1/n) sum_i softmax_k(s_ik / temperature)`` (differentiable in the features).
    A hard ``inner_product`` assignment does not depend on the unit-ball map (a positive factor per image does not
    move an argmax), so it is computed on the features as they are. Computed in float32 (also under autocast).
    """
    b, n, d = local_features.shape
    m = prototypes.shape[0]
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    # the hard argmax does not need the unit-ball map: skip its division (and its rounding)
    scores = assignment_scores(local_features, prototypes, assignment_rule, map_to_unit_ball=assignment == "soft")
    if assignment == "hard":
        return _count_histogram(scores.argmax(dim=1).view(b, n), m, scores.dtype)
    weights = torch.softmax(scores / temperature, dim=1)  # [B*n, m]
    return weights.view(b, n, m).mean(dim=1)  # [B, m]


def _count_histogram(chosen: torch.Tensor, m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Chosen prototype indices [B, n] -> histograms [B, m] with entries k/n (integer counts, exact)."""
    b, n = chosen.shape
    counts = torch.zeros(b, m, dtype=dtype, device=chosen.device)
    counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=counts.dtype))
    return counts / n


class RecursionState(NamedTuple):
    """The recursion's statistics before the latest training batch's update, ``(P_{t-1}, Q_{t-1})``, and its constants:
    what XML's cross-batch loss needs for ``cross_fit: recursive`` (one :func:`rls_update` of them with a half)."""
    p: torch.Tensor  # [m, m]
    q: torch.Tensor  # [m, d]
    forgetting: float
    ridge: float


def rls_update(p: torch.Tensor, q: torch.Tensor, h: torch.Tensor, z: torch.Tensor, forgetting: float,
               ridge: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of recursive least squares with forgetting (docs/methods.md, XML: prototypes by recursive least squares).

    ``P = a P + H^T H``, ``Q = a Q + H^T Z``, ``W = (P + eps I)^-1 Q`` with ``p`` [m, m], ``q`` [m, d],
    ``h`` [B, m], ``z`` [B, d]. Returns the new ``(P, Q, W)``; the solve runs in float64 (``m x m`` is small).
    """
    h32, z32 = h.to(p.dtype), z.to(q.dtype)
    p_new = forgetting * p + h32.T @ h32  # [m, m]
    q_new = forgetting * q + h32.T @ z32  # [m, d]
    m = p.shape[0]
    eye = torch.eye(m, dtype=torch.float64, device=p.device)
    w = torch.linalg.solve(p_new.double() + ridge * eye, q_new.double())  # [m, d]
    return p_new, q_new, w.to(q.dtype)


def kmeans_pp_seeds(points: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """k-means++ seeding: ``k`` rows of ``points`` [N, d], each drawn with probability ~ squared distance to the
    nearest seed already chosen. With fewer than ``k`` distinct points, once every point coincides with a seed
    the remaining seeds are drawn uniformly (duplicates). Deterministic given torch's RNG (or ``generator``)."""
    pts = points.float()
    n = pts.shape[0]
    idx = [int(torch.randint(n, (1,), generator=generator, device="cpu"))]
    nearest = squared_distances(pts, pts[idx[0]][None]).squeeze(1)  # [N]
    for _ in range(1, k):
        total = nearest.sum()
        if float(total) > 0.0:
            probs = (nearest / total).cpu()
        else:  # every point already is a seed: duplicate
            probs = torch.full((n,), 1.0 / n)
        j = int(torch.multinomial(probs, 1, generator=generator))
        idx.append(j)
        nearest = torch.minimum(nearest, squared_distances(pts, pts[j][None]).squeeze(1))
    return points[torch.tensor(idx, device=points.device)]


def kcenter_seeds(points: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """k-center (farthest point) seeding: a random first row of ``points`` [N, d], then repeatedly the row
    farthest from the seeds chosen so far (ties: lowest index, so duplicates once all points are seeds)."""
    first = int(torch.randint(points.shape[0], (1,), generator=generator, device="cpu"))
    return points[farthest_point_indices(points, k, first)]


_SEEDERS = {"kmeans++": kmeans_pp_seeds, "kcenter": kcenter_seeds}


# ---------------------------------------------------------------------------------------------
# the module

@register("pooling", name="xml")
class PrototypePooling(Pooling):
    """XML pooling: ``embedding = GAP`` [B, d] and ``histogram`` [B, m] over ``num_prototypes`` prototypes.

    ``assignment_rule``: ``inner_product`` (the default: the appendix's Def. 4 / Claim 1, ``argmax_k w_k^T x~`` with
    the features mapped into the unit ball by :func:`unit_ball`) or ``nearest`` (``argmin_k ||f - w_k||``).

    Training forward: on the first call the prototypes are seeded from the batch's local features
    (``init``), then each call returns the histogram computed with the current prototypes and afterwards
    updates them by recursive least squares (:func:`rls_update`), without gradient; ``recursion_state`` then
    holds the statistics from before that update (None until the first training forward).
    Evaluation forward: no update; the histogram is returned too (for analysis) once initialised.
    Before initialisation (an evaluation call on a fresh module) the pooling is plain GAP and returns
    ``histogram=None``.

    ``prior``: weight of the seeds in the recursion state (``P_0 = prior I``, ``Q_0 = prior W_0``, so that
    ``W(P_0, Q_0) = prior / (prior + ridge) W_0 ~= W_0``: the usual RLS start from a prior). It keeps
    prototypes that no local feature visits near their seed instead of collapsing them to 0; it fades with
    the forgetting factor.
    ``prior=0`` is the literal recursion from an empty state.
    """

    gives_histogram = True
    # several processes (engine/distributed.py): all-gathers a detached [b, ...] batch tensor across them, so that the
    # seeding and the recursion see the global batch on every rank; None: this process's batch is the whole batch
    gather_fn = None

    def __init__(self, dim: int, num_prototypes: int = 64, assignment: str = "hard", temperature: float = 0.1,
                 forgetting: float = 0.99, ridge: float = 1e-3, init: str = "kmeans++", prior: float = 1.0,
                 assignment_rule: str = "inner_product"):
        super().__init__(dim)
        if isinstance(num_prototypes, bool) or int(num_prototypes) != num_prototypes or num_prototypes < 1:
            raise ValueError(f"num_prototypes must be an integer >= 1, got {num_prototypes!r}")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if assignment_rule not in ASSIGNMENT_RULES:
            raise ValueError(f"assignment_rule must be one of {ASSIGNMENT_RULES}, got {assignment_rule!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0 < forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not prior >= 0:
            raise ValueError(f"prior must be >= 0, got {prior!r}")
        self.num_prototypes = int(num_prototypes)
        self.assignment = assignment
        self.assignment_rule = assignment_rule
        self.temperature = float(temperature)
        self.forgetting = float(forgetting)
        self.ridge = float(ridge)
        self.init = init
        self.prior = float(prior)
        m, d = self.num_prototypes, self.dim
        self.register_buffer("prototypes", torch.zeros(m, d))  # W [m, d]
        self.register_buffer("rls_p", torch.zeros(m, m))  # P [m, m]
        self.register_buffer("rls_q", torch.zeros(m, d))  # Q [m, d]
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.recursion_state: Optional[RecursionState] = None  # (P_{t-1}, Q_{t-1}) of the latest update; not saved

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_prototypes={self.num_prototypes}, assignment={self.assignment!r}, "
                f"assignment_rule={self.assignment_rule!r}, "
                f"temperature={self.temperature}, forgetting={self.forgetting}, ridge={self.ridge}, "
                f"init={self.init!r}, prior={self.prior}")

    @torch.no_grad()
    def initialize(self, local_features: torch.Tensor) -> None:
        """Seed the prototypes from local features [N, d] (detached) and reset the recursion state."""
        seeds = _SEEDERS[self.init](local_features.detach().float(), self.num_prototypes)  # [m, d]
        self.prototypes.copy_(seeds)
        eye = torch.eye(self.num_prototypes, device=self.rls_p.device, dtype=self.rls_p.dtype)
        self.rls_p.copy_(self.prior * eye)
        self.rls_q.copy_(self.prior * seeds)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, histogram: torch.Tensor, embedding: torch.Tensor) -> None:
        """One RLS step on a batch: histograms [B, m], GAP embeddings [B, d]; keeps the state it started from."""
        self.recursion_state = RecursionState(self.rls_p.clone(), self.rls_q.clone(), self.forgetting, self.ridge)
        p, q, w = rls_update(self.rls_p, self.rls_q, histogram.detach(), embedding.detach(), self.forgetting,
                             self.ridge)
        self.rls_p.copy_(p)
        self.rls_q.copy_(q)
        self.prototypes.copy_(w)

    def forward(self, feature_map: torch.Tensor) -> PoolingOutput:
        if feature_map.dim() != 4 or feature_map.shape[1] != self.dim:
            raise ValueError(f"PrototypePooling(dim={self.dim}) expects a feature map [B, {self.dim}, H, W], "
                             f"got {tuple(feature_map.shape)}")
        embedding = feature_map.mean(dim=(2, 3))  # [B, d], exactly GAP
        if not bool(self.initialized) and not self.training:
            return PoolingOutput(embedding, None)
        b, d, hgt, wid = feature_map.shape
        with torch.autocast(device_type=feature_map.device.type, enabled=False):
            local = feature_map.float().flatten(2).transpose(1, 2)  # [B, n, d]
            if not bool(self.initialized):
                self.initialize(self._global(local).reshape(-1, d))
            # a copy: the update below overwrites the buffer that a soft histogram's graph holds on to
            prototypes = self.prototypes.clone() if self.training else self.prototypes
            histogram = prototype_histogram(local, prototypes, self.assignment, self.temperature,
                                            self.assignment_rule)  # [B, m]
            if self.training:
                self.update(self._global(histogram), self._global(embedding.float()))
        return PoolingOutput(embedding, histogram)

    def _global(self, batch: torch.Tensor) -> torch.Tensor:
        """The global batch's rows of ``batch`` (detached) when several processes share it, else ``batch``."""
        return batch if self.gather_fn is None else self.gather_fn(batch.detach())

    def pool_linear(self, trunk_map, weight, bias=None):
        """Hard assignment only: ``z = weight mean(x) + bias`` (GAP commutes with the projection) and the chosen
        prototype of each projected location ``f_i = weight x_i + bias`` found without projecting it, from one [C, m]
        product instead of [C, d]: ``argmax_j w_j.f_i = argmax_j x_i.(weight^T w_j) + w_j.bias`` (``inner_product``;
        the unit-ball map, a positive factor per image, does not move the argmax) and
        ``argmin_j ||f_i - w_j||^2 = argmin_j ||w_j||^2 - 2 w_j.bias - 2 x_i.(weight^T w_j)`` (``nearest``; ``||f_i||^2``
        is the same for every j). The hard histogram needs no gradient. The first training call (seeding) projects
        every location once."""
        if self.assignment != "hard" or (not bool(self.initialized) and not self.training):
            return None
        b, c, hgt, wid = trunk_map.shape
        embedding = torch.nn.functional.linear(trunk_map.mean(dim=(2, 3)), weight, bias)  # [B, d]
        with torch.no_grad(), torch.autocast(device_type=trunk_map.device.type, enabled=False):
            x = trunk_map.detach().float().flatten(2)  # [B, C, n]
            w32 = weight.detach().float()
            b32 = None if bias is None else bias.detach().float()
            if not bool(self.initialized):
                self.initialize(torch.nn.functional.linear(self._global(x).transpose(1, 2).reshape(-1, c), w32, b32))
            protos = self.prototypes.float()  # [m, d]
            products = torch.matmul(protos @ w32, x)  # [B, m, n]: w_j.(weight x_i)
            if self.assignment_rule == "inner_product":
                scores = products if b32 is None else products + (protos @ b32)[None, :, None]
                chosen = scores.argmax(dim=1)  # [B, n]
            else:
                offset = (protos * protos).sum(1)  # [m]
                if b32 is not None:
                    offset = offset - 2.0 * (protos @ b32)
                chosen = (offset[None, :, None] - 2.0 * products).argmin(dim=1)  # [B, n]
            histogram = _count_histogram(chosen, self.num_prototypes)  # [B, m]
            if self.training:
                self.update(self._global(histogram), self._global(embedding.float()))
        return PoolingOutput(embedding, histogram)


__all__ = ["PrototypePooling", "RecursionState", "assignment_scores", "prototype_histogram", "rls_update",
           "squared_distances", "unit_ball", "kmeans_pp_seeds", "kcenter_seeds"]
