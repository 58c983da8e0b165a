"""The verdicts' statistics against independent computations: scipy's paired t-test and t-interval, a Holm step
written here, a brute-force test-class bootstrap (each resample rebuilt and searched item by item), the project's
metric code (engine.evaluate) on the test set itself."""
import math

import numpy as np
import pytest
from scipy import stats

from xml_plugin.config import ConfigError
from xml_plugin.engine.evaluate import retrieval_metrics
from xml_plugin.protocol import verdicts as V


# ----------------------------------------------------------------------------- paired t

def test_paired_t_matches_scipy_ttest_rel_and_t_interval():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        a, b = rng.normal(0.3, 0.02, n), rng.normal(0.29, 0.02, n)
        t = V.paired_t(a - b)
        ref = stats.ttest_rel(a, b)
        d = a - b
        lo, hi = stats.t.interval(0.95, n - 1, loc=d.mean(), scale=stats.sem(d))
        assert t["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
        assert t["mean"] == pytest.approx(d.mean(), abs=1e-15) and t["n"] == n
        assert t["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-10)
        # the interval excludes 0 exactly when p < 0.05
        assert (V.interval_verdict(t["mean"], t["ci95"]) != V.NO_DIFFERENCE) == (ref.pvalue < 0.05)
    one = V.paired_t([0.01])
    assert one["n"] == 1 and math.isnan(one["ci95"]) and math.isnan(one["p_value"])
    # the same difference every time: a point interval, p = 0 (scipy: nan), verdict and p agree
    same = V.paired_t([0.02, 0.02, 0.02])
    assert same["ci95"] == pytest.approx(0, abs=1e-15) and same["p_value"] == 0.0
    assert V.interval_verdict(same["mean"], same["ci95"]) == V.p_verdict(same["mean"], same["p_value"]) == V.BETTER
    assert V.paired_t([0.0, 0.0])["p_value"] == 1.0


# ----------------------------------------------------------------------------- Holm

def _holm_by_hand(p):
    """Holm's procedure as a loop: sort, multiply the j-th smallest by (m - j + 1), keep the running maximum."""
    idx = [i for i in range(len(p)) if not math.isnan(p[i])]
    idx.sort(key=lambda i: p[i])
    m, out, running = len(idx), [math.nan] * len(p), 0.0
    for j, i in enumerate(idx):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


def test_holm_matches_a_step_down_loop_and_rejects_like_holm():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, rng.integers(1, 9)))
        if len(p) > 2:
            p[1] = math.nan
        got = V.holm(p)
        assert np.allclose(got, _holm_by_hand(p), equal_nan=True)
        # Holm's rejections: step through the sorted p-values while p_(j) < alpha / (m - j + 1)
        defined = sorted((x, i) for i, x in enumerate(p) if not math.isnan(x))
        rejected = set()
        for j, (x, i) in enumerate(defined):
            if x >= 0.05 / (len(defined) - j):
                break
            rejected.add(i)
        assert {i for i, x in enumerate(got) if x < 0.05} == rejected
    assert np.isnan(V.holm([math.nan])).all() and V.holm([]).size == 0


def _cells(values_a, values_b, dataset="cub"):
    recs = []
    for method, values in (("xml", values_a), ("baseline", values_b)):
        for (emb, metric), vs in values.items():
            recs += [dict(dataset=dataset, method=method, embedding=emb, metric=metric, seed=s, value=v)
                     for s, v in enumerate(vs)]
    return recs


def test_paired_differences_p_values_holm_and_shown_verdicts():
    rng = np.random.default_rng(2)
    n = 5
    cells = [(e, m) for e in ("separate", "concatenated") for m in ("precision_at_1", V.MAP_AT_R)]
    base = {c: rng.normal(0.3, 0.01, n) for c in cells}
    shift = {c: s for c, s in zip(cells, (0.0, 0.006, 0.02, 0.02))}
    xml = {c: base[c] + shift[c] + rng.normal(0, 0.006, n) for c in cells}
    rows = V.paired_differences(_cells(xml, base), "baseline")
    assert len(rows) == 4
    p = [stats.ttest_rel(xml[(r["embedding"], r["metric"])], base[(r["embedding"], r["metric"])]).pvalue for r in rows]
    assert [r["p_value"] for r in rows] == pytest.approx(p, rel=1e-10)
    assert [r["p_adjusted"] for r in rows] == pytest.approx(_holm_by_hand(p), rel=1e-10)
    for r in rows:
        primary = (r["embedding"], r["metric"]) == ("concatenated", V.MAP_AT_R)
        assert r["endpoint"] == ("primary" if primary else "secondary") and r["comparison"] == "equal_budget"
        want = r["verdict"] if primary else (("better" if r["mean"] > 0 else "worse") if r["p_adjusted"] < 0.05
                                             else "no difference detected")
        assert r["shown_verdict"] == want
    # another primary endpoint moves the mark; a family per method
    other = V.paired_differences(_cells(xml, base), "baseline", primary={"metric": "precision_at_1",
                                                                          "embedding": "separate"})
    assert [r["endpoint"] for r in other].count("primary") == 1
    assert next(r for r in other if r["endpoint"] == "primary")["metric"] == "precision_at_1"


