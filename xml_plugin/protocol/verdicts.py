"""Verdicts of the fair-comparison protocol: pure statistics on plain records (docs/protocol.md, "What each interval
covers").

- ``paired_t``: mean difference over paired reproductions, its Student-t interval and two-sided p-value;
  ``paired_differences`` applies it per (data set, method, embedding, metric) to records paired by seed.
- ``holm``: Holm's step-down adjustment of the p-values of one family (the metric x embedding cells of one method
  and data set); the report's verdicts of the cells other than the primary endpoint use it.
- ``paired_bootstrap`` / ``bootstrap_rows``: the test classes resampled with replacement, the metric of both
  methods recomputed from the test embeddings, a percentile interval of their difference (test-class noise).
- ``over_searches`` / ``over_searches_rows``: the mean of the per-search mean differences and its t-interval over
  the searches (search noise).

Records and rows are dicts; embeddings are numpy arrays. Nothing here knows about the Experiment or Optuna.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from ..config import ConfigError

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference detected"
NO_TEST = "no test (fewer than 2 reproductions)"  # one paired difference has no interval: nothing is claimed
MAP_AT_R = "mean_average_precision_at_r"
PRIMARY = {"metric": MAP_AT_R, "embedding": "concatenated"}  # report.primary's default
BOOTSTRAP_METRICS = ("precision_at_1", "r_precision", MAP_AT_R)
EQUAL_BUDGET, EQUAL_PARAMS, OVER_SEARCHES = "equal_budget", "equal_params", "over_searches"  # the `comparison` column
PRIMARY_ENDPOINT, SECONDARY = "primary", "secondary"  # the `endpoint` column


# ----------------------------------------------------------------------------- paired t

def t_half_width(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width of the Student-t interval: t_{(1+level)/2, n-1} * sd(ddof=1) / sqrt(n); NaN when n < 2."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n < 2:
        return math.nan
    t = stats.t.ppf(0.5 + level / 2, df=n - 1)
    return float(t * values.std(ddof=1) / math.sqrt(n))


def paired_t(differences: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """The paired t-test of differences d_r = a_r - b_r: ``mean``, ``ci95`` (half-width of the ``level`` t-interval),
    ``p_value`` (two-sided, t = mean / (sd / sqrt(n)) with n - 1 degrees of freedom) and ``n``.

    n < 2: interval and p-value NaN. sd = 0 (every pair differs by the same amount): the interval is that point,
    p = 0 for a non-zero mean and 1 for a zero mean (the limits of the t statistic), so that the verdict of the
    interval and that of the p-value always agree.
    """
    d = np.asarray(differences, dtype=np.float64)  # [n]
    n = int(d.size)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "ci95": math.nan, "p_value": math.nan, "n": n}
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), df=n - 1))
    return {"mean": mean, "ci95": t_half_width(d, level), "p_value": p, "n": n}


def interval_verdict(mean: float, ci95: float) -> str:
    """``better`` when the interval mean ± ci95 lies above 0, ``worse`` below, else ``no difference detected``;
    ``no test`` without an interval (a single reproduction)."""
    if math.isnan(ci95):
        return NO_TEST
    return BETTER if mean - ci95 > 0 else WORSE if mean + ci95 < 0 else NO_DIFFERENCE


def p_verdict(mean: float, p: float, alpha: float = 0.05) -> str:
    """``better`` / ``worse`` (sign of the mean) when p < alpha, else ``no difference detected``; ``no test`` without
    a p-value (a single reproduction)."""
    if p is None or math.isnan(p):
        return NO_TEST
    if not p < alpha:
        return NO_DIFFERENCE
    return BETTER if mean > 0 else WORSE if mean < 0 else NO_DIFFERENCE


# ----------------------------------------------------------------------------- Holm

def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family, in the input's order.

    With the m defined p-values sorted, p_(1) <= ... <= p_(m): p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Rejecting where p~ < alpha controls the family-wise error rate at alpha. NaN p-values (a cell with one
    reproduction) are not part of the family and stay NaN.
    """
    p = np.asarray(p_values, dtype=np.float64)  # [cells]
    out = np.full_like(p, np.nan)
    defined = np.flatnonzero(~np.isnan(p))
    m = defined.size
    if m == 0:
        return out
    order = defined[np.argsort(p[defined], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])  # (m - j + 1) p_(j), j = 1..m
    out[order] = np.maximum.accumulate(scaled)
    return out


