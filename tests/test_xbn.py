"""XBM / XBN / AXBN memory wrapper (docs/methods.md, XBN)."""
import io

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from xml_plugin.losses.moments import batch_moments, filter_moments, kalman_gain, match_moments
from xml_plugin.losses.xbn import (DEFAULT_MEMORY_SIZE, AdaptiveCrossBatchNormMemory, CrossBatchNormMemory,
                                   resolve_memory_size)

D = 8


def make_batches(n, batch=12, classes=6, seed=0, shift=True):
    """Batches whose moments drift (so that adaptation has something to do)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        labels = torch.arange(batch) % classes + (t % 3)  # labels overlap across batches
        emb = torch.randn(batch, D, generator=g) * (1 + 0.3 * t) + (0.5 * t if shift else 0.0)
        out.append((emb, labels))
    return out


def run(wrapper, batches):
    return [wrapper(e, y) for e, y in batches]


# ---- pure functions ----------------------------------------------------------------------------

def test_match_moments_gives_target_moments():
    x = torch.randn(50, D) * 3 + 2
    mean_s, std_s = batch_moments(x)
    mean_t, std_t = torch.randn(D), torch.rand(D) + 0.5
    y = match_moments(x, mean_s, std_s, mean_t, std_t)
    m, s = batch_moments(y)
    assert torch.allclose(m, mean_t, atol=1e-5) and torch.allclose(s, std_t, atol=1e-5)


def test_batch_moments_population_and_clamp():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    m, s = batch_moments(x, population_std=True, std_eps=1e-3)
    assert torch.allclose(m, torch.tensor([2.0, 5.0]))
    assert torch.allclose(s, torch.tensor([1.0, 1e-3]))  # population std 1; constant dim clamped
    _, s_unbiased = batch_moments(x, population_std=False)
    assert torch.allclose(s_unbiased[0], torch.tensor(2.0).sqrt())
    assert batch_moments(x.half())[0].dtype == torch.float32


def test_kalman_gain_formula_and_r_zero():
    k, p = kalman_gain(torch.tensor(1.0), q=1.0, r=0.5, batch_size=4)
    assert torch.isclose(k, torch.tensor(2.0 / (2.0 + 0.125)))
    assert torch.isclose(p, (1 - k) * 2.0)
    k0, p0 = kalman_gain(torch.tensor(1.0), q=1.0, r=0.0, batch_size=4)
    assert k0.item() == 1.0 and p0.item() == 0.0
    a, b = torch.randn(D), torch.randn(D)
    assert torch.equal(filter_moments(a, a, b, b, k0)[0], b)  # K = 1 returns the batch moments exactly


# ---- "none" is PML's CrossBatchMemory ------------------------------------------------------------

@pytest.mark.parametrize("with_miner", [False, True])
def test_none_equals_pml_cross_batch_memory(with_miner):
    batches = make_batches(7)  # 84 rows through a 40-row memory: wraps around twice
    miner = (lambda: miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)) if with_miner else (lambda: None)
    ref = losses.CrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=40, miner=miner())
    ours = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=40, miner=miner(), adaptation="none")
    for e, y in batches:
        l_ref, l_ours = ref(e, y), ours(e, y)
        assert torch.equal(l_ref, l_ours)
        assert ours.queue_idx == ref.queue_idx and ours.has_been_filled == ref.has_been_filled
    assert ours.has_been_filled
    assert torch.equal(ours.embedding_memory, ref.embedding_memory)
    assert torch.equal(ours.label_memory, ref.label_memory)


def test_none_normalized_matches_pml_loss_values():
    """normalize=True only changes what is stored: PML's default distance normalises anyway."""
    batches = make_batches(5)
    ref = losses.CrossBatchMemory(losses.MultiSimilarityLoss(), D, memory_size=30)
    ours = CrossBatchNormMemory(losses.MultiSimilarityLoss(), D, memory_size=30, adaptation="none", normalize=True)
    for e, y in batches:
        assert torch.allclose(ref(e, y), ours(e, y), atol=1e-5)


