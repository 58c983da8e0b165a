"""GSP and its zero-shot loss as the authors' code runs them (docs/gsp.md): prototype seeding from normalised GAP
embeddings, the plain-GAP phase, He-normal class embeddings, alternate-class halves, the loss before the prototypes,
and the prototype counts of the presets. Expected values are computed here by brute force or from the formulas."""
import math

import pytest
import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss

from xml_plugin import config as C
from xml_plugin.losses.zero_shot import ZeroShotLoss, alternate_class_halves, he_normal_
from xml_plugin.models.gsp import GeneralizedSumPooling, kcenter_from_seeds


def unit_ball(v):
    """N(v) = v / max(||v||, 1), written out."""
    return torch.stack([row / max(float(row.norm()), 1.0) for row in v])


def brute_kcenter(points, seeds, k):
    """Greedy k-center from a seed set, with explicit loops: each pick maximises the distance to the nearest of the
    seeds and the points picked so far (first index on ties)."""
    chosen = []
    for _ in range(k):
        centres = list(seeds) + [points[c] for c in chosen]
        best, best_d = 0, -1.0
        for i, p in enumerate(points):
            d = min(float((p - c).pow(2).sum()) for c in centres)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


# ---- seeding ------------------------------------------------------------------------------------

def test_kcenter_from_seeds_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for n, s, k in ((30, 4, 4), (50, 8, 8), (12, 3, 5)):
        pts, seeds = torch.randn(n, 3, generator=g), torch.randn(s, 3, generator=g)
        assert kcenter_from_seeds(pts, seeds, k).tolist() == brute_kcenter(pts, seeds, k)


def test_kcenter_from_seeds_avoids_the_seeds_neighbourhood():
    """Points next to a seed are never picked while a far point remains."""
    seeds = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    pts = torch.tensor([[0.1, 0.0], [9.9, 0.0], [5.0, 5.0], [5.0, -5.0], [0.0, 0.2]])
    assert sorted(kcenter_from_seeds(pts, seeds, 2).tolist()) == [2, 3]


def feature_maps(step, batch=8, dim=4, side=3, scale=3.0):
    g = torch.Generator().manual_seed(step)
    return scale * torch.randn(batch, dim, side, side, generator=g)  # norms well above 1: N(.) matters


def test_authors_seeding_collects_normalised_gap_and_seeds_with_the_first_rows():
    """init_features = 44 rows from batches of 8: 6 batches (the sixth would run past the end and is written at the
    last 8 rows), all six pooled by plain GAP; the prototypes are the N(GAP) rows, among rows m.., picked by k-center
    seeded with rows :m; the seventh batch is transported."""
    m, size = 3, 44
    pool = GeneralizedSumPooling(4, num_prototypes=m, iterations=20, init_features=size)
    assert pool.seeding == "authors"
    expected = torch.zeros(size, 4)
    count = 0
    for t in range(6):
        fmap = feature_maps(t)
        gap = fmap.mean(dim=(2, 3))
        out = pool(fmap)
        assert out.histogram is None and torch.allclose(out.embedding, gap)
        start = min(count, size - 8)
        expected[start:start + 8] = unit_ball(gap)
        count += 8
        assert bool(pool.initialized) == (t == 5)
    assert torch.allclose(pool.collected, expected, atol=1e-6)
    picks = brute_kcenter(expected[m:], expected[:m], m)
    assert torch.allclose(pool.prototypes.detach(), expected[m:][picks], atol=1e-6)
    assert bool((pool.prototypes.detach().norm(dim=1) <= 1 + 1e-6).all())
    out = pool(feature_maps(6))
    assert out.histogram is not None and out.histogram.shape == (8, m)


def test_default_plain_gap_phase_is_32_batches_of_32():
    """1024 GAP embeddings by default: batches 1..32 of 32 images are pooled by GAP, the 33rd by transport."""
    pool = GeneralizedSumPooling(4, num_prototypes=8, iterations=5)
    assert pool.init_features == 1024
    for t in range(32):
        assert pool(feature_maps(t, batch=32, side=2)).histogram is None
    assert bool(pool.initialized) and int(pool.num_collected) == 1024
    assert pool(feature_maps(32, batch=32, side=2)).histogram is not None