def is_primary(row: Mapping, primary: Mapping = PRIMARY) -> bool:
    return row["metric"] == primary["metric"] and row["embedding"] == primary["embedding"]


def with_holm(rows: Sequence[Mapping], primary: Mapping = PRIMARY, level: float = 0.95) -> List[dict]:
    """``rows`` with ``p_adjusted`` (Holm over each family: the rows of one data set, method, reference, comparison
    and search), ``endpoint`` (``primary`` for the ``primary`` metric and embedding, else ``secondary``) and
    ``shown_verdict``: the interval's verdict for the primary endpoint, the Holm-adjusted p-value's for the others."""
    rows = [dict(r) for r in rows]
    families: Dict[tuple, List[int]] = {}
    for i, r in enumerate(rows):
        key = (r["dataset"], r["method"], r.get("reference"), r.get("comparison", EQUAL_BUDGET), r.get("search"))
        families.setdefault(key, []).append(i)
    for members in families.values():
        adjusted = holm([rows[i].get("p_value", math.nan) for i in members])
        for i, p in zip(members, adjusted):
            rows[i]["p_adjusted"] = float(p)
    for r in rows:
        r["endpoint"] = PRIMARY_ENDPOINT if is_primary(r, primary) else SECONDARY
        r["shown_verdict"] = shown_verdict(r, level)
    return rows


def shown_verdict(row: Mapping, level: float = 0.95) -> str:
    """The verdict the report shows: that of the Holm-adjusted p-value at 1 - level for a ``secondary`` row, else
    the interval's (``verdict``: the primary endpoint, and rows of earlier versions' files without an endpoint)."""
    if row.get("endpoint") != SECONDARY or row.get("p_adjusted") is None:
        return row.get("verdict") or NO_DIFFERENCE
    return p_verdict(row["mean"], float(row["p_adjusted"]), 1 - level)


def paired_differences(records: Iterable[Mapping], reference: str, level: float = 0.95,
                       primary: Mapping = PRIMARY, comparison: str = EQUAL_BUDGET) -> List[dict]:
    """Per (data set, search, method != reference, embedding, metric): ``paired_t`` of ``value - reference value``
    over the reproductions paired by ``seed`` (within the same ``search`` when the records name one), its interval
    verdict (``verdict``), ``p_value``, Holm's ``p_adjusted`` over the method's cells, ``endpoint`` and
    ``shown_verdict`` (see ``with_holm``). Seeds that only one of the two methods has (a failed reproduction) are
    left out of the pair. Rows come in order of first appearance; ``comparison`` labels them (``equal_budget``: the
    methods' own searches; ``equal_params``: the reference reproduced at the method's parameters)."""
    values: Dict[tuple, Dict[Any, float]] = {}
    for r in records:
        key = (r["dataset"], r.get("search"), r["method"], r["embedding"], r["metric"])
        values.setdefault(key, {})[r["seed"]] = float(r["value"])
    out = []
    for (dataset, search, method, emb, metric), by_seed in values.items():
        ref = values.get((dataset, search, reference, emb, metric))
        if method == reference or ref is None:
            continue
        seeds = sorted(set(by_seed) & set(ref))
        if not seeds:
            continue
        t = paired_t([by_seed[s] - ref[s] for s in seeds], level)
        row = dict(dataset=dataset, method=method, embedding=emb, metric=metric, mean=t["mean"], ci95=t["ci95"],
                   n=t["n"], reference=reference, verdict=interval_verdict(t["mean"], t["ci95"]),
                   p_value=t["p_value"], comparison=comparison)
        if search is not None:
            row["search"] = search
        out.append(row)
    return with_holm(out, primary, level)