# ---- XBN ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [False, True])
def test_xbn_old_rows_take_the_batch_moments(normalize):
    b1, b2 = make_batches(2, batch=16)
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=64, adaptation="xbn", normalize=normalize)
    w(*b1)
    old = w.embedding_memory[:16].clone()
    w(*b2)
    batch = F.normalize(b2[0], dim=1) if normalize else b2[0]
    adapted = w.embedding_memory[:16]
    assert not torch.allclose(adapted, old, atol=1e-3)  # the memory really moved
    m, s = adapted.mean(0), adapted.std(0, unbiased=False)
    assert torch.allclose(m, batch.mean(0), atol=1e-5)
    assert torch.allclose(s, batch.std(0, unbiased=False), atol=1e-5)
    # the new rows are the batch itself, unchanged
    assert torch.allclose(w.embedding_memory[16:32], batch)


def test_xbn_statistics_cover_only_the_valid_rows():
    b1, b2 = make_batches(2, batch=10)
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=100, adaptation="xbn", normalize=False)
    w(*b1)
    w(*b2)
    assert torch.count_nonzero(w.embedding_memory[20:]) == 0  # empty rows are neither used nor touched
    m = w.embedding_memory[:10].mean(0)
    assert torch.allclose(m, b2[0].mean(0), atol=1e-5)


def test_too_few_rows_skip():
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=20, adaptation="xbn", normalize=False)
    e = torch.randn(3, D)
    w(e[:1], torch.tensor([0]))  # memory empty: nothing to adapt
    w(e[1:3], torch.tensor([0, 1]))  # one valid row < min_rows: stored as is
    assert torch.equal(w.embedding_memory[:3], e)
    one = torch.randn(1, D) + 5
    w(one, torch.tensor([1]))  # a one-row batch has no std: skip
    assert torch.equal(w.embedding_memory[:3], e)
    w2 = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=20, adaptation="xbn", normalize=False,
                              min_rows=4)
    w2(e, torch.tensor([0, 0, 1]))
    w2(one.expand(3, D) + torch.randn(3, D), torch.tensor([1, 2, 2]))  # batch of 3 < min_rows=4: skip
    assert torch.equal(w2.embedding_memory[:3], e)


# ---- AXBN / EMA ------------------------------------------------------------------------------

def test_axbn_with_r_zero_equals_xbn():
    batches = make_batches(6)
    xbn = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=40, adaptation="xbn")
    axbn = AdaptiveCrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=40, r=0.0, gain_interval=2)
    assert axbn.adaptation == "axbn"
    for e, y in batches:
        assert torch.allclose(xbn(e, y), axbn(e, y), atol=1e-6)
    assert torch.allclose(xbn.embedding_memory, axbn.embedding_memory, atol=1e-6)


def test_axbn_default_differs_from_xbn_when_r_large():
    batches = make_batches(3)
    xbn = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=40, adaptation="xbn")
    axbn = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=40, adaptation="axbn", r=100.0)
    run(xbn, batches), run(axbn, batches)
    assert not torch.allclose(xbn.embedding_memory, axbn.embedding_memory, atol=1e-3)


def _kalman_reference(n_steps, q, r, b, p0, interval):
    """The AXBN recursion as docs/methods.md states it, written out here: predict every `interval` steps,
    measure every step. Returns the gains and error variances."""
    p, gains, ps = p0, [], []
    for t in range(n_steps):
        if t % interval == 0:
            p = p + q
        k = p / (p + r / b)
        p = (1 - k) * p
        gains.append(k)
        ps.append(p)
    return gains, ps


@pytest.mark.parametrize("interval", [1, 3, 100])
def test_gain_follows_the_predict_measure_recursion(interval):
    b, q, r, p0 = 12, 1.0, 30.0, 1.0
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=200, adaptation="axbn", q=q, r=r, p0=p0,
                             gain_interval=interval)
    gains, ps = [], []
    for e, y in make_batches(7, batch=b):
        w(e, y)
        gains.append(w.last_gain)
        ps.append(float(w.p))
    expected_k, expected_p = _kalman_reference(7, q, r, b, p0, interval)
    assert gains == pytest.approx(expected_k, rel=1e-5)
    assert ps == pytest.approx(expected_p, rel=1e-5)
    if interval > 1:  # between predictions the gain falls: a running mean of the batch moments
        assert gains[1] < gains[0] and gains[2] < gains[1]


