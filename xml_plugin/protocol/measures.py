"""The report's measures beyond retrieval, on plain data: Roth et al.'s embedding-space measures of every
reproduction's test embedding (``engine.diagnostics.embedding_space_metrics``: spectral decay rho, intra/inter-class
distances and their ratio, NMI), as mean rows for report.csv and a markdown table; and the last epoch's XML health
diagnostics of each method's reproductions (``health`` in each run's result.json history), as a markdown table."""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence

import numpy as np

from ..engine.diagnostics import EMBEDDING_KEYS

SPACE_EMBEDDING = "concatenated"  # the measures are of the concatenated test embedding (one per reproduction)
SPACE_LABELS = {"spectral_decay": "ρ (spectral decay)", "intra_class_distance": "intra-class",
                "inter_class_distance": "inter-class", "intra_inter_ratio": "intra / inter", "nmi": "NMI"}


def space_records(measures: Mapping[str, Sequence[Mapping]], dataset: str) -> List[dict]:
    """``{method: [{"seed", "search"?, "measures": {key: value}}]}`` -> records ``dataset, method, embedding
    (concatenated), metric (the measure), value, seed`` (for reproductions.csv and ``report.summarize``)."""
    out = []
    for method, reps in measures.items():
        for r in reps:
            for key in EMBEDDING_KEYS:
                if key in r["measures"]:
                    out.append({"dataset": dataset, "method": method, "embedding": SPACE_EMBEDDING, "metric": key,
                                "value": float(r["measures"][key]), "seed": r["seed"],
                                "reproduction": r.get("reproduction"),
                                **({"search": r["search"]} if r.get("search") is not None else {})})
    return out


def _number(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def space_table(rows: Sequence[Mapping]) -> str:
    """Markdown: one row per method, one column per embedding-space measure, ``mean ± 95% t half-width`` over the
    reproductions (``rows``: ``report.summarize`` of :func:`space_records`); '' without rows."""
    rows = [r for r in rows if r["metric"] in EMBEDDING_KEYS]
    if not rows:
        return ""
    keys = [k for k in EMBEDDING_KEYS if any(r["metric"] == k for r in rows)]
    cell = {(r["method"], r["metric"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| Method | " + " | ".join(SPACE_LABELS.get(k, k) for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for m in methods:
        cells = []
        for k in keys:
            r = cell.get((m, k))
            cells.append("–" if r is None else _number(r["mean"]) + ("" if math.isnan(r["ci95"]) else
                                                                    f" ± {_number(r['ci95'])}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return ("Embedding space of the test classes (concatenated embedding, L2-normalised; Roth et al.'s measures, "
            "mean ± 95% interval over the reproductions): ρ is 0 for a flat singular-value spectrum and grows as the "
            "variance concentrates in fewer directions; distances are Euclidean; NMI of a k-means clustering into "
            "the test classes.\n\n" + "\n".join(lines) + "\n")


def health_summary(health: Mapping[str, Sequence[Mapping[str, float]]]) -> Dict[str, Dict[str, tuple]]:
    """``{method: [last-epoch health dict of one fold of one reproduction]}`` -> ``{method: {key: (mean, sd, n)}}``
    over the finite values; methods without any left out."""
    out: Dict[str, Dict[str, tuple]] = {}
    for method, entries in health.items():
        keys = list(dict.fromkeys(k for e in entries for k in e))
        summary = {}
        for k in keys:
            v = np.array([e[k] for e in entries if k in e and math.isfinite(e[k])], dtype=np.float64)
            if v.size:
                summary[k] = (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size))
        if summary:
            out[method] = summary
    return out


def health_table(summary: Mapping[str, Mapping[str, tuple]]) -> str:
    """Markdown: one row per health key, one column per method, ``mean (sd)`` over the reproductions' folds;
    '' when no method has diagnostics."""
    if not summary:
        return ""
    methods = list(summary)
    keys = list(dict.fromkeys(k for m in methods for k in summary[m]))
    n = {m: max(c[2] for c in summary[m].values()) for m in methods}
    lines = ["| Diagnostic | " + " | ".join(f"{m} ({n[m]} folds)" for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for k in keys:
        cells = []
        for m in methods:
            c = summary[m].get(k)
            sd = "" if c is None or math.isnan(c[1]) else f" ({_number(c[1], 4)})"
            cells.append("–" if c is None else _number(c[0], 4) + sd)
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return ("XML health at the last epoch of each reproduction's folds (docs/xml.md, \"Diagnostics\"; `val_*` on the "
            "validation classes, the others at the last training batch), mean (sd) over the folds:\n\n"
            + "\n".join(lines) + "\n")


__all__ = ["space_records", "space_table", "health_summary", "health_table"]