def parse_primary(spec: Optional[Mapping]) -> Dict[str, str]:
    """``report.primary`` checked: ``{metric: NAME, embedding: separate|concatenated}``; None -> PRIMARY."""
    if spec is None:
        return dict(PRIMARY)
    if not isinstance(spec, Mapping) or set(spec) - {"metric", "embedding"}:
        raise ConfigError(f"report.primary must be '{{metric: NAME, embedding: separate|concatenated}}', got {spec!r}")
    out = {**PRIMARY, **{k: v for k, v in spec.items() if v is not None}}
    metric_ok = out["metric"] in BOOTSTRAP_METRICS or (isinstance(out["metric"], str)
                                                       and out["metric"].startswith("recall_at_"))
    if not metric_ok:
        raise ConfigError(f"report.primary.metric={out['metric']!r} is not a reported metric: use one of "
                          f"{', '.join(BOOTSTRAP_METRICS)} or recall_at_K (a K of eval.recall_at)")
    if out["embedding"] not in ("separate", "concatenated"):
        raise ConfigError(f"report.primary.embedding={out['embedding']!r}: use separate or concatenated")
    return out


# ----------------------------------------------------------------------------- over searches

def over_searches(per_search_means: Sequence[float], level: float = 0.95) -> Optional[Dict[str, float]]:
    """The verdict over S searches from their S mean paired differences: ``paired_t`` of those S values (mean,
    t-interval over the searches, p-value, n = S). None with S < 2: one search says nothing about the search's own
    randomness."""
    if len(per_search_means) < 2:
        return None
    return paired_t(per_search_means, level)


def over_searches_rows(diffs: Iterable[Mapping], level: float = 0.95, primary: Mapping = PRIMARY) -> List[dict]:
    """One row per (data set, method, reference, embedding, metric) of ``equal_budget`` rows that name their
    ``search``: ``over_searches`` of the per-search means (comparison ``over_searches``, ``n`` = S), with Holm over
    each method's cells. Cells with fewer than 2 searches give no row."""
    groups: Dict[tuple, Dict[Any, float]] = {}
    for d in diffs:
        if d.get("search") is None or d.get("comparison", EQUAL_BUDGET) != EQUAL_BUDGET:
            continue
        groups.setdefault((d["dataset"], d["method"], d["reference"], d["embedding"], d["metric"]), {})[
            d["search"]] = float(d["mean"])
    out = []
    for (dataset, method, reference, emb, metric), by_search in groups.items():
        t = over_searches([by_search[s] for s in sorted(by_search)], level)
        if t is None:
            continue
        out.append(dict(dataset=dataset, method=method, embedding=emb, metric=metric, mean=t["mean"], ci95=t["ci95"],
                        n=t["n"], reference=reference, verdict=interval_verdict(t["mean"], t["ci95"]),
                        p_value=t["p_value"], comparison=OVER_SEARCHES))
    return with_holm(out, primary, level)


# ----------------------------------------------------------------------------- test-class bootstrap

def draw_classes(n_classes: int, n: int, seed: int) -> np.ndarray:
    """The bootstrap's draws: ``[n, n_classes]`` class indices, each row ``n_classes`` draws with replacement
    (numpy's default_rng(seed).integers)."""
    return np.random.default_rng(seed).integers(0, n_classes, size=(n, n_classes))