def test_paper_constants_gain_decays_like_one_over_k_between_predictions():
    """q = 1, r = 0.01, p0 = 1, batch 32: K ~ 1 right after a prediction, then K ~ 1/k (the old reading kept K ~ 1)."""
    gains, _ = _kalman_reference(250, 1.0, 0.01, 32, 1.0, 100)
    assert gains[0] > 0.999 and gains[100] > 0.999 and gains[200] > 0.999
    for k in (2, 5, 10, 50):
        assert gains[k - 1] == pytest.approx(1.0 / k, rel=0.02)
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=400, adaptation="axbn", gain_interval=100)
    for t, (e, y) in enumerate(make_batches(12, batch=32)):
        w(e, y)
        assert w.last_gain == pytest.approx(gains[t], rel=1e-3)  # p is float32 in the module


def test_axbn_with_interval_100_differs_from_xbn_and_with_interval_1_equals_it():
    """Paper constants: N = 1 is (numerically) XBN; N = 100 filters, so the memory is moved elsewhere."""
    def memory_after(**kw):
        w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=200, **kw)
        values = [float(w(e, y)) for e, y in make_batches(8, batch=16)]
        return w.embedding_memory.clone(), values
    xbn, l_xbn = memory_after(adaptation="xbn")
    one, l_one = memory_after(adaptation="axbn", gain_interval=1)
    hundred, l_hundred = memory_after(adaptation="axbn", gain_interval=100)
    assert torch.allclose(xbn, one, atol=1e-3) and l_one == pytest.approx(l_xbn, abs=1e-3)
    assert not torch.allclose(xbn, hundred, atol=1e-2)


def test_axbn_filter_tracks_kalman_estimates():
    batches = make_batches(3, batch=10)
    q, r, b = 0.5, 8.0, 10
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=100, adaptation="axbn", q=q, r=r,
                             normalize=False)
    p, mean_hat = 1.0, None
    for t, (e, y) in enumerate(batches):
        w(e, y)
        k = (p + q) / (p + q + r / b)
        p = (1 - k) * (p + q)
        mb = e.mean(0)
        mean_hat = mb if mean_hat is None else mean_hat + k * (mb - mean_hat)
    assert torch.allclose(w.mean_hat, mean_hat, atol=1e-5)
    # the old rows (first two batches) were moved to the filtered moments, not to the batch's
    assert torch.allclose(w.embedding_memory[:20].mean(0), mean_hat, atol=1e-5)
    assert not torch.allclose(mean_hat, batches[-1][0].mean(0), atol=1e-2)


def test_ema_constant_gain():
    b1, b2, b3 = make_batches(3, batch=10)
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=100, adaptation="ema", ema_gain=0.25,
                             normalize=False)
    for e, y in (b1, b2, b3):
        w(e, y)
        assert w.last_gain == 0.25
    m1, m2, m3 = b1[0].mean(0), b2[0].mean(0), b3[0].mean(0)
    s1, s2, s3 = (x[0].std(0, unbiased=False) for x in (b1, b2, b3))
    exp_m = 0.75 * (0.75 * m1 + 0.25 * m2) + 0.25 * m3  # initialised from the first batch
    exp_s = 0.75 * (0.75 * s1 + 0.25 * s2) + 0.25 * s3
    assert torch.allclose(w.mean_hat, exp_m, atol=1e-5) and torch.allclose(w.std_hat, exp_s, atol=1e-5)
    old = w.embedding_memory[:20]
    assert torch.allclose(old.mean(0), exp_m, atol=1e-5)
    assert torch.allclose(old.std(0, unbiased=False), exp_s, atol=1e-5)


# ---- options: warm-up, in-batch term -------------------------------------------------------------

