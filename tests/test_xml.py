"""XML: prototype pooling (histogram operator, RLS prototypes) and the cross-batch loss wrapper (docs/methods.md, XML)."""
import copy
import math

import numpy as np

import pytest
import torch
from pytorch_metric_learning import losses, miners
from torch import nn

from xml_plugin.losses import cross_batch
from xml_plugin.losses.cross_batch import CrossBatchMetricLoss, class_halves
from xml_plugin.losses.ridge import ridge_fit_predict
from xml_plugin.models.pooling import GlobalAveragePooling
from xml_plugin.models.xml_pooling import (PrototypePooling, RecursionState, kcenter_seeds, kmeans_pp_seeds,
                                           prototype_histogram, rls_update, unit_ball)


def _clustered_maps(**kwargs):
    """Feature maps [N, 2, n_side, n_side] whose local features sit near a few 2-D cluster centres (the toy of
    benchmarks/xml_rules_toy.py, one definition for both)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from xml_rules_toy import clustered_maps
    return clustered_maps(**kwargs)


# ---------------------------------------------------------------------------------------------
# histogram operator, embedding

def _brute_force_choice(local, prototypes, rule):
    """Per image and location, the chosen prototype by loops: the largest ``w_k . x~`` with ``x~`` the image's features
    divided by their largest norm (``inner_product``), or the smallest ``||f - w_k||`` (``nearest``). [B, n] ints."""
    b, n, _ = local.shape
    chosen = torch.zeros(b, n, dtype=torch.long)
    for i in range(b):
        radius = max(float(local[i, j].double().norm()) for j in range(n))
        for j in range(n):
            x = local[i, j].double()
            if rule == "inner_product":
                scores = [float(prototypes[k].double() @ (x / radius)) for k in range(len(prototypes))]
            else:
                scores = [-float((x - prototypes[k].double()).norm()) for k in range(len(prototypes))]
            chosen[i, j] = max(range(len(scores)), key=lambda k: (scores[k], -k))  # ties: the lowest index
    return chosen


@pytest.mark.parametrize("rule", ["inner_product", "nearest"])
def test_hard_histogram_rows_in_simplex_with_multiples_of_one_over_n(rule):
    torch.manual_seed(0)
    pool = PrototypePooling(6, num_prototypes=10, assignment_rule=rule).train()
    fmap = torch.randn(5, 6, 3, 4)  # n = 12
    out = pool(fmap)
    h = out.histogram
    assert h.shape == (5, 10)
    assert torch.all(h >= 0)
    assert torch.allclose(h.sum(1), torch.ones(5))
    counts = h * 12
    assert torch.allclose(counts, counts.round(), atol=1e-5)
    # the counts are the chosen-prototype counts, checked by brute force (the prototypes were updated by the call:
    # recompute in eval mode with the current ones)
    local = fmap.flatten(2).transpose(1, 2)  # [B, n, d]
    pool.eval()
    h_eval = pool(fmap).histogram
    chosen = _brute_force_choice(local, pool.prototypes, rule)
    expected = torch.stack([torch.bincount(r, minlength=10) for r in chosen]).float() / 12
    assert torch.equal(h_eval, expected)
    assert torch.equal(prototype_histogram(local, pool.prototypes, assignment_rule=rule), expected)


def test_default_rule_is_the_appendix_inner_product():
    assert PrototypePooling(4).assignment_rule == "inner_product"
    torch.manual_seed(0)
    local, w = torch.randn(3, 9, 4), torch.randn(5, 4) * torch.tensor([[1.0], [3.0], [0.5], [2.0], [1.0]])
    assert torch.equal(prototype_histogram(local, w),
                       prototype_histogram(local, w, assignment_rule="inner_product"))


def test_rules_agree_when_all_prototypes_have_the_same_norm_and_differ_otherwise():
    torch.manual_seed(0)
    local = torch.randn(4, 16, 3) * 2.0
    w = torch.nn.functional.normalize(torch.randn(8, 3), dim=1) * 1.7  # equal norms: argmin ||f - w|| = argmax w.f
    assert torch.equal(prototype_histogram(local, w, assignment_rule="inner_product"),
                       prototype_histogram(local, w, assignment_rule="nearest"))
    w_unequal = w * torch.linspace(0.2, 3.0, 8)[:, None]
    assert not torch.equal(prototype_histogram(local, w_unequal, assignment_rule="inner_product"),
                           prototype_histogram(local, w_unequal, assignment_rule="nearest"))


def test_unit_ball_is_a_per_image_scaling_onto_the_unit_ball():
    torch.manual_seed(0)
    local = torch.randn(3, 7, 4) * torch.tensor([0.1, 5.0, 30.0])[:, None, None]
    local[2] = 0.0  # an all-zero image stays at 0
    mapped = unit_ball(local)
    norms = mapped.norm(dim=-1)
    assert torch.allclose(norms[:2].amax(dim=1), torch.ones(2)) and torch.all(norms <= 1 + 1e-6)
    assert torch.equal(mapped[2], torch.zeros(7, 4))
    for i in range(2):  # relative distances kept: every pairwise distance divided by the same factor
        ratio = torch.cdist(mapped[i], mapped[i]) / torch.cdist(local[i], local[i]).clamp_min(1e-12)
        off = ~torch.eye(7, dtype=torch.bool)
        assert torch.allclose(ratio[off], torch.full((42,), 1.0 / float(local[i].norm(dim=1).max())), rtol=1e-5)


def test_soft_inner_product_is_a_softmax_of_unit_ball_inner_products():
    torch.manual_seed(0)
    local, w, tau = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), 0.3
    got = prototype_histogram(local, w, "soft", tau, assignment_rule="inner_product")
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for i in range(2):
        radius = max(float(local[i, j].norm()) for j in range(5))
        for j in range(5):
            s = [float(w[k] @ local[i, j]) / radius / tau for k in range(4)]
            e = [math.exp(v - max(s)) for v in s]
            for k in range(4):
                expected[i, k] += e[k] / sum(e) / 5
    assert torch.allclose(got, expected, atol=1e-12)
    cold = prototype_histogram(local, w, "soft", 1e-6, assignment_rule="inner_product")  # tends to the hard rule
    assert torch.allclose(cold, prototype_histogram(local, w, assignment_rule="inner_product"), atol=1e-6)


def test_inner_product_never_chooses_a_prototype_inside_the_hull_of_the_others():
    # the argmax of a linear function over a finite set lies on a vertex of its convex hull: the centre prototype
    # (inside the square of the other four) is never chosen by the inner product, often by the nearest rule
    w = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
    torch.manual_seed(0)
    local = torch.randn(20, 9, 2) * 0.5
    inner = prototype_histogram(local, w, assignment_rule="inner_product")
    nearest = prototype_histogram(local, w, assignment_rule="nearest")
    assert float(inner[:, 4].sum()) == 0.0 and float(nearest[:, 4].sum()) > 0.5 * 20


def test_soft_histogram_in_simplex_and_differentiable():
    torch.manual_seed(0)
    fmap = torch.randn(4, 5, 3, 3, requires_grad=True)
    pool = PrototypePooling(5, num_prototypes=7, assignment="soft", temperature=0.5).train()
    h = pool(fmap).histogram
    assert torch.all(h > 0) and torch.allclose(h.sum(1), torch.ones(4))
    h[:, 0].sum().backward()
    assert fmap.grad is not None and fmap.grad.abs().sum() > 0
    # a cold soft assignment approaches the hard one
    local = fmap.detach().flatten(2).transpose(1, 2)
    for rule in ("inner_product", "nearest"):
        cold = prototype_histogram(local, pool.prototypes, "soft", temperature=1e-6, assignment_rule=rule)
        hard = prototype_histogram(local, pool.prototypes, "hard", assignment_rule=rule)
        assert torch.allclose(cold, hard, atol=1e-4)


def test_embedding_is_exactly_gap_in_train_and_eval_and_before_init():
    torch.manual_seed(0)
    fmap = torch.randn(3, 8, 5, 5)
    gap = GlobalAveragePooling(8)(fmap).embedding
    pool = PrototypePooling(8, num_prototypes=4)
    pool.eval()
    out = pool(fmap)  # never initialised: plain GAP, no histogram
    assert out.histogram is None and torch.equal(out.embedding, gap)
    assert not bool(pool.initialized)
    pool.train()
    assert torch.equal(pool(fmap).embedding, gap)
    assert bool(pool.initialized)
    pool.eval()
    out = pool(fmap)
    assert torch.equal(out.embedding, gap) and out.histogram is not None


def test_prototypes_are_buffers_not_parameters():
    pool = PrototypePooling(4, num_prototypes=3)
    assert list(pool.parameters()) == []
    keys = set(pool.state_dict())
    assert {"prototypes", "rls_p", "rls_q", "initialized"} <= keys


def test_eval_mode_does_not_update_and_train_mode_does():
    torch.manual_seed(0)
    pool = PrototypePooling(4, num_prototypes=5).train()
    pool(torch.randn(6, 4, 3, 3))
    before = pool.prototypes.clone()
    pool.eval()
    pool(torch.randn(6, 4, 3, 3) + 2.0)
    assert torch.equal(pool.prototypes, before)
    pool.train()
    pool(torch.randn(6, 4, 3, 3) + 2.0)
    assert not torch.equal(pool.prototypes, before)


def test_histogram_in_float32_under_autocast():
    torch.manual_seed(0)
    pool = PrototypePooling(6, num_prototypes=5).train()
    pool(torch.randn(4, 6, 3, 3))
    pool.eval()
    conv = nn.Conv2d(3, 6, 1)
    x = torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fmap = conv(x)
        out = pool(fmap)
    assert fmap.dtype == torch.bfloat16
    assert out.histogram.dtype == torch.float32
    expected = prototype_histogram(fmap.float().flatten(2).transpose(1, 2), pool.prototypes)
    assert torch.equal(out.histogram, expected)


# ---------------------------------------------------------------------------------------------
# GAP as a convex combination, RLS

def _gap_error(pool, maps):
    out = pool.eval()(maps)
    approx = out.histogram @ pool.prototypes  # [N, d] = W^T h per image
    return (out.embedding - approx).norm(dim=1).mean().item()


def test_gap_approximation_error_shrinks_with_more_prototypes():  # the nearest rule's quantisation bound
    maps = _clustered_maps()
    gap_norm = maps.mean(dim=(2, 3)).norm(dim=1).mean().item()
    errors = []
    for m in (1, 3, 24):
        torch.manual_seed(0)
        pool = PrototypePooling(2, num_prototypes=m, forgetting=0.9, init="kcenter", assignment_rule="nearest").train()
        for _ in range(30):  # RLS on a stationary stream: the prototypes settle
            pool(maps)
        errors.append(_gap_error(pool, maps))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05 * gap_norm  # enough prototypes: GAP is almost exactly W^T h


def test_rls_update_equals_batch_least_squares_with_forgetting():
    g = torch.Generator().manual_seed(0)
    m, d, ridge = 6, 3, 1e-3
    w_true = torch.randn(m, d, generator=g)
    hs, zs = [], []
    for _ in range(5):
        h = torch.softmax(torch.randn(10, m, generator=g) * 2, dim=1)
        hs.append(h)
        zs.append(h @ w_true + 0.1 * torch.randn(10, d, generator=g))
    for forgetting in (1.0, 0.7):
        p, q = torch.zeros(m, m), torch.zeros(m, d)
        for h, z in zip(hs, zs):
            p, q, w = rls_update(p, q, h, z, forgetting, ridge)
        # weighted ridge least squares over the whole stream, via lstsq on the augmented system
        weights = torch.cat([torch.full((10,), forgetting ** (len(hs) - 1 - t)) for t in range(len(hs))]).double()
        a = torch.cat([torch.cat(hs).double() * weights.sqrt()[:, None], ridge ** 0.5 * torch.eye(m).double()])
        b = torch.cat([torch.cat(zs).double() * weights.sqrt()[:, None], torch.zeros(m, d).double()])
        expected = torch.linalg.lstsq(a, b).solution
        assert torch.allclose(w.double(), expected, atol=1e-4)
    # stationary, noise-free stream: the recursion recovers the generating prototypes
    p, q = torch.zeros(m, m), torch.zeros(m, d)
    for h in hs:
        p, q, w = rls_update(p, q, h, h @ w_true, 1.0, 1e-6)
    assert torch.allclose(w, w_true, atol=1e-3)


def test_module_recursion_matches_least_squares_on_its_own_stream():
    torch.manual_seed(0)
    pool = PrototypePooling(3, num_prototypes=4, forgetting=1.0, ridge=1e-3, prior=0.0).train()
    hs, zs = [], []
    for _ in range(4):
        out = pool(torch.randn(8, 3, 4, 4) + torch.randn(8, 3, 1, 1))
        hs.append(out.histogram)
        zs.append(out.embedding)
    h, z = torch.cat(hs).double(), torch.cat(zs).double()
    expected = torch.linalg.solve(h.T @ h + 1e-3 * torch.eye(4).double(), h.T @ z)
    assert torch.allclose(pool.prototypes.double(), expected, atol=1e-4)


def test_prior_keeps_unvisited_prototypes_at_their_seed():
    # two distinct local features, three prototypes: the third seed duplicates one and never gets mass
    fmap = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, 4.0]]).T.reshape(1, 2, 2, 2)
    for prior in (1.0, 0.0):
        torch.manual_seed(0)
        pool = PrototypePooling(2, num_prototypes=3, init="kcenter", prior=prior).train()
        out = pool(fmap)
        seeds = fmap.flatten(2)[0].T[[0, 2]]  # the two distinct features
        unvisited = out.histogram[0] == 0
        assert int(unvisited.sum()) == 1
        if prior > 0:  # stays at its seed (up to the shrink prior / (prior + ridge))
            assert torch.cdist(pool.prototypes[unvisited], seeds).min() < 0.01
        else:  # the literal recursion from an empty state sends it to 0
            assert pool.prototypes[unvisited].norm() < 1e-6


# ---------------------------------------------------------------------------------------------
# initialisation

def test_seeding_is_deterministic_and_copes_with_few_distinct_features():
    pts = torch.randn(50, 3)
    torch.manual_seed(1)
    a = kmeans_pp_seeds(pts, 8)
    torch.manual_seed(1)
    b = kmeans_pp_seeds(pts, 8)
    assert torch.equal(a, b)
    few = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]]).repeat(10, 1)  # 3 distinct points
    for seeder in (kmeans_pp_seeds, kcenter_seeds):
        seeds = seeder(few, 8)
        assert seeds.shape == (8, 3)
        assert torch.unique(seeds, dim=0).shape[0] == 3  # all distinct points used, then duplicates
    fmap = few[:9].T.reshape(1, 3, 3, 3)
    for init in ("kmeans++", "kcenter"):
        pool = PrototypePooling(3, num_prototypes=16, init=init).train()
        h = pool(fmap).histogram
        assert torch.isfinite(pool.prototypes).all() and torch.allclose(h.sum(1), torch.ones(1))


def test_kcenter_picks_far_apart_points():
    pts = torch.cat([torch.randn(30, 2) * 0.01 + c for c in (torch.tensor([0.0, 0.0]), torch.tensor([9.0, 0.0]),
                                                              torch.tensor([0.0, 9.0]))])
    seeds = kcenter_seeds(pts, 3)
    d = torch.cdist(seeds, seeds) + torch.eye(3) * 100
    assert d.min() > 8.0


# ---------------------------------------------------------------------------------------------
# shared ridge routine

@pytest.mark.parametrize("a", [5, 40])  # a < m: kernel form; a >= m: primal form
def test_ridge_fit_predict_matches_lstsq(a):
    g = torch.Generator().manual_seed(0)
    m, d = 12, 4
    h_fit = torch.rand(a, m, generator=g, dtype=torch.float64)
    z_fit = torch.randn(a, d, generator=g, dtype=torch.float64)
    h_pred = torch.rand(7, m, generator=g, dtype=torch.float64)
    got = ridge_fit_predict(h_fit, z_fit, h_pred, ridge=1e-9)
    w = torch.linalg.lstsq(h_fit, z_fit, driver="gelsd").solution  # minimum norm when a < m
    assert torch.allclose(got, h_pred @ w, atol=1e-5)
    # the other form, written out, gives the same answer at a real ridge
    ridge = 0.3
    got = ridge_fit_predict(h_fit, z_fit, h_pred, ridge=ridge)
    primal = h_pred @ torch.linalg.solve(h_fit.T @ h_fit + ridge * torch.eye(m, dtype=torch.float64), h_fit.T @ z_fit)
    kernel = h_pred @ h_fit.T @ torch.linalg.solve(h_fit @ h_fit.T + ridge * torch.eye(a, dtype=torch.float64), z_fit)
    assert torch.allclose(got, primal, atol=1e-8) and torch.allclose(got, kernel, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# cross-batch loss

def _batch(num_classes=6, per_class=4, d=8, m=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    emb = torch.randn(len(labels), d, generator=g) + 2 * torch.randn(num_classes, d, generator=g)[labels]
    hist = torch.softmax(3 * torch.randn(len(labels), m, generator=g), dim=1)
    return emb.requires_grad_(), labels, hist


def test_class_halves_rule():
    labels = torch.tensor([9, 5, 2, 5, 9, 2, 7])
    in_a, in_b = class_halves(labels)  # sorted classes 2, 5, 7, 9: A = {2, 5}
    assert labels[in_a].tolist() == [5, 2, 5, 2]
    in_a, in_b = class_halves(torch.tensor([5, 5, 2, 2, 9, 9]))  # odd: A gets floor(3/2) = 1 class
    assert in_a.tolist() == [False, False, True, True, False, False]
    assert torch.equal(in_b, ~in_a)


def test_lam_zero_is_exactly_the_base_loss_and_skips_the_fit(monkeypatch):
    emb, labels, hist = _batch()
    base = losses.MultiSimilarityLoss()
    monkeypatch.setattr(cross_batch, "ridge_fit_predict", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    wrapped = CrossBatchMetricLoss(base, lam=0.0)
    assert torch.equal(wrapped(emb, labels, hist), base(emb, labels))


def test_total_is_base_plus_lam_times_both_reconstruction_losses():
    emb, labels, hist = _batch()
    base = losses.MultiSimilarityLoss()
    wrapped = CrossBatchMetricLoss(base, lam=0.5, ridge=1e-2)
    total = wrapped(emb, labels, hist)
    a, b = labels < 3, labels >= 3
    z_hat_b = ridge_fit_predict(hist[a], emb[a], hist[b], 1e-2)
    z_hat_a = ridge_fit_predict(hist[b], emb[b], hist[a], 1e-2)
    reg = base(z_hat_b, labels[b]) + base(z_hat_a, labels[a])
    assert reg > 0
    assert torch.allclose(total, base(emb, labels) + 0.5 * reg)
    assert wrapped.last_xml_loss == pytest.approx(reg.item(), rel=1e-5)
    assert wrapped.last_base_loss == pytest.approx(base(emb, labels).item(), rel=1e-5)


def _state(m=10, d=8, forgetting=0.9, ridge=1e-3, seed=1, scale=3.0):
    """A recursion state (P, Q) as a stream of past batches leaves it: P = sum of H^T H, Q = sum of H^T Z."""
    g = torch.Generator().manual_seed(seed)
    h = torch.softmax(3 * torch.randn(40, m, generator=g), dim=1)
    z = torch.randn(40, d, generator=g) * scale
    return RecursionState(h.T @ h, h.T @ z, forgetting, ridge)


def _numpy_recursive_predict(state, h_fit, z_fit, h_pred):
    """One RLS step of (P, Q) with (H_fit, Z_fit), written out with numpy: W = (a P + H^T H + eps I)^-1 (a Q + H^T Z)."""
    p, q = state.p.double().numpy(), state.q.double().numpy()
    h, z, hp = (t.detach().double().numpy() for t in (h_fit, z_fit, h_pred))
    w = np.linalg.solve(state.forgetting * p + h.T @ h + state.ridge * np.eye(len(p)), state.forgetting * q + h.T @ z)
    return torch.from_numpy(hp @ w)


def test_recursive_cross_fit_is_one_rls_step_of_the_state_with_each_half():
    emb, labels, hist = _batch()
    state = _state()
    base = losses.MultiSimilarityLoss()
    wrapped = CrossBatchMetricLoss(base, lam=0.7, cross_fit="recursive")
    total = wrapped(emb, labels, hist, recursion_state=state)
    a, b = labels < 3, labels >= 3
    z_hat_b = _numpy_recursive_predict(state, hist[a], emb[a], hist[b]).float()
    z_hat_a = _numpy_recursive_predict(state, hist[b], emb[b], hist[a]).float()
    rec = wrapped.reconstructions(emb, labels, hist, state)
    torch.testing.assert_close(rec.z_hat_b, z_hat_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rec.z_hat_a, z_hat_a, atol=1e-4, rtol=1e-4)
    reg = base(z_hat_b, labels[b]) + base(z_hat_a, labels[a])
    assert torch.allclose(total, base(emb, labels) + 0.7 * reg, atol=1e-4)
    # the state matters: it is not the fresh ridge fit
    ridge_rec = CrossBatchMetricLoss(base, cross_fit="ridge").reconstructions(emb, labels, hist)
    assert not torch.allclose(ridge_rec.z_hat_b, rec.z_hat_b, atol=1e-2)


def test_recursive_from_an_empty_state_is_the_ridge_fit():
    emb, labels, hist = _batch()
    empty = RecursionState(torch.zeros(10, 10), torch.zeros(10, 8), 0.99, 1e-2)
    rec = CrossBatchMetricLoss(losses.MultiSimilarityLoss(), cross_fit="recursive").reconstructions(emb, labels, hist,
                                                                                                     empty)
    a, b = labels < 3, labels >= 3
    primal = hist[b] @ torch.linalg.solve(hist[a].T @ hist[a] + 1e-2 * torch.eye(10), hist[a].T @ emb[a])
    torch.testing.assert_close(rec.z_hat_b, primal, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cross_fit", ["ridge", "recursive"])
def test_the_fit_half_gets_gradients_and_the_target_half_only_through_its_own_fit(cross_fit):
    emb, labels, hist = _batch()
    wrapped = CrossBatchMetricLoss(losses.MultiSimilarityLoss(), cross_fit=cross_fit)
    rec = wrapped.reconstructions(emb, labels, hist, _state())
    a, b = labels < 3, labels >= 3
    (g,) = torch.autograd.grad(wrapped.loss(rec.z_hat_b, labels[b]), emb)  # L(Zhat_B, y_B) alone
    assert g[a].abs().sum() > 0  # Z_A: through the fit W_A
    assert torch.equal(g[b], torch.zeros_like(g[b]))  # Z_B: not the target, no path at all (hard histograms)


def test_bound_pooling_gives_the_state_before_its_latest_update():
    torch.manual_seed(0)
    pool = PrototypePooling(8, num_prototypes=10, forgetting=0.9).train()
    assert pool.recursion_state is None
    pool(torch.randn(24, 8, 3, 3))  # seeds, first update
    p_before, q_before = pool.rls_p.clone(), pool.rls_q.clone()
    emb_map = torch.randn(24, 8, 3, 3)
    out = pool(emb_map)  # second update
    state = pool.recursion_state
    assert torch.equal(state.p, p_before) and torch.equal(state.q, q_before)
    assert (state.forgetting, state.ridge) == (0.9, pool.ridge)
    assert not torch.equal(pool.rls_p, p_before)  # the buffers moved on; the kept state did not
    assert "recursion_state" not in pool.state_dict()
    labels = torch.arange(6).repeat_interleave(4)
    wrapped = CrossBatchMetricLoss(losses.MultiSimilarityLoss(), cross_fit="recursive")
    with pytest.raises(RuntimeError, match="bind_pooling"):
        wrapped(out.embedding, labels, out.histogram)
    wrapped.bind_pooling(pool)
    assert list(wrapped.state_dict()) == []  # the pooling is not a submodule of the loss
    explicit = CrossBatchMetricLoss(losses.MultiSimilarityLoss(), cross_fit="recursive")
    assert torch.equal(wrapped(out.embedding, labels, out.histogram),
                       explicit(out.embedding, labels, out.histogram, recursion_state=state))
    with pytest.raises(ValueError, match="recursion"):
        CrossBatchMetricLoss(losses.MultiSimilarityLoss(), cross_fit="recursive").bind_pooling(GlobalAveragePooling(8))
    CrossBatchMetricLoss(losses.MultiSimilarityLoss()).bind_pooling(GlobalAveragePooling(8))  # ridge: harmless


def test_terms_are_the_two_parts_of_the_total_also_at_lam_zero():
    emb, labels, hist = _batch()
    base = losses.MultiSimilarityLoss()
    for lam in (0.0, 0.4):
        wrapped = CrossBatchMetricLoss(base, lam=lam, ridge=1e-2)
        t = wrapped.terms(emb, labels, hist)
        a, b = labels < 3, labels >= 3
        reg = (base(ridge_fit_predict(hist[a], emb[a], hist[b], 1e-2), labels[b])
               + base(ridge_fit_predict(hist[b], emb[b], hist[a], 1e-2), labels[a]))
        assert torch.equal(t.base, base(emb, labels)) and torch.allclose(t.cross, reg)
        assert torch.allclose(wrapped(emb, labels, hist), t.base + lam * t.cross)
    assert wrapped.terms(emb, labels, None).cross is None


def test_falls_back_to_base_loss_when_the_regulariser_cannot_apply():
    emb, labels, hist = _batch()
    base = losses.MultiSimilarityLoss()
    wrapped = CrossBatchMetricLoss(base)
    expected = base(emb, labels)
    assert torch.equal(wrapped(emb, labels, None), expected)  # pooling not initialised yet
    one_class = torch.zeros_like(labels)
    assert torch.equal(wrapped(emb, one_class, hist), base(emb, one_class))
    lonely = torch.tensor([0] + [1] * 23)  # A holds a single sample
    assert torch.equal(wrapped(emb, lonely, hist), base(emb, lonely))
    assert wrapped.last_xml_loss == 0.0


class _RecordingMiner(nn.Module):
    def __init__(self, miner):
        super().__init__()
        self.miner, self.calls = miner, []

    def forward(self, embeddings, labels):
        self.calls.append(sorted(set(labels.tolist())))
        return self.miner(embeddings, labels)


@pytest.mark.parametrize("make", [
    lambda: (losses.MultiSimilarityLoss(), None),
    lambda: (losses.ContrastiveLoss(), _RecordingMiner(miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8))),
    lambda: (losses.TripletMarginLoss(margin=0.2), None),
    lambda: (losses.ProxyAnchorLoss(num_classes=6, embedding_size=8), None),
    lambda: (losses.NormalizedSoftmaxLoss(num_classes=6, embedding_size=8), None),
], ids=["multi_similarity", "contrastive_miner", "triplet", "proxy_anchor", "normalized_softmax"])
def test_works_with_pair_tuple_and_proxy_losses(make):
    base, miner = make()
    emb, labels, hist = _batch()
    wrapped = CrossBatchMetricLoss(base, lam=1.0, miner=miner)
    total = wrapped(emb, labels, hist)
    assert torch.isfinite(total)
    assert wrapped.last_xml_loss > 0
    total.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    if miner is not None:  # the base batch, then each reconstruction with its own half's labels
        assert miner.calls == [list(range(6)), [3, 4, 5], [0, 1, 2]]
    params = list(wrapped.parameters())
    if params:  # proxies: the global label ids reach them, from the regulariser too
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


# ---------------------------------------------------------------------------------------------
# end to end: a small conv trunk

class _TinyNet(nn.Module):
    def __init__(self, d=16, m=8, assignment="hard", channels=8):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
        self.embedder = nn.Conv2d(channels, d, 1)  # the 1x1 embedder: projects every location
        self.pool = PrototypePooling(d, num_prototypes=m, assignment=assignment, temperature=1.0)

    def forward(self, x):
        return self.pool(self.embedder(self.trunk(x)))


def _toy_images(num_classes=8, per_class=4, seed=0, noise=0.5):
    """8x8 images: one random template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 3, 8, 8, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = templates[labels] + noise * torch.randn(len(labels), 3, 8, 8, generator=g)
    return images, labels


