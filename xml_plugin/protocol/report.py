"""Report tables of the fair-comparison protocol (docs/methods.md, the protocol; docs/protocol.md).

Each reproduction gives one value per (embedding, metric); the report shows their mean and the
half-width of the 95% Student-t confidence interval, the paired verdicts (statistics in `verdicts`),
as csv (exact numbers), markdown (read) and LaTeX (papers). `compare` puts several experiments side by side
in the shape of the XML paper's table.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..config import ConfigError
from ..engine.io import atomic_write_text, read_json
from . import verdicts as V
from .verdicts import BETTER, EQUAL_BUDGET, EQUAL_PARAMS, NO_DIFFERENCE, OVER_SEARCHES, PRIMARY, WORSE  # noqa: F401

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
EMBEDDINGS = ("separate", "concatenated")
VERDICT_COLUMNS = ("dataset", "method", "embedding", "metric", "mean", "ci95", "n", "reference", "verdict")
MEAN_COLUMNS = VERDICT_COLUMNS[:7]
CSV_COLUMNS = VERDICT_COLUMNS + ("comparison", "search", "endpoint", "p_value", "p_adjusted", "boot_low", "boot_high",
                                 "boot_resamples")
REPRODUCTION_COLUMNS = ("dataset", "method", "reproduction", "seed", "fold", "embedding", "metric", "value", "search")
BASELINE = "baseline"
MISSING = "–"  # shown in a cell that no experiment filled
HOLM_MARK = "†"  # after a verdict decided by a Holm-adjusted p-value

METRIC_LABELS = {"precision_at_1": "P@1", "r_precision": "RP", "mean_average_precision_at_r": "MAP@R"}
EMBEDDING_LABELS = {"separate": "Sep.", "concatenated": "Concat."}


# ----------------------------------------------------------------------------- aggregation

confidence_interval = V.t_half_width  # half-width of the Student-t interval (verdicts.t_half_width)


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """`preferred` first (those present), then the others in order of first appearance."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def summarize(records: Iterable[Mapping]) -> list[dict]:
    """Mean, 95% CI half-width and count per (dataset, method, embedding, metric).

    Sorted by dataset, then methods in order of first appearance, embeddings as EMBEDDINGS,
    metrics as METRICS (metrics not in METRICS come after, in order of appearance).
    """
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r["embedding"] not in EMBEDDINGS:
            raise ValueError(f"embedding={r['embedding']!r} is not one of {EMBEDDINGS}")
        key = (r["dataset"], r["method"], r["embedding"], r["metric"])
        groups.setdefault(key, []).append(float(r["value"]))
    methods = _order((k[1] for k in groups), ())
    metrics = _order((k[3] for k in groups), METRICS)
    keys = sorted(groups, key=lambda k: (k[0], methods.index(k[1]), EMBEDDINGS.index(k[2]), metrics.index(k[3])))
    rows = []
    for key in keys:
        values = groups[key]
        rows.append(dict(zip(CSV_COLUMNS[:4], key), mean=float(np.mean(values)),
                         ci95=confidence_interval(values), n=len(values)))
    return rows


def _report_rank(rows: Sequence[Mapping]) -> dict:
    """(dataset, method, embedding, metric) -> position in the report's order (that of `summarize`)."""
    order = summarize([dict(r, value=0.0) for r in rows])
    return {(r["dataset"], r["method"], r["embedding"], r["metric"]): i for i, r in enumerate(order)}


def paired_differences(records: Iterable[Mapping], reference: str, level: float = 0.95, primary: Mapping = PRIMARY,
                       comparison: str = EQUAL_BUDGET) -> list[dict]:
    """`verdicts.paired_differences` (paired t per cell, Holm over each method's cells) in the report's order."""
    out = V.paired_differences(records, reference, level, primary, comparison)
    rank = _report_rank(out)
    return sorted(out, key=lambda r: (r.get("search") is not None, r.get("search") or 0,
                                      rank[(r["dataset"], r["method"], r["embedding"], r["metric"])]))


# ----------------------------------------------------------------------------- csv

def _csv_number(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))


