"""Health diagnostics of XML and Roth et al.'s embedding-space measures (xml_plugin/engine/diagnostics.py), against
brute force, numpy and scipy written here."""
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses
from scipy.spatial.distance import pdist
from scipy.stats import entropy

from xml_plugin.engine import diagnostics as D
from xml_plugin.losses.cross_batch import CrossBatchMetricLoss
from xml_plugin.models.gsp import GeneralizedSumPooling
from xml_plugin.models.xml_pooling import PrototypePooling, RecursionState


def _batch(num_classes=6, per_class=4, d=5, m=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    emb = torch.randn(len(labels), d, generator=g, dtype=dtype) + 2 * torch.randn(num_classes, d, generator=g,
                                                                                  dtype=dtype)[labels]
    hist = torch.softmax(3 * torch.randn(len(labels), m, generator=g, dtype=dtype), dim=1)
    return emb, labels, hist


# ---------------------------------------------------------------------------------------------
# XML health

def test_gap_reconstruction_error_is_the_mean_relative_error():
    emb, _, hist = _batch()
    w = torch.randn(7, 5)
    expected = np.mean([np.linalg.norm(emb[i].numpy() - sum(hist[i, k].item() * w[k].numpy() for k in range(7)))
                        / np.linalg.norm(emb[i].numpy()) for i in range(len(emb))])
    assert D.gap_reconstruction_error(emb, hist, w) == pytest.approx(expected, rel=1e-6)
    h64, w64 = hist.double(), w.double()
    assert D.gap_reconstruction_error(h64 @ w64, h64, w64) == pytest.approx(0.0, abs=1e-12)  # z = W^T h exactly


def test_prototype_usage_counts_unused_columns_and_the_entropy_of_the_mean_histogram():
    h = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.0, 0.75, 0.0], [1.0, 0.0, 0.0, 0.0]])
    usage = D.prototype_usage(h)
    unused = sum(all(float(h[i, k]) == 0 for i in range(3)) for k in range(4))
    assert usage["unused_prototypes"] == unused == 1
    assert usage["effective_prototypes"] == pytest.approx(math.exp(entropy(h.double().mean(0).numpy())), rel=1e-9)
    assert D.prototype_usage(torch.full((5, 8), 1 / 8))["effective_prototypes"] == pytest.approx(8.0)
    assert D.prototype_usage(torch.eye(6)[[2, 2, 2]])["effective_prototypes"] == pytest.approx(1.0)


def _numpy_ridge(h_fit, z_fit, h_pred, ridge):
    h, z, hp = (t.detach().double().numpy() for t in (h_fit, z_fit, h_pred))
    return hp @ np.linalg.solve(h.T @ h + ridge * np.eye(h.shape[1]), h.T @ z)


def _numpy_rls(state, h_fit, z_fit, h_pred):
    h, z, hp = (t.detach().double().numpy() for t in (h_fit, z_fit, h_pred))
    p, q, a = state.p.double().numpy(), state.q.double().numpy(), state.forgetting
    return hp @ np.linalg.solve(a * p + h.T @ h + state.ridge * np.eye(len(p)), a * q + h.T @ z)


@pytest.mark.parametrize("cross_fit", ["ridge", "recursive"])
def test_cross_batch_error_is_the_mean_relative_error_of_both_halves(cross_fit):
    emb, labels, hist = _batch()
    g = torch.Generator().manual_seed(3)
    past = torch.softmax(torch.randn(30, 7, generator=g), 1)
    state = RecursionState(past.T @ past, past.T @ torch.randn(30, 5, generator=g), 0.9, 1e-3)
    loss = CrossBatchMetricLoss(losses.MultiSimilarityLoss(), ridge=1e-2, cross_fit=cross_fit)
    a, b = (labels < 3).numpy(), (labels >= 3).numpy()
    fit = (lambda hf, zf, hp: _numpy_ridge(hf, zf, hp, 1e-2)) if cross_fit == "ridge" else (
        lambda hf, zf, hp: _numpy_rls(state, hf, zf, hp))
    z = emb.double().numpy()
    z_hat = np.zeros_like(z)
    z_hat[b] = fit(hist[a], emb[a], hist[b])
    z_hat[a] = fit(hist[b], emb[b], hist[a])
    expected = np.mean([np.linalg.norm(z_hat[i] - z[i]) / np.linalg.norm(z[i]) for i in range(len(z))])
    assert D.cross_batch_error(loss, emb, labels, hist, state) == pytest.approx(expected, rel=1e-4)
    assert math.isnan(D.cross_batch_error(loss, emb, torch.zeros_like(labels), hist, state))  # one class: no halves