@pytest.mark.parametrize("assignment, cross_fit", [("hard", "ridge"), ("soft", "ridge"), ("hard", "recursive"),
                                                   ("soft", "recursive")])
def test_gradients_reach_the_trunk_from_the_regulariser(assignment, cross_fit):
    torch.manual_seed(0)
    net = _TinyNet(assignment=assignment).train()
    images, labels = _toy_images()
    out = net(images)
    wrapped = CrossBatchMetricLoss(losses.MultiSimilarityLoss(), cross_fit=cross_fit)
    wrapped.bind_pooling(net.pool)
    reg = wrapped.xml_loss(out.embedding, labels, out.histogram)
    reg.backward()
    for p in list(net.trunk.parameters()) + list(net.embedder.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert net.trunk[0].weight.grad.abs().sum() > 0


def test_checkpoint_round_trip():
    torch.manual_seed(0)
    pool = PrototypePooling(5, num_prototypes=6, forgetting=0.9).train()
    for _ in range(3):
        pool(torch.randn(4, 5, 3, 3))
    state = copy.deepcopy(pool.state_dict())
    fresh = PrototypePooling(5, num_prototypes=6, forgetting=0.9)
    fresh.load_state_dict(state)
    for k, v in pool.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    x = torch.randn(3, 5, 3, 3)
    pool.eval(), fresh.eval()
    assert torch.equal(pool(x).histogram, fresh(x).histogram)
    pool.train(), fresh.train()  # the resumed module continues the recursion, it does not re-seed
    pool(x), fresh(x)
    assert torch.equal(pool.prototypes, fresh.prototypes)


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread than on a busy pair of cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_run_lowers_the_loss(one_thread):
    torch.manual_seed(0)
    net = _TinyNet().train()
    wrapped = CrossBatchMetricLoss(losses.MultiSimilarityLoss(), lam=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    images, labels = _toy_images(num_classes=8, per_class=8)
    g = torch.Generator().manual_seed(1)
    history, xml_terms, base_terms = [], [], []
    for _ in range(50):
        classes = torch.randperm(8, generator=g)[:4]
        idx = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(8, generator=g)[:4]] for c in classes])
        out = net(images[idx])
        loss = wrapped(out.embedding, labels[idx], out.histogram)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        xml_terms.append(wrapped.last_xml_loss)
        base_terms.append(wrapped.last_base_loss)
    assert all(t > 0 for t in xml_terms)  # the regulariser is active from the first batch on

    def drop(values):
        return (sum(values[-10:]) / 10) / (sum(values[:10]) / 10)

    assert drop(history) < 0.9 and drop(base_terms) < 0.9 and drop(xml_terms) < 0.9