def rows_to_csv(rows: Iterable[Mapping]) -> str:
    """CSV_COLUMNS: the means (``reference`` empty), then paired rows (``comparison``: ``equal_budget``,
    ``equal_params`` or ``over_searches``; ``verdict``: the seed interval's, before Holm)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        paired = bool(r.get("reference"))
        writer.writerow([r["dataset"], r["method"], r["embedding"], r["metric"],
                         _csv_number(r["mean"]), _csv_number(r.get("ci95")), int(r["n"]),
                         r.get("reference") or "", r.get("verdict") or "",
                         (r.get("comparison") or EQUAL_BUDGET) if paired else "",
                         "" if r.get("search") is None else r["search"], r.get("endpoint") or "",
                         _csv_number(r.get("p_value")), _csv_number(r.get("p_adjusted")),
                         _csv_number(r.get("boot_low")), _csv_number(r.get("boot_high")),
                         "" if r.get("boot_resamples") is None else int(r["boot_resamples"])])
    return out.getvalue()


def reproductions_to_csv(records: Iterable[Mapping]) -> str:
    """One row per method, reproduction, seed, fold, embedding and metric (``fold`` empty for the concatenated
    embedding and for ``separate``, the mean of the fold rows; ``search`` empty with one search per method)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(REPRODUCTION_COLUMNS)
    for r in records:
        writer.writerow([r["dataset"], r["method"], r["reproduction"], r["seed"],
                         "" if r.get("fold") is None else r["fold"], r["embedding"], r["metric"],
                         repr(float(r["value"])), "" if r.get("search") is None else r["search"]])
    return out.getvalue()


def _float(text: str) -> float:
    return float(text) if text else math.nan