def test_warmup_uses_in_batch_loss_but_fills_memory():
    batches = make_batches(4)
    loss = losses.ContrastiveLoss()
    warm = CrossBatchNormMemory(loss, D, memory_size=100, adaptation="xbn", warmup_iterations=2)
    twin = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=100, adaptation="xbn")
    for t, (e, y) in enumerate(batches):
        lw, lt = warm(e, y), twin(e, y)
        if t < 2:
            assert torch.allclose(lw, loss(F.normalize(e, dim=1), y), atol=1e-6)
        else:
            assert torch.allclose(lw, lt, atol=1e-6)
        assert warm.queue_idx == twin.queue_idx == 12 * (t + 1)
    assert torch.allclose(warm.embedding_memory, twin.embedding_memory)


def test_in_batch_term_is_added():
    batches = make_batches(3)
    make_miner = lambda: miners.MultiSimilarityMiner(epsilon=0.1)  # noqa: E731
    xbm_star = CrossBatchNormMemory(losses.MultiSimilarityLoss(), D, memory_size=50, miner=make_miner(),
                                    in_batch_loss=True)
    plain = CrossBatchNormMemory(losses.MultiSimilarityLoss(), D, memory_size=50, miner=make_miner())
    loss, miner = losses.MultiSimilarityLoss(), make_miner()
    for e, y in batches:
        en = F.normalize(e, dim=1)
        in_batch = loss(en, y, miner(en, y))
        assert in_batch > 1e-4  # the term is not trivially 0 on these batches
        assert torch.allclose(xbm_star(e, y), plain(e, y) + in_batch, atol=1e-6)


# ---- losses, miners, gradients -----------------------------------------------------------------

@pytest.mark.parametrize("adaptation", ["xbn", "axbn", "ema"])
@pytest.mark.parametrize("combo", ["contrastive_pair_margin", "multi_similarity"])
def test_works_with_pml_losses_and_miners(adaptation, combo):
    if combo == "contrastive_pair_margin":
        loss, miner = losses.ContrastiveLoss(), miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)
    else:
        loss, miner = losses.MultiSimilarityLoss(), None
    w = CrossBatchNormMemory(loss, D, memory_size=30, miner=miner, adaptation=adaptation)
    for e, y in make_batches(5):
        x = e.clone().requires_grad_(True)
        out = w(x, y)
        out.backward()
        assert out.dim() == 0 and torch.isfinite(out) and out > 0
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert w.has_been_filled


def test_gradients_flow_only_to_the_current_batch():
    (e1, y1), (e2, y2) = make_batches(2)
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=50, adaptation="xbn")
    x1 = e1.clone().requires_grad_(True)
    w(x1, y1)  # not backpropagated: its graph must not be reachable from the next loss
    x2 = e2.clone().requires_grad_(True)
    w(x2, y2).backward()
    assert x1.grad is None
    assert x2.grad is not None and x2.grad.abs().sum() > 0
    assert not w.embedding_memory.requires_grad and w.embedding_memory.grad_fn is None


def test_half_precision_input_keeps_float32_statistics():
    """The memory takes the embeddings' dtype (PML's choice, docs/xbn.md); the moments and the filter stay float32."""
    fed = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=40, adaptation="axbn", normalize=False)
    for e, y in make_batches(2):
        fed(e.half(), y)
    assert fed.embedding_memory.dtype == torch.float16 and fed.mean_hat.dtype == torch.float32
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=40, adaptation="axbn", normalize=False)
    w.embedding_memory = w.embedding_memory.half()
    for e, y in make_batches(3):
        w.adapt_memory(e.half())
        w.add_to_memory(e.half(), y, len(e))
    m = w.embedding_memory[:24].float().mean(0)
    assert torch.allclose(m, w.mean_hat, atol=2e-3)