def _finite_difference_grad(f, x, step=1e-6):
    g = torch.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.clone(), x.clone()
        up[idx] += step
        down[idx] -= step
        g[idx] = (f(up) - f(down)) / (2 * step)
    return g


def test_loss_terms_and_their_gradient_norms_at_the_embeddings():
    emb, labels, hist = _batch(num_classes=4, per_class=3, d=3, m=4, dtype=torch.float64)
    base = losses.MultiSimilarityLoss()
    loss = CrossBatchMetricLoss(base, lam=0.3, ridge=1e-2)
    loss.last_base_loss = loss.last_xml_loss = -1.0
    got = D.loss_terms(loss, emb, labels, hist)
    a, b = labels < 2, labels >= 2

    def base_fn(z):
        return float(base(z, labels))

    def cross_fn(z):  # the two reconstruction losses, the fits written out with numpy
        z_hat_b = torch.from_numpy(_numpy_ridge(hist[a], z[a], hist[b], 1e-2))
        z_hat_a = torch.from_numpy(_numpy_ridge(hist[b], z[b], hist[a], 1e-2))
        return float(base(z_hat_b, labels[b]) + base(z_hat_a, labels[a]))

    assert got["base_loss"] == pytest.approx(base_fn(emb), rel=1e-9)
    assert got["cross_loss"] == pytest.approx(cross_fn(emb), rel=1e-6)
    assert got["cross_term"] == pytest.approx(0.3 * cross_fn(emb), rel=1e-6)
    fd_base = _finite_difference_grad(base_fn, emb)
    fd_cross = _finite_difference_grad(cross_fn, emb)
    assert fd_base.norm() > 0 and fd_cross.norm() > 0
    assert got["base_grad_norm"] == pytest.approx(float(fd_base.norm()), rel=1e-4)
    assert got["cross_grad_norm"] == pytest.approx(0.3 * float(fd_cross.norm()), rel=1e-4)
    assert loss.last_base_loss == -1.0 and loss.last_xml_loss == -1.0  # a diagnostic, not a training call
    no_reg = D.loss_terms(loss, emb, labels, None)
    assert no_reg["base_loss"] == got["base_loss"] and math.isnan(no_reg["cross_term"])


def test_xml_health_of_a_trained_pooling_is_the_flat_dict_of_the_parts():
    torch.manual_seed(0)
    pool = PrototypePooling(5, num_prototypes=6).train()
    labels = torch.arange(6).repeat_interleave(4)
    for _ in range(3):
        out = pool(torch.randn(24, 5, 3, 3))
    state_before = pool.recursion_state
    p_before = pool.rls_p.clone()
    for cross_fit in ("ridge", "recursive"):
        loss = CrossBatchMetricLoss(losses.MultiSimilarityLoss(), lam=2.0, cross_fit=cross_fit)
        health = D.xml_health(pool, out.embedding, out.histogram, labels, loss)
        assert set(health) == set(D.HEALTH_KEYS) and all(isinstance(v, float) for v in health.values())
        assert health["gap_error"] == D.gap_reconstruction_error(out.embedding, out.histogram, pool.prototypes)
        assert health["unused_prototypes"] == D.prototype_usage(out.histogram)["unused_prototypes"]
        assert health["cross_error"] == D.cross_batch_error(loss, out.embedding, labels, out.histogram, state_before)
        terms = D.loss_terms(loss, out.embedding, labels, out.histogram, state_before)
        assert all(health[k] == pytest.approx(v) for k, v in terms.items())
        assert not any(math.isnan(v) for v in health.values())
    assert torch.equal(pool.rls_p, p_before) and pool.recursion_state is state_before  # nothing stepped
    only_pooling = D.xml_health(pool, out.embedding, out.histogram)
    assert math.isnan(only_pooling["cross_error"]) and not math.isnan(only_pooling["gap_error"])
    assert all(math.isnan(v) for v in D.xml_health(pool, out.embedding, None).values())
    gsp = GeneralizedSumPooling(5, num_prototypes=6)  # attributes, not GAP's prototype mix: no gap_error
    assert math.isnan(D.xml_health(gsp, out.embedding, out.histogram)["gap_error"])