def read_report_csv(path) -> list[dict]:
    """The rows of a report.csv written by `write_report` (empty numbers -> NaN): the means, then the paired rows
    (``reference`` set). Files of the earlier 9-column (no comparison, p-values, bootstrap) and 7-column (means only)
    formats read with those columns unset (``endpoint`` None: their verdicts are the intervals')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the experiment must finish its reproductions "
                                f"(which write report.csv) before it can be reported or compared")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return _report_rows(csv.DictReader(f), path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}): not a report.csv written by "
                          f"this benchmark; rerun the experiment to write it again") from None


def _report_rows(reader: csv.DictReader, path: Path) -> list[dict]:
    """The rows of an open report.csv (see `read_report_csv`)."""
    if tuple(reader.fieldnames or ()) not in (CSV_COLUMNS, VERDICT_COLUMNS, MEAN_COLUMNS):
        raise ConfigError(f"{path}: columns {reader.fieldnames} are not {list(CSV_COLUMNS)}: not a report.csv of "
                          f"this benchmark")
    out = []
    for r in reader:
        reference = r.get("reference") or ""
        search = r.get("search") or ""
        out.append(dict(dataset=r["dataset"], method=r["method"], embedding=r["embedding"], metric=r["metric"],
                        mean=_float(r["mean"]), ci95=_float(r["ci95"]), n=int(r["n"]), reference=reference,
                        verdict=r.get("verdict") or "",
                        comparison=r.get("comparison") or (EQUAL_BUDGET if reference else ""),
                        search=int(search) if search.lstrip("-").isdigit() else (search or None),
                        endpoint=r.get("endpoint") or None,
                        p_value=_float(r.get("p_value")), p_adjusted=_float(r.get("p_adjusted")),
                        boot_low=_float(r.get("boot_low")), boot_high=_float(r.get("boot_high")),
                        boot_resamples=int(r["boot_resamples"]) if r.get("boot_resamples") else None))
    return out


# ----------------------------------------------------------------------------- tables

def _cell_text(mean: float, ci95: float, pm: str) -> str:
    """'22.31 ± 1.05' in percent; the mean alone when the interval is undefined (one reproduction)."""
    if math.isnan(ci95):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f}{pm}{100 * ci95:.2f}"


def _markdown_table(table: dict, row_labels: list[str], columns: list[tuple], col_header,
                    bold: frozenset = frozenset()) -> str:
    """Rows x columns of 'mean ± ci95' cells; the (row, column) pairs in ``bold`` are bold."""
    lines = ["| Method | " + " | ".join(col_header(c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for r in row_labels:
        cells = []
        for col in columns:
            if (r, col) not in table:
                cells.append(MISSING)
                continue
            text = _cell_text(table[(r, col)]["mean"], table[(r, col)]["ci95"], " ± ")
            cells.append(f"**{text}**" if (r, col) in bold else text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(repl.get(ch, ch) for ch in text)


def _group_header(columns: list[tuple], level: int, label) -> tuple[str, str]:
    """One booktabs header line grouping consecutive columns that share `columns[i][:level+1]`,
    and its \\cmidrule line."""
    spans, start = [], 0
    for i in range(1, len(columns) + 1):
        if i == len(columns) or columns[i][:level + 1] != columns[start][:level + 1]:
            spans.append((start, i))
            start = i
    cells = [rf"\multicolumn{{{b - a}}}{{c}}{{{latex_escape(label(columns[a][level]))}}}" for a, b in spans]
    rules = " ".join(rf"\cmidrule(lr){{{a + 2}-{b + 1}}}" for a, b in spans)
    return " & " + " & ".join(cells) + r" \\", rules


def _latex_table(table: dict, row_labels: list[str], columns: list[tuple], labels: Sequence,
                 bold: frozenset = frozenset()) -> str:
    """A booktabs tabular; `columns` are tuples, one header line per tuple level (`labels[level]` names it)."""
    lines = [r"\begin{tabular}{l" + "c" * len(columns) + "}", r"\toprule"]
    levels = len(columns[0]) if columns else 0
    for level in range(levels - 1):
        header, rules = _group_header(columns, level, labels[level])
        lines += [header, rules]
    lines.append("Method & " + " & ".join(latex_escape(labels[-1](c[-1])) for c in columns) + r" \\")
    lines.append(r"\midrule")
    for r in row_labels:
        cells = []
        for col in columns:
            if (r, col) not in table:
                cells.append("--")
                continue
            text = _cell_text(table[(r, col)]["mean"], table[(r, col)]["ci95"], r" $\pm$ ")
            cells.append(rf"\textbf{{{text}}}" if (r, col) in bold else text)
        lines.append(latex_escape(r) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _metric_label(m: str) -> str:
    if m.startswith("recall_at_"):
        return f"R@{m.removeprefix('recall_at_')}"
    return METRIC_LABELS.get(m, m)


def _embedding_label(e: str) -> str:
    return EMBEDDING_LABELS.get(e, e)


def _columns(rows: Sequence[Mapping], with_dataset: bool) -> list[tuple]:
    """Columns present in `rows`: (dataset,) metric, embedding, in the report's order."""
    datasets = _order((r["dataset"] for r in rows), ())
    metrics = _order((r["metric"] for r in rows), METRICS)
    embeddings = _order((r["embedding"] for r in rows), EMBEDDINGS)
    present = {(r["dataset"], r["metric"], r["embedding"]) for r in rows}
    cols = [(d, m, e) for d in datasets for m in metrics for e in embeddings if (d, m, e) in present]
    return cols if with_dataset else [c[1:] for c in cols]


def _better_cells(diffs: Iterable[Mapping], with_dataset: bool) -> frozenset:
    """(method, column) of every cell that the report calls ``better`` (verdicts.shown_verdict): by the verdict over
    searches where the cell has one, else by its equal-budget rows (every search's). Attribution rows
    (``equal_params``) do not make a cell bold."""
    by_cell: dict = {}
    for d in diffs:
        comparison = d.get("comparison") or EQUAL_BUDGET
        if comparison == EQUAL_PARAMS:
            continue
        cell = (d["method"], ((d["dataset"],) if with_dataset else ()) + (d["metric"], d["embedding"]))
        by_cell.setdefault(cell, {}).setdefault(comparison, []).append(V.shown_verdict(d))
    out = set()
    for cell, by_comparison in by_cell.items():
        words = by_comparison.get(OVER_SEARCHES) or by_comparison.get(EQUAL_BUDGET) or []
        if words and all(w == BETTER for w in words):
            out.add(cell)
    return frozenset(out)


