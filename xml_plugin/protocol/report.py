"""Report tables of the fair-comparison protocol (docs/methods.md, the protocol).

Each reproduction gives one value per (embedding, metric); the report shows their mean and the
half-width of the 95% Student-t confidence interval, as csv (exact numbers), markdown (read) and
LaTeX (papers). `compare` puts several experiments side by side in the shape of the XML paper's table.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from ..config import ConfigError
from ..engine.io import atomic_write_text, read_json

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
EMBEDDINGS = ("separate", "concatenated")
CSV_COLUMNS = ("dataset", "method", "embedding", "metric", "mean", "ci95", "n", "reference", "verdict")
MEAN_COLUMNS = CSV_COLUMNS[:7]
REPRODUCTION_COLUMNS = ("dataset", "method", "reproduction", "seed", "fold", "embedding", "metric", "value")
BASELINE = "baseline"
MISSING = "–"  # shown in a cell that no experiment filled
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference detected"

METRIC_LABELS = {"precision_at_1": "P@1", "r_precision": "RP", "mean_average_precision_at_r": "MAP@R"}
EMBEDDING_LABELS = {"separate": "Sep.", "concatenated": "Concat."}


# ----------------------------------------------------------------------------- aggregation

def confidence_interval(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width of the Student-t interval: t_{(1+level)/2, n-1} * std(ddof=1) / sqrt(n); NaN when n < 2."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n < 2:
        return math.nan
    t = stats.t.ppf(0.5 + level / 2, df=n - 1)
    return float(t * values.std(ddof=1) / math.sqrt(n))


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


def paired_differences(records: Iterable[Mapping], reference: str, level: float = 0.95) -> list[dict]:
    """Per (dataset, method != reference, embedding, metric): the mean of ``value - reference value`` over the
    reproductions paired by ``seed``, the half-width of its paired Student-t interval and a verdict: ``better``
    (the interval lies above 0), ``worse`` (below 0) or ``no difference detected``. Seeds that only one of the two
    methods has (a failed reproduction) are left out of the pair."""
    values: dict[tuple, dict] = {}
    for r in records:
        values.setdefault((r["dataset"], r["method"], r["embedding"], r["metric"]), {})[r["seed"]] = float(r["value"])
    out = []
    for (dataset, method, emb, metric), by_seed in values.items():
        ref = values.get((dataset, reference, emb, metric))
        if method == reference or ref is None:
            continue
        seeds = sorted(set(by_seed) & set(ref))
        d = np.array([by_seed[s] - ref[s] for s in seeds], dtype=np.float64)
        if d.size == 0:
            continue
        ci = confidence_interval(d, level)
        mean = float(d.mean())
        verdict = NO_DIFFERENCE if math.isnan(ci) else BETTER if mean - ci > 0 else WORSE if mean + ci < 0 \
            else NO_DIFFERENCE
        out.append(dict(dataset=dataset, method=method, embedding=emb, metric=metric, mean=mean, ci95=ci,
                        n=int(d.size), reference=reference, verdict=verdict))
    order = summarize([dict(r, value=0.0) for r in out])  # the report's order
    rank = {(r["dataset"], r["method"], r["embedding"], r["metric"]): i for i, r in enumerate(order)}
    return sorted(out, key=lambda r: rank[(r["dataset"], r["method"], r["embedding"], r["metric"])])


# ----------------------------------------------------------------------------- csv

def _csv_number(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))


def rows_to_csv(rows: Iterable[Mapping]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["dataset"], r["method"], r["embedding"], r["metric"],
                         _csv_number(r["mean"]), _csv_number(r["ci95"]), int(r["n"]),
                         r.get("reference") or "", r.get("verdict") or ""])
    return out.getvalue()


def reproductions_to_csv(records: Iterable[Mapping]) -> str:
    """One row per method, reproduction, seed, fold, embedding and metric (``fold`` empty for the concatenated
    embedding and for ``separate``, the mean of the fold rows)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(REPRODUCTION_COLUMNS)
    for r in records:
        writer.writerow([r["dataset"], r["method"], r["reproduction"], r["seed"],
                         "" if r.get("fold") is None else r["fold"], r["embedding"], r["metric"], repr(float(r["value"]))])
    return out.getvalue()


