"""GSP (generalized sum pooling) and its zero-shot regulariser: constraints, gradients, safety, training."""
import pytest
import torch
from torch import nn

from xml_plugin.losses.zero_shot import ZeroShotLoss
from xml_plugin.models.gsp import GeneralizedSumPooling, gsp_transport, kcenter, prototype_cost
from xml_plugin.models.pooling import PoolingOutput


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: thread start-up dominates, and the machine is shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cost(b=2, m=3, n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(b, m, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("mu", [0.1, 0.3, 0.7])
def test_transport_constraints(mu):
    pi, rho = gsp_transport(_cost(4, 6, 10, dtype=torch.float32), mu, 5.0, 100)
    n = 10
    assert (pi >= 0).all() and (rho >= 0).all()
    assert torch.allclose(pi.sum(dim=(1, 2)), torch.full((4,), mu), atol=1e-5)
    assert torch.allclose(rho + pi.sum(dim=1), torch.full_like(rho, 1 / n), atol=1e-7)


def test_transport_is_the_fixed_point_of_the_literal_solver():
    # the log-domain solver must agree with the plain iteration of docs/methods.md, written here in the linear domain
    cost, mu, gamma, n = _cost(3, 4, 6), 0.3, 5.0, 6
    kernel = torch.exp(-gamma * cost)  # [B, m, n]
    k = kernel.sum(dim=1)  # [B, n]
    s = torch.ones(3, 1, dtype=cost.dtype)
    for _ in range(100):
        p = (1 / n) / (1 + s * k)
        s = mu / (p * k).sum(dim=1, keepdim=True)
    p = (1 / n) / (1 + s * k)
    pi_ref = s[:, :, None] * kernel * p[:, None, :]
    pi, rho = gsp_transport(cost, mu, gamma, 100)
    assert torch.allclose(pi, pi_ref, atol=1e-12) and torch.allclose(rho, p, atol=1e-12)


def test_transport_ratio_one_is_gap():
    pool = GeneralizedSumPooling(8, num_prototypes=4, transport_ratio=1.0, init="random")
    fmap = torch.randn(3, 8, 4, 5)
    out = pool(fmap)
    assert torch.equal(out.embedding, fmap.mean(dim=(2, 3)))
    pi, rho = gsp_transport(_cost(), 1.0, 5.0, 10)
    assert torch.equal(rho, torch.zeros_like(rho))
    assert torch.allclose(pi.sum(dim=1), torch.full_like(rho, 1 / 5))
    assert torch.allclose(out.histogram.sum(dim=1), torch.ones(3), atol=1e-6)


def test_gradcheck_analytic_backward():
    cost = _cost().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: gsp_transport(c, 0.3, 5.0, 60, backward="analytic"), (cost,))
    # only rho used downstream (grad_pi is None in the backward)
    assert torch.autograd.gradcheck(lambda c: gsp_transport(c, 0.6, 2.0, 100, backward="analytic")[1], (cost,))


@pytest.mark.parametrize("mu", [0.2, 0.5, 0.8])
def test_analytic_matches_unrolled_wrt_cost(mu):
    cost = _cost(3, 4, 7, seed=1)
    w_pi, w_rho = torch.randn(3, 4, 7, dtype=cost.dtype), torch.randn(3, 7, dtype=cost.dtype)
    grads = []
    for backward in ("analytic", "unrolled"):
        c = cost.clone().requires_grad_()
        pi, rho = gsp_transport(c, mu, 5.0, 300, backward=backward)
        ((pi * w_pi).sum() + (rho * w_rho).sum()).backward()
        grads.append(c.grad)
    assert grads[0].abs().max() > 1e-3  # a real gradient
    assert torch.allclose(grads[0], grads[1], atol=1e-9, rtol=1e-6)


def test_analytic_matches_unrolled_through_pooling():
    torch.manual_seed(0)
    fmap = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    grads = []
    for backward in ("analytic", "unrolled"):
        torch.manual_seed(1)
        pool = GeneralizedSumPooling(6, num_prototypes=4, backward=backward, init="random", iterations=200).double()
        x = fmap.clone().requires_grad_()
        out = pool(x)
        (out.embedding.pow(2).sum() + (out.histogram * torch.arange(4.0, dtype=x.dtype)).sum()).backward()
        grads.append((x.grad, pool.prototypes.grad))
    for g_analytic, g_unrolled in zip(*grads):
        assert g_analytic.abs().max() > 1e-4
        assert torch.allclose(g_analytic, g_unrolled, atol=1e-9, rtol=1e-6)


def test_pooling_output_is_a_convex_combination():
    torch.manual_seed(0)
    pool = GeneralizedSumPooling(5, num_prototypes=7, init="random")
    fmap = torch.randn(3, 5, 4, 4)
    out = pool(fmap)
    assert isinstance(out, PoolingOutput) and out.embedding.shape == (3, 5) and out.histogram.shape == (3, 7)
    assert (out.histogram >= 0).all() and torch.allclose(out.histogram.sum(1), torch.ones(3), atol=1e-5)
    # recompute the weights from the plan: w_i = (1 - n rho_i) / mu must be >= 0 and average to 1
    _, rho = pool.transport(fmap.flatten(2).transpose(1, 2))
    w = (1 - 16 * rho) / 0.3
    assert (w >= 0).all() and torch.allclose(w.mean(1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(out.embedding, fmap.mean(dim=(2, 3)), atol=1e-3)  # not GAP at mu = 0.3


def _reference_plan(cost, mu, gamma):
    """The entropy-smoothed partial transport, solved here by bisection (independent of the module's fixed point).

    The stationarity conditions of ``min <C, pi> + (1/gamma) (sum pi log pi + sum rho log rho)`` subject to
    ``rho_i + sum_k pi_ki = 1/n`` and ``sum pi = mu`` give ``pi_ki = s K_ki rho_i`` with ``K = exp(-gamma C)`` and one
    scalar ``s > 0`` per image, so ``rho_i = (1/n) / (1 + s k_i)``, ``k_i = sum_k K_ki``; ``s`` is the root of the
    increasing ``(1/n) sum_i s k_i / (1 + s k_i) = mu``, found by bisection on ``log s``. ``cost`` [B, m, n] float64.
    """
    kernel = torch.exp(-gamma * cost)  # [B, m, n]
    k = kernel.sum(dim=1)  # [B, n]
    lo, hi = torch.full(k.shape[:1], -80.0, dtype=k.dtype), torch.full(k.shape[:1], 80.0, dtype=k.dtype)  # log s
    for _ in range(200):  # 160 / 2^200: log s to the last bit
        mid = (lo + hi) / 2
        kept = (mid.exp()[:, None] * k / (1 + mid.exp()[:, None] * k)).mean(dim=1)  # [B]
        lo, hi = torch.where(kept < mu, mid, lo), torch.where(kept < mu, hi, mid)
    s = ((lo + hi) / 2).exp()  # [B]
    rho = (1 / cost.shape[2]) / (1 + s[:, None] * k)  # [B, n]
    return s[:, None, None] * kernel * rho[:, None, :], rho


def _gsp_with_prototypes(prototypes, mu, gamma, dtype):
    """A GSP pooling whose prototypes are set here (not by any seeding rule)."""
    pool = GeneralizedSumPooling(prototypes.shape[1], num_prototypes=prototypes.shape[0], transport_ratio=mu,
                                 entropy=gamma, init="random").to(dtype)
    with torch.no_grad():
        pool.prototypes.copy_(prototypes)
        pool.initialized.fill_(True)
    return pool


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("mu", [0.1, 0.3, 0.7])
def test_pooled_vector_and_attributes_from_the_plan(mu, gamma):
    """docs/methods.md, GSP, "Pooling" and "Attributes": ``z = sum_{k,i} pi_ki x_i / mu`` and ``a_k = sum_i pi_ki / mu``
    with the plan of the test's own solver, on the cost ``C_ki = ||N(w_k) - N(x_i)||`` written here."""
    g = torch.Generator().manual_seed(3)
    fmap = 0.8 * torch.randn(3, 6, 4, 5, generator=g, dtype=torch.float64)  # [B, d, H, W], n = 20
    prototypes = 0.5 * torch.randn(7, 6, generator=g, dtype=torch.float64)  # [m, d]
    x = fmap.flatten(2).transpose(1, 2)  # [B, n, d]
    unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp_min(1)  # noqa: E731  N(v)
    cost = (unit(prototypes)[None, :, None, :] - unit(x)[:, None, :, :]).norm(dim=-1)  # [B, m, n]
    pi, _ = _reference_plan(cost, mu, gamma)
    assert torch.allclose(pi.sum(dim=(1, 2)), torch.full((3,), mu, dtype=pi.dtype), atol=1e-14)  # the solver solved
    z = torch.einsum("bmn,bnd->bd", pi, x) / mu  # [B, d]
    a = pi.sum(dim=2) / mu  # [B, m]
    assert (z - x.mean(dim=1)).abs().max() > 1e-2  # not GAP: the weighting is seen
    # float64: measured 2026-12-01 within 7e-16 of the formula (100 fixed-point iterations have converged here)
    out = _gsp_with_prototypes(prototypes, mu, gamma, torch.float64)(fmap)
    torch.testing.assert_close(out.embedding, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.histogram, a, atol=1e-12, rtol=0)
    # float32, the training dtype: measured within 2e-7 (rounding)
    out32 = _gsp_with_prototypes(prototypes.float(), mu, gamma, torch.float32)(fmap.float())
    torch.testing.assert_close(out32.embedding.double(), z, atol=1e-6, rtol=0)
    torch.testing.assert_close(out32.histogram.double(), a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fill", [0.0, 3.0])
def test_degenerate_feature_maps_are_finite(fill):
    pool = GeneralizedSumPooling(4, num_prototypes=3, init="random")
    with torch.no_grad():
        pool.prototypes[0] = fill  # a prototype equal to the features: zero distance
    x = torch.full((2, 4, 3, 3), fill, requires_grad=True)
    out = pool(x)
    (out.embedding.sum() + out.histogram.pow(2).sum()).backward()
    for t in (out.embedding, out.histogram, x.grad, pool.prototypes.grad):
        assert torch.isfinite(t).all()


def test_large_entropy_is_finite():
    torch.manual_seed(0)
    pool = GeneralizedSumPooling(8, num_prototypes=5, entropy=50.0, init="random")
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = pool(x)
    out.embedding.sum().backward()
    assert torch.isfinite(out.embedding).all() and torch.isfinite(x.grad).all()
    # exp(-50 * cost) underflows float32 for cost > ~1.75: the log domain keeps the plan exact
    pi, rho = gsp_transport(torch.full((1, 2, 3), 1.9), 0.3, 50.0, 100)
    assert torch.allclose(pi.sum(), torch.tensor(0.3), atol=1e-6)


def test_prototype_cost_matches_direct_formula():
    x, w = torch.randn(2, 5, 3, dtype=torch.float64) * 2, torch.randn(4, 3, dtype=torch.float64) * 0.3
    nx = x / x.norm(dim=-1, keepdim=True).clamp_min(1)
    nw = w / w.norm(dim=-1, keepdim=True).clamp_min(1)
    direct = (nw[None, :, None, :] - nx[:, None, :, :]).norm(dim=-1)
    assert torch.allclose(prototype_cost(x, w), direct, atol=1e-10)


@pytest.mark.parametrize("kwargs", [
    dict(transport_ratio=0.0), dict(transport_ratio=1.5), dict(entropy=0.0), dict(entropy=float("inf")),
    dict(iterations=0), dict(iterations=2.5), dict(backward="exact"), dict(num_prototypes=0),
    dict(init="kmeans"), dict(init_features=2),
])
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GeneralizedSumPooling(8, **{"num_prototypes": 4, **kwargs})


def test_invalid_transport_arguments_raise():
    with pytest.raises(ValueError, match="transport_ratio"):
        gsp_transport(_cost(), -0.1, 5.0, 10)
    with pytest.raises(ValueError, match="cost"):
        gsp_transport(torch.rand(3, 4), 0.3, 5.0, 10)


def test_kcenter_init_collects_then_initialises_and_checkpoints():
    torch.manual_seed(0)
    pool = GeneralizedSumPooling(4, num_prototypes=3, init_features=40, seeding="local_features")
    before = pool.prototypes.detach().clone()
    fmap = torch.randn(1, 4, 5, 5)  # 25 locations per batch
    out = pool(fmap)
    assert out.histogram is None and torch.equal(out.embedding, fmap.mean(dim=(2, 3)))
    assert not bool(pool.initialized) and int(pool.num_collected) == 25
    pool.eval()
    assert pool(fmap).histogram is None and int(pool.num_collected) == 25  # no collection at eval
    pool.train()
    out = pool(fmap)  # 40 collected: prototypes set by farthest-point selection over collected features
    assert bool(pool.initialized) and out.histogram is not None
    assert not torch.equal(before, pool.prototypes)
    flat = fmap.flatten(2).transpose(1, 2).reshape(-1, 4)
    for row in pool.prototypes.detach():  # every prototype is one of the features seen
        assert (flat - row).abs().sum(1).min() < 1e-6
    fresh = GeneralizedSumPooling(4, num_prototypes=3, init_features=40, seeding="local_features")
    fresh.load_state_dict(pool.state_dict())
    assert bool(fresh.initialized) and torch.allclose(fresh(fmap).embedding, pool(fmap).embedding)


def test_kcenter_spreads_points():
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [-5.0, 5.0]])
    chosen = set(kcenter(pts, 3).tolist())
    assert len(chosen) == 3 and 4 in chosen and len(chosen & {2, 3}) == 1 and len(chosen & {0, 1}) == 1


def _ms_loss():
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    return MultiSimilarityLoss()


def test_zsr_weight_zero_is_the_base_loss():
    torch.manual_seed(0)
    emb, labels, hist = torch.randn(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.rand(8, 5).softmax(1)
    base = _ms_loss()
    wrapper = ZeroShotLoss(base, num_classes=4, histogram_size=5, weight=0.0)
    assert torch.allclose(wrapper(emb, labels, histograms=hist), base(emb, labels))
    full = ZeroShotLoss(base, num_classes=4, histogram_size=5, weight=0.1, no_histograms="base")
    assert torch.allclose(full(emb, labels, histograms=None), base(emb, labels))
    assert full.zsr_loss(torch.zeros(8, dtype=torch.long), hist) is None  # one class: no halves


def test_zsr_gradients_reach_class_embeddings_and_histograms():
    torch.manual_seed(0)
    emb = torch.randn(8, 6, requires_grad=True)
    hist = torch.rand(8, 5).softmax(1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    wrapper = ZeroShotLoss(_ms_loss(), num_classes=6, histogram_size=5, class_embedding_size=16, weight=0.5)
    loss = wrapper(emb, labels, histograms=hist)
    loss.backward()
    assert wrapper.last_zsr_loss > 0
    assert wrapper.class_embeddings.grad.abs().sum() > 0 and hist.grad.abs().sum() > 0


def test_zsr_value_from_its_definition():
    """The zero-shot loss computed here from its definition, independently of the module: halves by sorted class
    (classes 0, 1 -> A; 2, 3 -> B), a primal ridge fit in float64 from A's attributes to Psi[y_A], B's predicted class
    embeddings scored against every class with softmax cross-entropy, and the same the other way; total
    (1 - w) L_dml + w L_zsr."""
    torch.manual_seed(0)
    emb, hist = torch.randn(8, 6), torch.rand(8, 5).softmax(1)
    labels = torch.tensor([2, 0, 1, 3, 0, 2, 3, 1])
    w, ridge, scale = 0.3, 0.05, 9.5
    wrapper = ZeroShotLoss(_ms_loss(), num_classes=4, histogram_size=5, class_embedding_size=7, weight=w,
                           ridge=ridge, scale=scale, split="sorted")
    psi = wrapper.class_embeddings.detach().double()
    a, y = hist.double(), labels

    def fit_predict_score(fit, pred):
        h, target = a[fit], psi[y[fit]]
        weights = torch.linalg.inv(h.T @ h + ridge * torch.eye(5, dtype=torch.float64)) @ h.T @ target  # [m, D]
        logits = scale * (a[pred] @ weights) @ psi.T  # [b, C]
        log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return -log_p[torch.arange(int(pred.sum())), y[pred]].mean()

    in_a = (labels == 0) | (labels == 1)
    zsr = 0.5 * (fit_predict_score(in_a, ~in_a) + fit_predict_score(~in_a, in_a))
    expected = (1 - w) * _ms_loss()(emb, labels).double() + w * zsr
    assert float(wrapper(emb, labels, histograms=hist).detach()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("kwargs", [dict(weight=1.5), dict(ridge=0.0), dict(scale=-1.0), dict(num_classes=0),
                                    dict(class_embedding_size=0)])
def test_zsr_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ZeroShotLoss(_ms_loss(), **{"num_classes": 4, "histogram_size": 5, **kwargs})


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    num_classes, per_class, dim = 4, 6, 16
    # tiny synthetic images: each class is a different spatial pattern plus noise
    patterns = torch.randn(num_classes, 3, 8, 8)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = patterns[labels] + 0.5 * torch.randn(len(labels), 3, 8, 8)
    trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2))
    embedder = nn.Conv2d(32, dim, 1, bias=False)
    pool = GeneralizedSumPooling(dim, num_prototypes=8, iterations=30, init_features=16)
    wrapper = ZeroShotLoss(_ms_loss(), num_classes=num_classes, histogram_size=8, class_embedding_size=8)
    params = [*trunk.parameters(), *embedder.parameters(), *pool.parameters(), *wrapper.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)

    def step():
        out = pool(embedder(trunk(images)))
        return wrapper(out.embedding, labels, histograms=out.histogram)

    step()  # the first batch fills the seeding memory (16 of its 24 GAP embeddings)
    assert bool(pool.initialized)
    with torch.no_grad():
        first = step().item()
    for _ in range(50):
        opt.zero_grad()
        loss = step()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = step().item()
    assert wrapper.last_zsr_loss > 0
    assert last < 0.7 * first, (first, last)


def test_xml_wrapper_accepts_gsp_histograms():
    from xml_plugin.losses.cross_batch import CrossBatchMetricLoss
    torch.manual_seed(0)
    pool = GeneralizedSumPooling(6, num_prototypes=5, init="random")
    x = torch.randn(8, 6, 3, 3, requires_grad=True)
    out = pool(x)
    wrapper = CrossBatchMetricLoss(_ms_loss(), lam=1.0)
    wrapper(out.embedding, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), histograms=out.histogram).backward()
    assert wrapper.last_xml_loss > 0 and pool.prototypes.grad.abs().sum() > 0