def _tables(rows: Sequence[Mapping], bold: frozenset) -> tuple[list[str], list[str]]:
    """Markdown and LaTeX of one data set's rows: the Reality Check's metrics, then Recall@K when present."""
    methods = _order((r["method"] for r in rows), ())
    table = {(r["method"], (r["metric"], r["embedding"])): r for r in rows}
    md, tex = [], []
    for part in (lambda m: not m.startswith("recall_at_"), lambda m: m.startswith("recall_at_")):
        columns = [c for c in _columns(rows, with_dataset=False) if part(c[0])]
        if columns:
            md.append(_markdown_table(table, methods, columns, lambda c: f"{_metric_label(c[0])} {_embedding_label(c[1])}",
                                      bold))
            tex.append(_latex_table(table, methods, columns, (_metric_label, _embedding_label), bold))
    return md, tex


def _points(x: float, sign: bool = True) -> str:
    return MISSING if x is None or math.isnan(x) else f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def _verdict_text(d: Mapping) -> str:
    """The shown verdict, marked when a Holm-adjusted p-value decided it."""
    return V.shown_verdict(d) + (HOLM_MARK if d.get("endpoint") == V.SECONDARY else "")


def _method_label(d: Mapping) -> str:
    return d["method"] if d.get("search") is None else f"{d['method']} (search {d['search']})"