def test_authors_seeding_no_collection_at_eval_and_resumes_mid_collection():
    pool = GeneralizedSumPooling(4, num_prototypes=3, iterations=10, init_features=24)
    pool(feature_maps(0))
    pool.eval()
    pool(feature_maps(1))
    assert int(pool.num_collected) == 8  # evaluation batches are not collected
    pool.train()
    resumed = GeneralizedSumPooling(4, num_prototypes=3, iterations=10, init_features=24)
    resumed.load_state_dict(pool.state_dict())
    for t in (2, 3):
        pool(feature_maps(t)), resumed(feature_maps(t))
    assert bool(pool.initialized) and torch.equal(pool.prototypes, resumed.prototypes)
    assert torch.equal(pool(feature_maps(4)).embedding, resumed(feature_maps(4)).embedding)


def test_local_features_seeding_is_still_available():
    """The project's earlier seeding: raw local features, the transport from the filling batch on."""
    pool = GeneralizedSumPooling(4, num_prototypes=3, iterations=10, init_features=40, seeding="local_features")
    fmap = feature_maps(0, batch=2, side=5)  # 50 local features >= 40
    out = pool(fmap)
    assert bool(pool.initialized) and out.histogram is not None
    flat = fmap.flatten(2).transpose(1, 2).reshape(-1, 4)
    for row in pool.prototypes.detach():  # each prototype is one of the raw local features
        assert (flat - row).abs().sum(1).min() < 1e-5


@pytest.mark.parametrize("kwargs, name", [(dict(seeding="gap"), "seeding"),
                                          (dict(init_features=5), "init_features")])
def test_invalid_seeding_options_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GeneralizedSumPooling(4, num_prototypes=3, **kwargs)  # authors: at least 2 m = 6 rows


# ---- zero-shot loss -------------------------------------------------------------------------------

def test_he_normal_has_std_sqrt_2_over_num_classes():
    """Keras' he_normal on Psi [C, D]: fan_in = C, std sqrt(2 / C) after truncation at two stds of the normal."""
    for c, d in ((400, 512), (100, 2048)):
        psi = he_normal_(torch.empty(c, d), generator=torch.Generator().manual_seed(c))
        target = math.sqrt(2.0 / c)
        assert float(psi.std()) == pytest.approx(target, rel=0.02)
        assert float(psi.abs().max()) <= 2 * target / 0.87962566103423978 + 1e-6
        assert abs(float(psi.mean())) < 0.05 * target


def test_zsr_default_init_is_he_normal_and_unit_is_an_option():
    torch.manual_seed(0)
    he = ZeroShotLoss(MultiSimilarityLoss(), num_classes=200, histogram_size=5, class_embedding_size=256)
    assert he.class_embedding_init == "he_normal"
    assert float(he.class_embeddings.detach().std()) == pytest.approx(math.sqrt(2 / 200), rel=0.03)
    unit = ZeroShotLoss(MultiSimilarityLoss(), num_classes=200, histogram_size=5, class_embedding_size=256,
                        class_embedding_init="unit")
    assert torch.allclose(unit.class_embeddings.norm(dim=1), torch.ones(200), atol=1e-5)
    # the rows' norm: sqrt(D * 2 / C) = 1.6 here instead of 1, so the logits start on another scale
    assert float(he.class_embeddings.detach().norm(dim=1).mean()) == pytest.approx(math.sqrt(256 * 2 / 200), rel=0.03)