# ---- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("adaptation", ["none", "axbn", "ema"])
def test_resume_restores_the_memory_exactly(adaptation):
    batches = make_batches(8)

    def fresh():
        return CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=40, adaptation=adaptation,
                                    gain_interval=3, r=5.0, warmup_iterations=1)

    a = fresh()
    run(a, batches[:5])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = fresh()
    b.load_state_dict(torch.load(buf))
    assert b.queue_idx == a.queue_idx and b.has_been_filled == a.has_been_filled
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    for e, y in batches[5:]:
        assert torch.equal(a(e, y), b(e, y))
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    # a fresh module (what PML's memory gives after a restart) does not continue the same way
    c = fresh()
    assert not torch.equal(c.embedding_memory, a.embedding_memory)


def test_reset_queue_empties_everything():
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=20, adaptation="axbn")
    run(w, make_batches(3))
    w.reset_queue()
    assert w.queue_idx == 0 and not w.has_been_filled and int(w.filter_steps) == 0
    assert torch.count_nonzero(w.embedding_memory) == 0


# ---- construction ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(adaptation="bn"), dict(r=-1.0), dict(gain_interval=0), dict(ema_gain=0.0),
                                 dict(min_rows=1), dict(std_eps=0.0), dict(warmup_iterations=-1),
                                 dict(stats_dtype="float16"), dict(memory_size=0)])
def test_invalid_options_raise(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        CrossBatchNormMemory(losses.ContrastiveLoss(), D, **bad)


def test_xbm_is_pml_cross_batch_memory_with_a_checkpointable_state():
    from xml_plugin import registry
    batches = make_batches(7)
    ref = losses.CrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=40)
    ours = registry.build("loss_wrapper", {"name": "xbm", "memory_size": 40}, loss=losses.ContrastiveLoss(),
                          embedding_size=D)
    assert ours.adaptation == "none"
    for i, (e, y) in enumerate(batches):
        assert torch.allclose(ref(e, y), ours(e, y), atol=1e-6)
        if i == 3:  # a resumed copy continues with the memory
            state = ours.state_dict()
            ours = registry.build("loss_wrapper", {"name": "xbm", "memory_size": 40}, loss=losses.ContrastiveLoss(),
                                  embedding_size=D)
            ours.load_state_dict(state)
    assert torch.equal(ours.embedding_memory, ref.embedding_memory)


def test_registered_names():
    from xml_plugin import registry
    xbn = registry.build("loss_wrapper", {"name": "xbn", "memory_size": 16}, loss=losses.ContrastiveLoss(),
                         embedding_size=D)
    axbn = registry.build("loss_wrapper", "axbn", loss=losses.ContrastiveLoss(), embedding_size=D)
    assert type(xbn) is CrossBatchNormMemory and xbn.adaptation == "xbn" and xbn.memory_size == 16
    assert isinstance(axbn, AdaptiveCrossBatchNormMemory) and axbn.adaptation == "axbn"
    with pytest.raises(registry.UnknownOptionError, match="no_such_option"):
        registry.build("loss_wrapper", {"name": "axbn", "no_such_option": 1}, loss=losses.ContrastiveLoss(),
                       embedding_size=D)


def test_enqueue_mask_matches_pml():
    ref = losses.CrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=20)
    ours = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=20, adaptation="none")
    for e, y in make_batches(4):
        mask = torch.arange(len(e)) % 2 == 0  # half the rows are stored, the other half are queries
        assert torch.equal(ref(e, y, enqueue_mask=mask), ours(e, y, enqueue_mask=mask))
    assert torch.equal(ref.embedding_memory, ours.embedding_memory)
    xbn = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=20, adaptation="xbn", normalize=False)
    (e1, y1), (e2, y2) = make_batches(2)
    mask = torch.arange(len(e1)) < 6
    xbn(e1, y1, enqueue_mask=mask)
    xbn(e2, y2, enqueue_mask=mask)
    assert torch.allclose(xbn.embedding_memory[:6].mean(0), e2[mask].mean(0), atol=1e-5)  # stats of the stored rows


# ---- memory size from the training fold, the official XBM loss ------------------------------------

@pytest.mark.parametrize("fraction, train_size, rows", [
    (0.5, 253, 126), (0.5, 255, 128), (0.3, 1000, 300), (1.0, 77, 77), (1e-6, 100, 1), (0.5, 1, 1)])