def _normalize(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _negatives_above(sims: np.ndarray, q_cls: np.ndarray, g_cls: np.ndarray, same_source: bool, n_classes: int,
                     k_max: int, rows: np.ndarray) -> np.ndarray:
    """For the queries ``rows``: how many gallery items of each class that is not the query's rank above the query's
    k-th positive (k = 1..k_max, by decreasing similarity), ``[q, k_max, C]``; the query itself is no neighbour."""
    s = sims[rows].copy()  # [q, G]
    if same_source:
        s[np.arange(len(rows)), rows] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")  # [q, G]
    cls = g_cls[order]  # [q, G]
    pos = cls == q_cls[rows][:, None]
    if same_source:
        pos &= order != rows[:, None]
    before = np.cumsum(pos, axis=1) - pos  # positives ranked above each item
    neg = ~pos & (cls != q_cls[rows][:, None]) & (before < k_max)
    r, c = np.nonzero(neg)
    flat = (r * k_max + before[r, c]) * n_classes + cls[r, c]
    counts = np.bincount(flat, minlength=len(rows) * k_max * n_classes).reshape(len(rows), k_max, n_classes)
    return np.cumsum(counts, axis=1)  # negatives above positive k = those before positives 1..k


def class_resampled_metric(embeddings, labels, weights: np.ndarray, metric: str = MAP_AT_R, is_query=None,
                           is_gallery=None, chunk: int = 1 << 22) -> np.ndarray:
    """``metric`` of the test set for each column of ``weights`` ([C, B]: how often each class was drawn), exactly as
    if the set were rebuilt from the drawn classes: a class drawn w times is w distinct classes (copies relabelled),
    and a query does not see the other copies of its own class (they would be negatives identical to its positives).

    Then a query's positives are its own class's items and each other class c counts w_c times among its negatives,
    so the rank of its k-th positive is k + sum_c w_c n_{k,c} (n_{k,c}: class-c items above that positive in the
    full set), and every copy of a query gets the same precision values. MAP@R = mean over queries of
    (1/R) sum_{k: rank_k <= R} k / rank_k, R-Precision = #{k: rank_k <= R} / R, P@1 = [rank_1 = 1], each query
    weighted by its class's w (queries without a positive left out, as PML does). ``weights`` all ones is the metric
    of the test set itself. ``embeddings``: [N, d] or a list of fold models' [N, d] (their metrics averaged:
    "separate"); cosine similarity (L2-normalised, like the evaluation). Cost: N * R * C * B multiply-adds.
    Returns [B].
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"the bootstrap recomputes {BOOTSTRAP_METRICS}, not {metric!r}")
    if isinstance(embeddings, np.ndarray) and embeddings.ndim == 2:
        embeddings = [embeddings]
    labels = np.asarray(labels)
    classes, cls = np.unique(labels, return_inverse=True)  # cls [N]: class index 0..C-1
    weights = np.asarray(weights, dtype=np.float32)  # [C, B]
    if weights.shape[0] != len(classes):
        raise ValueError(f"weights has {weights.shape[0]} rows for {len(classes)} classes")
    same_source = is_query is None or is_gallery is None
    q_idx = np.arange(len(labels)) if same_source else np.flatnonzero(is_query)
    g_idx = np.arange(len(labels)) if same_source else np.flatnonzero(is_gallery)
    q_cls, g_cls = cls[q_idx], cls[g_idx]
    r_per_query = np.bincount(g_cls, minlength=len(classes))[q_cls] - int(same_source)  # R of each query [Q]
    k_max = max(int(r_per_query.max()), 1)
    n_classes, n_resamples = len(classes), weights.shape[1]
    ks = np.arange(1, k_max + 1, dtype=np.float32)  # [K]
    total = np.zeros(n_resamples)
    for emb in embeddings:
        e = _normalize(emb)
        sims = e[q_idx] @ e[g_idx].T  # [Q, G]
        num = np.zeros(n_resamples)
        step = max(1, chunk // (k_max * max(n_classes, n_resamples)))
        for start in range(0, len(q_idx), step):
            rows = np.arange(start, min(start + step, len(q_idx)))
            above = _negatives_above(sims, q_cls, g_cls, same_source, n_classes, k_max, rows)  # [q, K, C]
            rank = ks[None, :, None] + (above.reshape(-1, n_classes).astype(np.float32) @ weights).reshape(
                len(rows), k_max, n_resamples)  # [q, K, B]
            r = r_per_query[rows].astype(np.float32)[:, None, None]  # [q, 1, 1]
            hit = (ks[None, :, None] <= r) & (rank <= r)  # the k-th positive exists and lies within the top R
            if metric == MAP_AT_R:
                precision = ks.astype(np.float64)[None, :, None] / rank  # k / rank_k
                per_query = np.where(hit, precision, 0).sum(1) / np.maximum(r[:, :, 0], 1)
            elif metric == "r_precision":
                per_query = hit.sum(1) / np.maximum(r[:, :, 0], 1)
            else:
                per_query = (rank[:, 0, :] == 1) & (r[:, 0, :] >= 1)
            num += ((r_per_query[rows] > 0)[:, None] * weights[q_cls[rows]] * per_query).sum(0)
        den = ((r_per_query > 0)[:, None] * weights[q_cls]).sum(0)  # [B]
        total += np.where(den > 0, num / np.maximum(den, 1e-12), np.nan)
    return total / len(embeddings)


def _reproductions(emb) -> list:
    """One reproduction's embedding (an [N, d] array) or a list of them (one per reproduction)."""
    return [emb] if isinstance(emb, np.ndarray) and emb.ndim == 2 else list(emb)


def paired_bootstrap(emb_a, emb_b, labels, metric: str = MAP_AT_R, n: int = 1000, seed: int = 0,
                     level: float = 0.95, is_query=None, is_gallery=None) -> Dict[str, Any]:
    """Test-class bootstrap of ``metric(a) - metric(b)``: the test classes resampled with replacement ``n`` times
    (``draw_classes``, the same draws for both methods and every reproduction), the metric of both recomputed on each
    resample (``class_resampled_metric``); per resample the differences are averaged over the reproductions.

    ``emb_a``, ``emb_b``: one reproduction's test embeddings or a list of them, paired by position; each [N, d] or
    a list of the fold models' [N, d] ("separate"). Returns ``mean`` (the mean difference on the test set itself),
    ``low``/``high`` (the (1 -+ level)/2 percentiles of the resampled differences), ``resamples`` and
    ``differences`` ([n])."""
    a, b = _reproductions(emb_a), _reproductions(emb_b)
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs the same number of reproductions, got {len(a)} and {len(b)}")
    n_classes = len(np.unique(np.asarray(labels)))
    draws = draw_classes(n_classes, n, seed)  # [n, C]
    weights = np.stack([np.bincount(row, minlength=n_classes) for row in draws]
                       + [np.ones(n_classes, dtype=np.int64)], axis=1)  # [C, n + 1]: the draws, then the test set
    kw = dict(metric=metric, is_query=is_query, is_gallery=is_gallery)
    total = np.zeros(n + 1)
    for ea, eb in zip(a, b):
        total += class_resampled_metric(ea, labels, weights, **kw) - class_resampled_metric(eb, labels, weights, **kw)
    diffs, observed = total[:n] / len(a), float(total[n]) / len(a)
    low, high = np.nanpercentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": observed, "low": float(low), "high": float(high), "resamples": int(n),
            "differences": diffs}