# ---------------------------------------------------------------------------------------------
# embedding space (Roth et al.)

def test_spectral_decay_is_kl_from_uniform_to_the_normalised_spectrum():
    g = np.random.default_rng(0)
    x = g.normal(size=(40, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    s = np.linalg.svd(x, compute_uv=False)
    uniform = np.full(6, 1 / 6)
    assert D.spectral_decay(x) == pytest.approx(entropy(uniform, s / s.sum()), rel=1e-9)
    assert D.spectral_decay(x, skip_largest=1) == pytest.approx(entropy(uniform[:5] * 6 / 5, s[1:] / s[1:].sum()),
                                                                rel=1e-9)
    q, _ = np.linalg.qr(g.normal(size=(6, 6)))
    assert D.spectral_decay(q) == pytest.approx(0.0, abs=1e-9)  # all singular values equal: a flat spectrum
    assert D.spectral_decay(np.outer(g.normal(size=10), g.normal(size=4))) > 10  # rank 1: (numerically) degenerate


def test_class_distances_against_scipy():
    g = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # class 3 has a single sample: no intra-class pair
    x = g.normal(size=(10, 4))
    got = D.class_distances(x, labels)
    intra = np.mean([pdist(x[labels == c]).mean() for c in (0, 1, 2)])
    means = np.stack([x[labels == c].mean(0) for c in range(4)])
    inter = pdist(means).mean()
    assert got["intra_class_distance"] == pytest.approx(intra, rel=1e-9)
    assert got["inter_class_distance"] == pytest.approx(inter, rel=1e-9)
    assert got["intra_inter_ratio"] == pytest.approx(intra / inter, rel=1e-9)
    assert D._mean_pairwise_distance(torch.from_numpy(means), chunk=3) == pytest.approx(inter, rel=1e-9)


def test_nmi_is_one_for_separated_classes_and_small_for_random_labels():
    g = np.random.default_rng(2)
    centres = g.normal(size=(4, 8)) * 10
    labels = np.repeat(np.arange(4), 6)
    x = centres[labels] + 0.01 * g.normal(size=(24, 8))
    assert D.nmi(x, labels) == pytest.approx(1.0)
    assert D.nmi(x, (labels + 1) % 4) == pytest.approx(1.0)  # names of the classes do not matter
    blob = g.normal(size=(90, 8))
    assert D.nmi(blob, g.permutation(np.repeat(np.arange(3), 30))) < 0.2
    assert math.isnan(D.nmi(x, np.zeros(24)))


def test_embedding_space_metrics_on_normalised_rows():
    g = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), 8)
    x = g.normal(size=(5, 16))[labels] + 0.3 * g.normal(size=(40, 16))
    got = D.embedding_space_metrics(x, labels)
    assert set(got) == set(D.EMBEDDING_KEYS)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = np.linalg.svd(unit, compute_uv=False)
    assert got["spectral_decay"] == pytest.approx(entropy(np.full(16, 1 / 16), s / s.sum()), rel=1e-9)
    assert got["intra_class_distance"] == pytest.approx(np.mean([pdist(unit[labels == c]).mean() for c in range(5)]))
    rescaled = D.embedding_space_metrics(x * g.uniform(0.5, 3.0, size=(40, 1)), labels)  # row scale is removed
    assert all(rescaled[k] == pytest.approx(got[k], rel=1e-6) for k in got)