def _difference_table(diffs: Sequence[Mapping], header: str) -> str:
    """Markdown: one row per (method, search, embedding), a column per metric, cells 'Δ ± ci verdict' in points."""
    metrics = _order((d["metric"] for d in diffs), METRICS)
    keys = list(dict.fromkeys((_method_label(d), d["embedding"]) for d in diffs))
    cell = {(_method_label(d), d["embedding"], d["metric"]): d for d in diffs}
    lines = [f"| {header} | Embedding | " + " | ".join(_metric_label(m) for m in metrics) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for label, emb in keys:
        cells = []
        for m in metrics:
            d = cell.get((label, emb, m))
            if d is None:
                cells.append(MISSING)
                continue
            ci = "" if math.isnan(d["ci95"]) else f" ± {100 * d['ci95']:.2f}"
            text = f"{100 * d['mean']:+.2f}{ci} {_verdict_text(d)}"
            cells.append(f"**{text}**" if V.shown_verdict(d) == BETTER else text)
        lines.append(f"| {label} | {_embedding_label(emb)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latex_differences(diffs: Sequence[Mapping], header: str) -> str:
    metrics = _order((d["metric"] for d in diffs), METRICS)
    keys = list(dict.fromkeys((_method_label(d), d["embedding"]) for d in diffs))
    cell = {(_method_label(d), d["embedding"], d["metric"]): d for d in diffs}
    lines = [r"\begin{tabular}{ll" + "c" * len(metrics) + "}", r"\toprule",
             rf"{latex_escape(header).replace('−', '$-$')} & Emb. & "
             + " & ".join(latex_escape(_metric_label(m)) for m in metrics) + r" \\", r"\midrule"]
    for label, emb in keys:
        cells = []
        for m in metrics:
            d = cell.get((label, emb, m))
            if d is None:
                cells.append("--")
                continue
            ci = "" if math.isnan(d["ci95"]) else rf" $\pm$ {100 * d['ci95']:.2f}"
            text = f"{100 * d['mean']:+.2f}{ci}"
            cells.append(rf"\textbf{{{text}}}" if V.shown_verdict(d) == BETTER else text)
        lines.append(f"{latex_escape(label)} & {latex_escape(_embedding_label(emb))} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _bootstrap_key(d: Mapping) -> tuple:
    return d["dataset"], d["method"], d["embedding"], d["metric"], d["reference"], d.get("search")


def _with_bootstrap(diffs: Sequence[Mapping], bootstrap: Sequence[Mapping]) -> list[dict]:
    """``diffs`` with the bootstrap rows' ``boot_low``, ``boot_high``, ``boot_resamples`` put into the equal-budget
    row of the same cell (and search); a bootstrap row without such a row is added as its own paired row."""
    out = [dict(d) for d in diffs]
    at = {_bootstrap_key(d): i for i, d in enumerate(out) if (d.get("comparison") or EQUAL_BUDGET) == EQUAL_BUDGET}
    for b in bootstrap:
        boot = {k: b[k] for k in ("boot_low", "boot_high", "boot_resamples")}
        if _bootstrap_key(b) in at:
            out[at[_bootstrap_key(b)]].update(boot)
        else:
            out.append(dict(b, ci95=math.nan, verdict="", comparison=EQUAL_BUDGET))
    return out


def _interval(low: float, high: float) -> str:
    return f"[{_points(low)}, {_points(high)}]"


def _headline(diffs: Sequence[Mapping], over: Sequence[Mapping], primary: Mapping) -> str:
    """Markdown: the primary endpoint's verdict per data set and method: the seed interval of each search, its
    p-value, the test-class bootstrap interval, the verdict over searches (when there are several) and the verdict."""
    is_primary = lambda d: V.is_primary(d, primary)
    rows = [d for d in diffs if is_primary(d) and (d.get("comparison") or EQUAL_BUDGET) == EQUAL_BUDGET]
    over = {(d["dataset"], d["method"], d["reference"]): d for d in over if is_primary(d)}
    groups: dict = {}
    for d in rows:
        groups.setdefault((d["dataset"], d["method"], d["reference"]), []).append(d)
    lines = ["| Data set | Comparison | Δ ± 95% seed interval | p | 95% test-class bootstrap | over searches | verdict |",
             "|---|---|---:|---:|---:|---|---|"]
    for (dataset, method, reference), ds in groups.items():
        seed = "; ".join(f"{_points(d['mean'])}" + ("" if math.isnan(d["ci95"]) else f" ± {100 * d['ci95']:.2f}")
                         for d in ds)
        p = "; ".join(MISSING if math.isnan(d.get("p_value", math.nan)) else f"{d['p_value']:.2g}" for d in ds)
        boot = "; ".join(_interval(d["boot_low"], d["boot_high"]) + f" ({d['boot_resamples']} resamples)"
                         if d.get("boot_resamples") else MISSING for d in ds)
        o = over.get((dataset, method, reference))
        if o is not None:
            across = f"{_points(o['mean'])} ± {100 * o['ci95']:.2f} ({o['n']} searches)"
            verdict = V.shown_verdict(o)
        else:
            across = "not covered (one search)" if len(ds) == 1 else "not computed"
            verdict = " / ".join(V.shown_verdict(d) for d in ds)
        lines.append(f"| {dataset} | {method} − {reference} | {seed} | {p} | {boot} | {across} | {verdict} |")
    return "\n".join(lines) + "\n"


def _holm_for(rows: Sequence[Mapping], comparison: str, primary: Mapping) -> list[dict]:
    """``rows`` labelled ``comparison`` and, when every row has a ``p_value``, with Holm and the endpoints of
    ``primary`` (verdicts.with_holm); rows without p-values keep their interval verdicts."""
    rows = [dict(r, comparison=comparison if comparison != EQUAL_BUDGET else r.get("comparison") or EQUAL_BUDGET)
            for r in rows]
    return V.with_holm(rows, primary) if rows and all("p_value" in r for r in rows) else rows


def write_report(folder, rows: Sequence[Mapping], title: str, notes: str = "", diffs: Sequence[Mapping] = (),
                 preface: str = "", reproductions: Sequence[Mapping] | None = None, primary: Mapping = PRIMARY,
                 attribution: Sequence[Mapping] = (), bootstrap: Sequence[Mapping] = (),
                 over_searches: Sequence[Mapping] = (), measures: Sequence[Mapping] = ()) -> str:
    """Write report.csv (means, then paired rows), report.md, report.tex and, when ``reproductions`` is given,
    reproductions.csv into `folder`; return the markdown.

    ``diffs``: `paired_differences` rows (the methods' own searches, ``equal_budget``; with a ``search`` key when
    there are several); ``attribution``: the same for "M − R at M's parameters" (``equal_params``);
    ``bootstrap``: `verdicts.bootstrap_rows`; ``over_searches``: `verdicts.over_searches_rows`; ``primary``: the
    primary endpoint (``report.primary``); ``measures``: mean rows of other measures (the embedding-space
    measures, `protocol.measures`), written to report.csv after the means and left out of the tables.

    At the top, the primary endpoint's verdict per data set and method. Then one table per data set: a row per
    method, columns metric x embedding, cells 'mean ± ci95' in percent, bold only where the report's verdict
    (verdicts.shown_verdict) says ``better``; Recall@K gets a second table, the paired differences a third, the
    attribution and the verdicts over searches their own. ``preface`` is printed above the tables (e.g. unequal
    budgets, in bold).
    """
    folder = Path(folder)
    primary = V.parse_primary(primary)
    rows = list(rows)
    diffs = _with_bootstrap(_holm_for(diffs, EQUAL_BUDGET, primary), bootstrap)
    attribution = _holm_for(attribution, EQUAL_PARAMS, primary)
    over_searches = _holm_for(over_searches, OVER_SEARCHES, primary)
    paired = diffs + attribution + over_searches
    md_parts, tex_parts = [f"# {title}\n"], [f"% {title}\n"]
    if preface:
        md_parts.append("\n" + preface.rstrip("\n") + "\n")
    primary_label = f"{_metric_label(primary['metric'])} {_embedding_label(primary['embedding'])}"
    if any(V.is_primary(d, primary) for d in diffs):
        searches = {d.get("search") for d in diffs}
        md_parts.append(f"\n## Primary endpoint: {primary_label}\n\n"
                        f"The headline verdict (`report.primary`: `{primary['metric']}` of the `{primary['embedding']}` "
                        f"embedding), in points. Seed interval: the 95% paired-t interval over the reproductions; "
                        f"test-class bootstrap: the 95% percentile interval of the difference with the test classes "
                        f"resampled; over searches: the mean of the searches' mean differences and its 95% t-interval "
                        f"over the searches (docs/protocol.md, \"What each interval covers\").\n\n"
                        + _headline(diffs, over_searches, primary))
        if len(searches) == 1 and not over_searches:
            md_parts.append("\nOne search per method: the verdict covers the reproductions' seeds, not the search's "
                            "own randomness (`general.searches: 1`).\n")
    datasets = _order((r["dataset"] for r in rows), ())
    for dataset in datasets:
        sub = [r for r in rows if r["dataset"] == dataset]
        sub_paired = [d for d in paired if d["dataset"] == dataset]
        md, tex = _tables(sub, _better_cells(sub_paired, with_dataset=False))
        md_parts.append(f"\n## {dataset}\n\n" + "\n".join(md))
        tex_parts.append(f"% {dataset}\n" + "".join(tex))
        sub_diffs = [d for d in diffs if d["dataset"] == dataset]
        holm = any(d.get("endpoint") == V.SECONDARY for d in sub_paired)
        if sub_diffs:
            ref = sub_diffs[0]["reference"]
            md_parts.append(f"\nPaired differences with `{ref}` (same seed, splits, batches "
                            f"and views per reproduction), in points: mean ± half-width of the 95% paired-t interval; "
                            f"*better*/*worse* when the interval excludes 0.\n\n"
                            + _difference_table(sub_diffs, f"Method − {ref}"))
            tex_parts.append(f"% {dataset}: paired differences\n" + _latex_differences(sub_diffs, f"Method − {ref}"))
        for rows_of, header_of, intro_of, tex_title in (
                (attribution, "Method − {ref} at the method's parameters",
                 lambda sub, ref: f"Attribution: each method against `{ref}` reproduced at the method's best values of "
                                  f"the keys they share (same seeds and views), in points: the component's own effect at "
                                  f"equal loss parameters, beside the effect under an equal budget above.",
                 "attribution (equal parameters)"),
                (over_searches, "Method − {ref} over searches",
                 lambda sub, ref: f"Verdicts over searches: the mean of the {sub[0]['n']} searches' mean paired "
                                  f"differences and its 95% t-interval over the searches (it contains the search's own "
                                  f"noise), in points.",
                 "over searches")):
            sub = [d for d in rows_of if d["dataset"] == dataset]
            if sub:
                ref = sub[0]["reference"]
                header = header_of.format(ref=ref)
                md_parts.append(f"\n{intro_of(sub, ref)}\n\n" + _difference_table(sub, header))
                tex_parts.append(f"% {dataset}: {tex_title}\n" + _latex_differences(sub, header))
        if holm:
            md_parts.append(f"\nThe primary endpoint ({primary_label}) is judged by its own interval; verdicts of the "
                            f"secondary cells use Holm-adjusted p-values ({HOLM_MARK}: *better*/*worse* when the "
                            f"p-value adjusted over the method's cells is below 0.05), so a secondary cell whose "
                            f"interval excludes 0 may read *no difference detected*.\n")
    if not datasets:
        md_parts.append("\n(no results)\n")
    md_parts.append("\nCells: mean ± half-width of the 95% confidence interval over the reproductions, in percent; "
                    "bold: better than the reference method by the report's paired verdict (for the secondary cells, "
                    "Holm-adjusted).\n")
    if notes:
        md_parts.append("\n" + notes.rstrip("\n") + "\n")
    markdown = "".join(md_parts)
    if reproductions is not None:
        atomic_write_text(folder / "reproductions.csv", reproductions_to_csv(reproductions))
    atomic_write_text(folder / "report.csv", rows_to_csv(rows + list(measures) + paired))
    atomic_write_text(folder / "report.md", markdown)
    atomic_write_text(folder / "report.tex", "".join(tex_parts))
    return markdown


# ----------------------------------------------------------------------------- comparison

def _row_label(method: str, loss: str | None, labels: Mapping[str, str]) -> str:
    name = labels.get(method, method)
    if loss is None:
        return name
    return loss if method == BASELINE else f"{loss} + {name}"


def compare(folders: Sequence, names: Sequence[str] | None = None,
            labels: Mapping[str, str] | None = None) -> tuple[str, str]:
    """One table from several experiments' report.csv: rows are methods, columns dataset x metric x embedding.

    A row is labelled "<loss>" for the baseline and "<loss> + <method>" otherwise, where <loss> is
    `names[i]` if given, else the "loss" of the folder's experiment.json if present (without either,
    the method alone). `labels` maps a csv method name to its display name. Returns (markdown, latex).
    """
    from ..engine.diagnostics import EMBEDDING_KEYS  # the embedding-space measures' rows: not compared
    folders = [Path(f) for f in folders]
    labels = dict(labels or {})
    if names is not None and len(names) != len(folders):
        raise ConfigError(f"--compare_names has {len(names)} names for {len(folders)} folders: give one per folder")
    table: dict[tuple, dict] = {}
    origin: dict[tuple, Path] = {}
    row_labels: list[str] = []
    all_rows: list[dict] = []
    bold = set()
    for i, folder in enumerate(folders):
        rows = read_report_csv(folder / "report.csv")
        loss = names[i] if names is not None else None
        if loss is None and (folder / "experiment.json").is_file():
            loss = read_json(folder / "experiment.json").get("loss")
        bold |= {(_row_label(method, loss, labels), column)
                 for method, column in _better_cells([r for r in rows if r["reference"]], with_dataset=True)}
        for r in rows:
            if r["reference"] or r["metric"] in EMBEDDING_KEYS:
                continue
            label = _row_label(r["method"], loss, labels)
            key = (label, (r["dataset"], r["metric"], r["embedding"]))
            if key in table:
                raise ConfigError(f"row {label!r} has {key[1]} in both {origin[key]} and {folder}: "
                                 f"give each experiment a row name (--compare_names, or names= in Python)")
            table[key], origin[key] = r, folder
            if label not in row_labels:
                row_labels.append(label)
            all_rows.append(r)
    if not all_rows:
        raise ConfigError(f"the report.csv files of {[str(f) for f in folders]} hold no results")
    columns = _columns(all_rows, with_dataset=True)
    bold = frozenset(bold)
    markdown = _markdown_table(table, row_labels, columns,
                               lambda c: f"{c[0]} {_metric_label(c[1])} {_embedding_label(c[2])}", bold)
    latex = _latex_table(table, row_labels, columns, (str, _metric_label, _embedding_label), bold)
    return markdown, latex