def bootstrap_rows(embeddings_by_method_and_reproduction: Mapping[str, Mapping[Any, Any]], labels, reference: str,
                   dataset: str, primary: Mapping = PRIMARY, n: int = 1000, seed: int = 0, level: float = 0.95,
                   is_query=None, is_gallery=None) -> List[dict]:
    """``paired_bootstrap`` of every method against ``reference`` for the primary endpoint: rows ``dataset, method,
    embedding, metric, reference, comparison (equal_budget), mean, n`` (paired reproductions), ``boot_low``,
    ``boot_high``, ``boot_resamples``, which ``report.write_report(bootstrap=...)`` puts beside the seed interval.

    ``embeddings_by_method_and_reproduction``: {method: {reproduction key (seed): test embeddings}}, the embeddings of
    ``primary["embedding"]``: the concatenated [N, folds * d] array, or the list of fold models' [N, d] arrays for
    ``separate``; reproductions are paired by key (keys only one method has are left out)."""
    primary = parse_primary(primary)
    ref = embeddings_by_method_and_reproduction[reference]
    out = []
    for method, by_key in embeddings_by_method_and_reproduction.items():
        keys = sorted(set(by_key) & set(ref), key=str)
        if method == reference or not keys:
            continue
        boot = paired_bootstrap([by_key[k] for k in keys], [ref[k] for k in keys], labels, primary["metric"], n, seed,
                                level, is_query, is_gallery)
        out.append(dict(dataset=dataset, method=method, embedding=primary["embedding"], metric=primary["metric"],
                        reference=reference, comparison=EQUAL_BUDGET, mean=boot["mean"], n=len(keys),
                        boot_low=boot["low"], boot_high=boot["high"], boot_resamples=boot["resamples"]))
    return out