def read_report_csv(path) -> list[dict]:
    """The rows of a report.csv written by `write_report` (empty ci95 -> NaN): the means, then the paired
    differences (rows whose ``reference`` is set). Files of the earlier 7-column format read as means only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the experiment must finish its reproductions "
                                f"(which write report.csv) before it can be reported or compared")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) not in (CSV_COLUMNS, MEAN_COLUMNS):
            raise ConfigError(f"{path}: columns {reader.fieldnames} are not {list(CSV_COLUMNS)}: not a report.csv of "
                              f"this benchmark")
        return [dict(dataset=r["dataset"], method=r["method"], embedding=r["embedding"], metric=r["metric"],
                     mean=float(r["mean"]) if r["mean"] else math.nan,
                     ci95=float(r["ci95"]) if r["ci95"] else math.nan, n=int(r["n"]),
                     reference=r.get("reference") or "", verdict=r.get("verdict") or "")
                for r in reader]


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
    """(method, column) of every paired difference whose verdict is ``better``."""
    return frozenset((d["method"], ((d["dataset"],) if with_dataset else ()) + (d["metric"], d["embedding"]))
                     for d in diffs if d.get("verdict") == BETTER)


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


def _difference_table(diffs: Sequence[Mapping]) -> str:
    """Markdown: one row per (method, embedding), a column per metric, cells 'Δ ± ci (verdict)' in points."""
    metrics = _order((d["metric"] for d in diffs), METRICS)
    keys = list(dict.fromkeys((d["method"], d["embedding"]) for d in diffs))
    cell = {(d["method"], d["embedding"], d["metric"]): d for d in diffs}
    ref = diffs[0]["reference"]
    lines = [f"| Method − {ref} | Embedding | " + " | ".join(_metric_label(m) for m in metrics) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for method, emb in keys:
        cells = []
        for m in metrics:
            d = cell.get((method, emb, m))
            if d is None:
                cells.append(MISSING)
                continue
            ci = "" if math.isnan(d["ci95"]) else f" ± {100 * d['ci95']:.2f}"
            text = f"{100 * d['mean']:+.2f}{ci} {d['verdict']}"
            cells.append(f"**{text}**" if d["verdict"] == BETTER else text)
        lines.append(f"| {method} | {_embedding_label(emb)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latex_differences(diffs: Sequence[Mapping]) -> str:
    metrics = _order((d["metric"] for d in diffs), METRICS)
    keys = list(dict.fromkeys((d["method"], d["embedding"]) for d in diffs))
    cell = {(d["method"], d["embedding"], d["metric"]): d for d in diffs}
    lines = [r"\begin{tabular}{ll" + "c" * len(metrics) + "}", r"\toprule",
             rf"Method $-$ {latex_escape(diffs[0]['reference'])} & Emb. & "
             + " & ".join(latex_escape(_metric_label(m)) for m in metrics) + r" \\", r"\midrule"]
    for method, emb in keys:
        cells = []
        for m in metrics:
            d = cell.get((method, emb, m))
            if d is None:
                cells.append("--")
                continue
            ci = "" if math.isnan(d["ci95"]) else rf" $\pm$ {100 * d['ci95']:.2f}"
            text = f"{100 * d['mean']:+.2f}{ci}"
            cells.append(rf"\textbf{{{text}}}" if d["verdict"] == BETTER else text)
        lines.append(f"{latex_escape(method)} & {latex_escape(_embedding_label(emb))} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_report(folder, rows: Sequence[Mapping], title: str, notes: str = "", diffs: Sequence[Mapping] = (),
                 preface: str = "", reproductions: Sequence[Mapping] | None = None) -> str:
    """Write report.csv (means, then paired differences), report.md, report.tex and, when ``reproductions`` is
    given, reproductions.csv into `folder`; return the markdown.

    One table per data set: a row per method, columns metric x embedding, cells 'mean ± ci95' in percent; a cell is
    bold only where the paired difference with the reference method says ``better``. Recall@K gets a second table,
    the paired differences a third. ``preface`` is printed above the tables (e.g. unequal budgets, in bold).
    """
    folder = Path(folder)
    rows, diffs = list(rows), list(diffs)
    md_parts, tex_parts = [f"# {title}\n"], [f"% {title}\n"]
    if preface:
        md_parts.append("\n" + preface.rstrip("\n") + "\n")
    datasets = _order((r["dataset"] for r in rows), ())
    for dataset in datasets:
        sub = [r for r in rows if r["dataset"] == dataset]
        sub_diffs = [d for d in diffs if d["dataset"] == dataset]
        md, tex = _tables(sub, _better_cells(sub_diffs, with_dataset=False))
        md_parts.append(f"\n## {dataset}\n\n" + "\n".join(md))
        tex_parts.append(f"% {dataset}\n" + "".join(tex))
        if sub_diffs:
            md_parts.append(f"\nPaired differences with `{sub_diffs[0]['reference']}` (same seed, splits, batches "
                            f"and views per reproduction), in points: mean ± half-width of the 95% paired-t interval; "
                            f"*better*/*worse* when the interval excludes 0.\n\n" + _difference_table(sub_diffs))
            tex_parts.append(f"% {dataset}: paired differences\n" + _latex_differences(sub_diffs))
    if not datasets:
        md_parts.append("\n(no results)\n")
    md_parts.append("\nCells: mean ± half-width of the 95% confidence interval over the reproductions, in percent; "
                    "bold: better than the reference method by the paired test.\n")
    if notes:
        md_parts.append("\n" + notes.rstrip("\n") + "\n")
    markdown = "".join(md_parts)
    if reproductions is not None:
        atomic_write_text(folder / "reproductions.csv", reproductions_to_csv(reproductions))
    atomic_write_text(folder / "report.csv", rows_to_csv(rows + diffs))
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
        bold |= {(_row_label(d["method"], loss, labels), (d["dataset"], d["metric"], d["embedding"]))
                 for d in rows if d["reference"] and d["verdict"] == BETTER}
        for r in rows:
            if r["reference"]:
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