def test_memory_fraction_resolves_against_the_training_fold(fraction, train_size, rows):
    """round(fraction * train_size) (halves to even), at least 1 row; written out per case."""
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_fraction=fraction, train_size=train_size)
    assert w.memory_size == rows and w.embedding_memory.shape == (rows, D)
    assert resolve_memory_size(None, fraction, train_size) == rows


def test_memory_size_rules():
    assert resolve_memory_size(48, 0.5, 1000) == 48  # a fixed size wins
    assert resolve_memory_size(None, 0.5, None) == DEFAULT_MEMORY_SIZE == 1024  # no fold size: the default
    assert resolve_memory_size() == 1024
    for bad in (0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="memory_fraction"):
            resolve_memory_size(None, bad, 100)
    with pytest.raises(ValueError, match="memory_size"):
        resolve_memory_size(0, None, None)
    with pytest.raises(ValueError, match="train_size"):
        resolve_memory_size(None, 0.5, 0)


def test_engine_sizes_the_memory_from_the_fold_per_preset():
    """The presets' fractions (cards: the whole fold; kanji, SOP, In-Shop: half) reach the memory through the
    engine's build_loss, which passes the fold's train_size."""
    from xml_plugin import config as C
    from xml_plugin.engine import train as T
    from xml_plugin.protocol.experiment import method_config
    for dataset, fraction in (("cards", 1.0), ("kanji", 0.5), ("sop", 0.5), ("inshop", 0.5)):
        overrides = [("dataset.name", dataset)]
        cfg = C.load({}, overrides, presets=C.presets_for({}, overrides))
        for method in ("xbm", "xbn", "axbn"):
            mcfg = C.resolve(method_config(cfg, method))
            opts = mcfg["loss_wrapper"]["options"]
            assert opts["memory_fraction"] == fraction and "memory_size" not in opts, (dataset, method)
            assert opts["in_batch_loss"] is True and opts["enqueue_during_warmup"] is False
            built = T.build_loss(mcfg, num_classes=10, emb_size=D, histogram_size=None, train_size=1501)
            assert built.memory_size == round(fraction * 1501), (dataset, method)


def test_memory_weight_scales_the_memory_term():
    batches = make_batches(4)
    for adaptation in ("none", "xbn"):
        one = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=30, adaptation=adaptation)
        half = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=30, adaptation=adaptation,
                                    memory_weight=0.5, in_batch_loss=True)
        loss = losses.ContrastiveLoss()
        for e, y in batches:
            en = F.normalize(e, dim=1) if adaptation != "none" else e
            assert torch.allclose(half(e, y), 0.5 * one(e, y) + loss(en, y), atol=1e-6)
    with pytest.raises(ValueError, match="memory_weight"):
        CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_weight=-1.0)
    with pytest.raises(ValueError, match="memory_weight"):
        CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_weight=0.0)  # and no in-batch term: a zero loss


def test_official_xbm_form_fills_the_memory_only_after_the_warmup():
    """in_batch_loss + enqueue_during_warmup=False: during the warm-up the in-batch loss alone and an empty memory;
    from then on the in-batch loss plus the loss against a memory holding only post-warm-up batches."""
    batches = make_batches(5)
    loss = losses.ContrastiveLoss()
    official = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=100, adaptation="none",
                                    in_batch_loss=True, warmup_iterations=2, enqueue_during_warmup=False)
    late = CrossBatchNormMemory(losses.ContrastiveLoss(), D, memory_size=100, adaptation="none")  # sees batches 2..4
    for t, (e, y) in enumerate(batches):
        got = official(e, y)
        if t < 2:
            assert torch.equal(got, loss(e, y)) and official.queue_idx == 0 and not official.has_been_filled
        else:
            assert torch.allclose(got, late(e, y) + loss(e, y), atol=1e-6)
            assert official.queue_idx == 12 * (t - 1)
    assert torch.equal(official.embedding_memory, late.embedding_memory)