def test_holm_can_overturn_a_secondary_interval():
    """A cell whose own interval excludes 0 (p about 0.02) reads "no difference detected" after Holm over 4 cells."""
    d = np.array([0.010, 0.002, 0.006, 0.012, 0.004])
    p = stats.ttest_rel(d, np.zeros(5)).pvalue
    assert 0.01 < p < 0.05
    rows = V.with_holm([dict(dataset="c", method="x", reference="b", embedding="separate", metric=m, mean=d.mean(),
                             ci95=V.paired_t(d)["ci95"], verdict="better", p_value=p)
                        for m in ("precision_at_1", "r_precision", V.MAP_AT_R, "recall_at_1")])
    assert all(r["p_adjusted"] == pytest.approx(min(1, 4 * p)) for r in rows)
    assert all(r["shown_verdict"] == V.NO_DIFFERENCE for r in rows)


def test_parse_primary():
    assert V.parse_primary(None) == V.PRIMARY
    assert V.parse_primary({"metric": "r_precision"}) == {"metric": "r_precision", "embedding": "concatenated"}
    assert V.parse_primary({"metric": "recall_at_4", "embedding": "separate"})["metric"] == "recall_at_4"
    for bad in ({"metric": "nmi"}, {"embedding": "both"}, {"metrc": "r_precision"}, "map"):
        with pytest.raises(ConfigError, match="report.primary"):
            V.parse_primary(bad)


# ----------------------------------------------------------------------------- over searches

def test_over_searches_matches_scipy_t_interval():
    means = [0.0113, 0.0011, 0.006]
    t = V.over_searches(means)
    lo, hi = stats.t.interval(0.95, len(means) - 1, loc=np.mean(means), scale=stats.sem(means))
    assert t["mean"] == pytest.approx(np.mean(means)) and t["n"] == 3
    assert t["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-10)
    assert t["p_value"] == pytest.approx(stats.ttest_1samp(means, 0).pvalue, rel=1e-10)
    assert V.over_searches([0.01]) is None and V.over_searches([]) is None
    # rows: the per-search mean differences of each cell, searches paired within themselves
    rng = np.random.default_rng(3)
    recs = []
    for s, shift in enumerate((0.02, 0.0)):
        for method, base in (("baseline", 0.3), ("xml", 0.3 + shift)):
            recs += [dict(dataset="cub", method=method, embedding="concatenated", metric=V.MAP_AT_R, seed=k,
                          search=s, value=base + 0.001 * k + rng.normal(0, 0.002)) for k in range(4)]
    per_search = V.paired_differences(recs, "baseline")
    assert sorted(r["search"] for r in per_search) == [0, 1]
    for r in per_search:
        a = [x["value"] for x in recs if (x["method"], x["search"]) == ("xml", r["search"])]
        b = [x["value"] for x in recs if (x["method"], x["search"]) == ("baseline", r["search"])]
        assert r["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    (over,) = V.over_searches_rows(per_search)
    m = [r["mean"] for r in sorted(per_search, key=lambda r: r["search"])]
    lo, hi = stats.t.interval(0.95, 1, loc=np.mean(m), scale=stats.sem(m))
    assert over["comparison"] == "over_searches" and over["n"] == 2 and over["endpoint"] == "primary"
    assert over["mean"] == pytest.approx(np.mean(m)) and over["ci95"] == pytest.approx((hi - lo) / 2)
    assert V.over_searches_rows([r for r in per_search if r["search"] == 0]) == []


# ----------------------------------------------------------------------------- test-class bootstrap

def _toy(seed=0, sizes=(4, 3, 5, 1, 3, 4), d=6):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)) * 10 + 7, sizes)  # class ids not 0..C-1; one singleton class
    centres = rng.normal(size=(len(sizes), d))
    cls = np.repeat(np.arange(len(sizes)), sizes)
    make = lambda: centres[cls] + rng.normal(0, 0.9, (len(labels), d))
    return labels, make


def _brute_metric(emb, labels, draw, metric, is_query=None, is_gallery=None):
    """The metric of one resample, rebuilt item by item: the drawn classes' items, copy j of a class labelled j;
    each query ranks every other item of the resample except its own class's other copies."""
    classes = np.unique(labels)
    items = [(i, j, c) for j, c in enumerate(draw) for i in np.flatnonzero(labels == classes[c])]
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    values = []
    for qi, qj, qc in items:
        if is_query is not None and not is_query[qi]:
            continue
        sims, rel = [], []
        for gi, gj, gc in items:
            if (gi, gj) == (qi, qj) and is_query is None:
                continue
            if is_gallery is not None and not is_gallery[gi]:
                continue
            if gc == qc and gj != qj:  # a twin of the query's own class
                continue
            sims.append(float(e[qi] @ e[gi]))
            rel.append(gj == qj)
        rel = np.array(rel)[np.argsort(-np.array(sims), kind="stable")]
        r = int(rel.sum())
        if r == 0:
            continue
        if metric == V.MAP_AT_R:
            values.append(sum(rel[:k + 1].sum() / (k + 1) for k in range(r) if rel[k]) / r)
        elif metric == "r_precision":
            values.append(rel[:r].sum() / r)
        else:
            values.append(float(rel[0]))
    return float(np.mean(values))