def test_alternate_class_halves_follow_the_order_of_appearance():
    labels = torch.tensor([5, 5, 2, 2, 9, 9, 1, 1])
    in_a, in_b = alternate_class_halves(labels)
    assert set(labels[in_a].tolist()) == {5, 9} and set(labels[in_b].tolist()) == {2, 1}
    shuffled = torch.tensor([1, 1, 9, 9, 5, 5, 2, 2])  # another class order: other halves
    in_a, _ = alternate_class_halves(shuffled)
    assert set(shuffled[in_a].tolist()) == {1, 5}
    in_a, in_b = alternate_class_halves(torch.tensor([3, 3, 3]))
    assert bool(in_a.all()) and not bool(in_b.any())


def test_zsr_value_with_alternate_halves():
    """The zero-shot term from its definition, halves by alternate classes (order of appearance 2, 0, 1, 3:
    A = {2, 1}, B = {0, 3}): a ridge fit in float64 from one half's attributes to Psi[y], softmax cross-entropy of the
    other half's predictions against every class, both ways averaged; total (1 - w) L + w L_zsr."""
    torch.manual_seed(1)
    emb, hist = torch.randn(8, 6), torch.rand(8, 5).softmax(1)
    labels = torch.tensor([2, 0, 1, 3, 0, 2, 3, 1])
    w, ridge, scale = 0.3, 0.05, 9.5
    wrapper = ZeroShotLoss(MultiSimilarityLoss(), num_classes=4, histogram_size=5, class_embedding_size=7, weight=w)
    psi, a = wrapper.class_embeddings.detach().double(), hist.double()

    def score(fit, pred):
        h = a[fit]
        weights = torch.linalg.solve(h.T @ h + ridge * torch.eye(5, dtype=torch.float64), h.T @ psi[labels[fit]])
        logits = scale * (a[pred] @ weights) @ psi.T
        return torch.nn.functional.cross_entropy(logits, labels[pred])

    in_a = (labels == 2) | (labels == 1)
    zsr = 0.5 * (score(in_a, ~in_a) + score(~in_a, in_a))
    expected = (1 - w) * MultiSimilarityLoss()(emb, labels).double() + w * zsr
    assert float(wrapper(emb, labels, histograms=hist).detach()) == pytest.approx(float(expected), rel=1e-5)


def test_before_the_prototypes_the_loss_is_weighted_with_log_c():
    torch.manual_seed(0)
    emb, labels = torch.randn(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    base = MultiSimilarityLoss()(emb, labels)
    authors = ZeroShotLoss(MultiSimilarityLoss(), num_classes=10, histogram_size=5, weight=0.1)
    assert float(authors(emb, labels, histograms=None)) == pytest.approx(0.9 * float(base) + 0.1 * math.log(10))
    assert authors.last_zsr_loss == pytest.approx(math.log(10))
    plain = ZeroShotLoss(MultiSimilarityLoss(), num_classes=10, histogram_size=5, weight=0.1, no_histograms="base")
    assert torch.allclose(plain(emb, labels, histograms=None), base)


@pytest.mark.parametrize("kwargs", [dict(class_embedding_init="glorot"), dict(split="random"),
                                    dict(no_histograms="zero")])
def test_invalid_zsr_options_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ZeroShotLoss(MultiSimilarityLoss(), num_classes=4, histogram_size=5, **kwargs)


# ---- presets ----------------------------------------------------------------------------------------

def test_prototype_counts_and_seeding_per_preset():
    from xml_plugin.protocol.experiment import method_config
    for dataset, count in (("cards", 64), ("kanji", 64), ("sop", 128), ("inshop", 128)):
        overrides = [("dataset.name", dataset)]
        cfg = C.load({}, overrides, presets=C.presets_for({}, overrides))
        for method in ("gsp", "xml_gsp", "xml"):
            opts = C.resolve(method_config(cfg, method))["pooling"]["options"]
            assert opts["num_prototypes"] == count, (dataset, method)
            if method != "xml":
                assert opts["seeding"] == "authors" and opts["init_features"] == 1024
    zsr = C.resolve(method_config(cfg, "gsp"))["loss_wrapper"]["options"]
    assert (zsr["class_embedding_init"], zsr["split"], zsr["no_histograms"]) == ("he_normal", "alternate", "uniform")