# ---------------------------------------------------------------------------------------------
# validation, registry

@pytest.mark.parametrize("kwargs, name", [
    ({"num_prototypes": 0}, "num_prototypes"),
    ({"num_prototypes": 2.5}, "num_prototypes"),
    ({"forgetting": 0.0}, "forgetting"),
    ({"forgetting": 1.5}, "forgetting"),
    ({"ridge": 0.0}, "ridge"),
    ({"temperature": -1.0}, "temperature"),
    ({"assignment": "fuzzy"}, "assignment"),
    ({"init": "random"}, "init"),
    ({"prior": -1.0}, "prior"),
    ({"assignment_rule": "cosine"}, "assignment_rule"),
])
def test_pooling_rejects_invalid_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PrototypePooling(4, **kwargs)


@pytest.mark.parametrize("kwargs, name", [({"lam": -0.1}, "lam"), ({"ridge": 0.0}, "ridge"), ({"ridge": -1}, "ridge"),
                                           ({"cross_fit": "kernel"}, "cross_fit")])
def test_wrapper_rejects_invalid_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CrossBatchMetricLoss(losses.MultiSimilarityLoss(), **kwargs)


def test_pooling_rejects_wrong_feature_map():
    with pytest.raises(ValueError, match="feature map"):
        PrototypePooling(4)(torch.randn(2, 5, 3, 3))


def test_registered_as_xml():
    from xml_plugin import registry
    assert registry.get("pooling", "xml") is PrototypePooling
    assert registry.get("loss_wrapper", "xml") is CrossBatchMetricLoss
    assert PrototypePooling.gives_histogram and CrossBatchMetricLoss.needs_histograms