@pytest.mark.parametrize("metric", V.BOOTSTRAP_METRICS)
def test_class_resampled_metric_on_the_test_set_is_the_evaluation_metric(metric):
    labels, make = _toy(4)
    e = make()
    ones = np.ones((len(np.unique(labels)), 1))
    assert V.class_resampled_metric(e, labels, ones, metric)[0] == pytest.approx(
        retrieval_metrics(e, labels)[metric], abs=1e-12)
    # query vs gallery (In-Shop): every other item of a class is a query
    is_query = np.arange(len(labels)) % 2 == 0
    got = V.class_resampled_metric(e, labels, ones, metric, is_query=is_query, is_gallery=~is_query)[0]
    want = retrieval_metrics(e[is_query], labels[is_query], e[~is_query], labels[~is_query])[metric]
    assert got == pytest.approx(want, abs=1e-12)
    # the fold models' metrics averaged ("separate")
    f = make()
    assert V.class_resampled_metric([e, f], labels, ones, metric)[0] == pytest.approx(
        (retrieval_metrics(e, labels)[metric] + retrieval_metrics(f, labels)[metric]) / 2, abs=1e-12)


def test_paired_bootstrap_matches_a_brute_force_loop():
    labels, make = _toy(5)
    n_classes, n, seed = len(np.unique(labels)), 40, 11
    a = [make(), make()]  # two reproductions per method
    b = [make(), make()]
    draws = np.random.default_rng(seed).integers(0, n_classes, size=(n, n_classes))  # the documented draws
    assert np.array_equal(V.draw_classes(n_classes, n, seed), draws)
    assert any(len(set(row)) < n_classes for row in draws)  # some classes drawn several times
    for metric in (V.MAP_AT_R, "precision_at_1"):
        boot = V.paired_bootstrap(a, b, labels, metric, n=n, seed=seed)
        brute = np.array([np.mean([_brute_metric(ea, labels, draw, metric) - _brute_metric(eb, labels, draw, metric)
                                   for ea, eb in zip(a, b)]) for draw in draws])
        assert boot["differences"] == pytest.approx(brute, abs=1e-12)
        assert boot["low"] == pytest.approx(np.percentile(brute, 2.5)) and boot["high"] == pytest.approx(
            np.percentile(brute, 97.5))
        assert boot["mean"] == pytest.approx(np.mean([retrieval_metrics(ea, labels)[metric]
                                                      - retrieval_metrics(eb, labels)[metric] for ea, eb in zip(a, b)]))
        assert boot["resamples"] == n and boot["low"] < boot["high"]
    # query vs gallery
    is_query = np.arange(len(labels)) % 2 == 1
    boot = V.paired_bootstrap(a[0], b[0], labels, "r_precision", n=10, seed=3, is_query=is_query,
                              is_gallery=~is_query)
    draws = V.draw_classes(n_classes, 10, 3)
    brute = [_brute_metric(a[0], labels, draw, "r_precision", is_query, ~is_query)
             - _brute_metric(b[0], labels, draw, "r_precision", is_query, ~is_query) for draw in draws]
    assert boot["differences"] == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError, match="same number of reproductions"):
        V.paired_bootstrap(a, b[:1], labels)


def test_bootstrap_rows_pair_reproductions_by_key():
    labels, make = _toy(6)
    embs = {"baseline": {1000: make(), 2000: make(), 3000: make()}, "xml": {1000: make(), 2000: make()}}
    (row,) = V.bootstrap_rows(embs, labels, "baseline", "cub", n=20, seed=0)
    boot = V.paired_bootstrap([embs["xml"][1000], embs["xml"][2000]], [embs["baseline"][1000], embs["baseline"][2000]],
                              labels, n=20, seed=0)
    assert row == dict(dataset="cub", method="xml", embedding="concatenated", metric=V.MAP_AT_R, reference="baseline",
                       comparison="equal_budget", mean=boot["mean"], n=2, boot_low=boot["low"],
                       boot_high=boot["high"], boot_resamples=20)


def test_one_reproduction_claims_nothing():
    """A single paired difference has no interval and no p-value: the verdict says no test was possible, not "no
    difference detected"."""
    r = V.paired_t([0.2])
    assert r["n"] == 1 and math.isnan(r["ci95"]) and math.isnan(r["p_value"])
    assert V.interval_verdict(r["mean"], r["ci95"]) == V.NO_TEST == V.p_verdict(r["mean"], r["p_value"])
    assert "no test" in V.NO_TEST and V.interval_verdict(0.2, 0.1) == V.BETTER
