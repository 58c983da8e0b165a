"""Figures of the protocol: search history, objective vs one parameter, final metrics, retrieval examples.

Every function draws with matplotlib's Agg backend, saves a PNG, closes its figure and returns the path.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .report import EMBEDDINGS, METRICS, METRIC_LABELS  # noqa: E402

OBJECTIVE_LABEL = "validation MAP@R (mean of folds)"
RIGHT, WRONG = "#2ca02c", "#d62728"


def _colours(methods: Sequence[str]) -> dict:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def _methods(items) -> list[str]:
    return list(dict.fromkeys(t.get("method", "") for t in items))


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return str(path)


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def plot_history(trials: Sequence[Mapping], path, direction: str = "maximize",
                 objective_label: str = OBJECTIVE_LABEL) -> str:
    """Objective per trial (dots) and best-so-far (step line) per method; pruned trials as crosses at their
    last reported value (or on the bottom edge when they have none), failed trials as triangles on the bottom edge."""
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction={direction!r} must be 'maximize' or 'minimize'")
    better = max if direction == "maximize" else min
    methods = _methods(trials)
    colours = _colours(methods)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    edge = ax.get_xaxis_transform()  # x in data, y in axes fraction: marks on the bottom edge
    for method in methods:
        mine = sorted((t for t in trials if t.get("method", "") == method), key=lambda t: t["number"])
        c = colours[method]
        done = [t for t in mine if t["state"] == "COMPLETE" and _finite(t.get("value"))]
        ax.scatter([t["number"] for t in done], [t["value"] for t in done], color=c, s=22, alpha=0.8, zorder=3)
        if done:
            xs, best, run = [], [], None
            for t in done:
                run = t["value"] if run is None else better(run, t["value"])
                xs.append(t["number"])
                best.append(run)
            last = max(t["number"] for t in mine)
            ax.step(xs + [last], best + [best[-1]], where="post", color=c, lw=2, label=f"{method} (best {best[-1]:.4f})")
        pruned = [t for t in mine if t["state"] == "PRUNED"]
        valued = [t for t in pruned if _finite(t.get("value"))]
        ax.scatter([t["number"] for t in valued], [t["value"] for t in valued], color=c, marker="x", s=26, alpha=0.7)
        bare = [t["number"] for t in pruned if not _finite(t.get("value"))]
        ax.scatter(bare, [0.02] * len(bare), color=c, marker="x", s=26, alpha=0.7, transform=edge, clip_on=False)
        failed = [t["number"] for t in mine if t["state"] == "FAIL"]
        ax.scatter(failed, [0.02] * len(failed), color=c, marker="v", s=30, edgecolors="black", linewidths=0.5,
                   transform=edge, clip_on=False)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", marker="o", ls="", label="complete"),
                Line2D([], [], color="grey", marker="x", ls="", label="pruned"),
                Line2D([], [], color="grey", marker="v", ls="", markeredgecolor="black", label="failed (bottom edge)")]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective_label)
    ax.set_title("Optimisation history")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def plot_param(trials: Sequence[Mapping], param: str, path, objective_label: str = OBJECTIVE_LABEL) -> str:
    """The objective of complete trials against one searched parameter, one colour per method; log x axis
    when all values are > 0 and span more than 20x; categorical values on an evenly spaced axis."""
    points = [t for t in trials if t["state"] == "COMPLETE" and _finite(t.get("value")) and param in t.get("params", {})]
    methods = _methods(points)
    colours = _colours(methods)
    values = [t["params"][param] for t in points]
    numeric = bool(values) and all(_is_number(v) for v in values)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if numeric:
        xs = np.asarray(values, dtype=np.float64)
        if xs.min() > 0 and xs.max() / xs.min() > 20:
            ax.set_xscale("log")
    else:
        categories = list(dict.fromkeys(str(v) for v in values))
        xs = np.array([categories.index(str(v)) for v in values], dtype=np.float64)
        xs = xs + np.random.default_rng(0).uniform(-0.15, 0.15, size=xs.size)  # jitter: see overlapping trials
        ax.set_xticks(range(len(categories)), categories)
    for method in methods:
        sel = [i for i, t in enumerate(points) if t.get("method", "") == method]
        ax.scatter(xs[sel], [points[i]["value"] for i in sel], color=colours[method], s=26, alpha=0.8, label=method)
    if not points:
        ax.text(0.5, 0.5, f"no complete trial has {param!r}", ha="center", va="center", transform=ax.transAxes)
    if methods:
        ax.legend(fontsize=8)
    ax.set_xlabel(param)
    ax.set_ylabel(objective_label)
    ax.set_title(f"Objective vs {param}")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_metrics(rows: Sequence[Mapping], path) -> str:
    """Final metrics (percent), mean with 95% CI error bars: one panel per metric (and one row of panels per
    dataset), separate and concatenated side by side in each panel, one colour per method.
    Each panel has its own y range so that differences of a point or two stay visible.
    `rows` as returned by report.summarize."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows)) or [""]
    methods = _methods(rows)
    colours = _colours(methods)
    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    metrics += [m for m in dict.fromkeys(r["metric"] for r in rows) if m not in metrics]
    metrics = metrics or list(METRICS)
    embeddings = [e for e in EMBEDDINGS if any(r["embedding"] == e for r in rows)] or list(EMBEDDINGS)
    index = {(r["dataset"], r["method"], r["embedding"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(len(datasets), len(metrics), squeeze=False,
                             figsize=(max(3.2, 0.9 + 0.35 * len(methods) * len(embeddings)) * len(metrics),
                                      3.6 * len(datasets)))
    step = 0.8 / max(1, len(methods))
    for i, dataset in enumerate(datasets):
        for j, metric in enumerate(metrics):
            ax = axes[i, j]
            for k, method in enumerate(methods):
                xs, ys, errs = [], [], []
                for x, embedding in enumerate(embeddings):
                    r = index.get((dataset, method, embedding, metric))
                    if r is None:
                        continue
                    xs.append(x - 0.4 + step * (k + 0.5))
                    ys.append(100 * r["mean"])
                    errs.append(0.0 if math.isnan(r["ci95"]) else 100 * r["ci95"])
                ax.errorbar(xs, ys, yerr=errs, fmt="o", ms=6, capsize=4, lw=1.5, color=colours[method],
                            label=method if (i, j) == (0, 0) else None)
            for x in range(1, len(embeddings)):
                ax.axvline(x - 0.5, color="grey", lw=0.8, alpha=0.5)
            ax.set_xlim(-0.5, len(embeddings) - 0.5)
            ax.set_xticks(range(len(embeddings)), embeddings)
            name = METRIC_LABELS.get(metric, metric)
            ax.set_title(f"{dataset}: {name}" if dataset else name)
            ax.grid(axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel("%  (mean ± 95% CI)")
    if methods:
        fig.legend(loc="upper center", ncol=len(methods), bbox_to_anchor=(0.5, 1.0), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 / len(datasets)))
    return _save(fig, path)


def plot_retrieval(images: Sequence, query_labels: Sequence, neighbor_images: Sequence[Sequence],
                   neighbor_labels: Sequence[Sequence], path, k: int = 5) -> str:
    """A grid: each row is a query image then its top-k neighbours, framed green when the neighbour has the
    query's label and red otherwise. `images` and `neighbor_images[i]` are PIL images."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if not (len(images) == len(query_labels) == len(neighbor_images) == len(neighbor_labels)):
        raise ValueError("images, query_labels, neighbor_images and neighbor_labels must have one entry per query")
    rows = max(1, len(images))
    fig, axes = plt.subplots(rows, k + 1, squeeze=False, figsize=(1.7 * (k + 1), 1.9 * rows))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for i, (query, label) in enumerate(zip(images, query_labels)):
        _show(axes[i, 0], query, f"query: {label}", "black", 1.0)
        for j, (img, nlabel) in enumerate(list(zip(neighbor_images[i], neighbor_labels[i]))[:k]):
            right = nlabel == label
            _show(axes[i, j + 1], img, f"{j + 1}: {nlabel}", RIGHT if right else WRONG, 4.0)
    for j in range(1, k + 1):
        axes[0, j].set_title(f"top-{j}" if len(images) else "", fontsize=9)
    axes[0, 0].set_title("query", fontsize=9, fontweight="bold")
    fig.tight_layout()
    return _save(fig, path)


def _show(ax, image, caption: str, colour: str, width: float) -> None:
    ax.imshow(np.asarray(image.convert("RGB")))
    ax.set_xlabel(caption, fontsize=8, color=colour)
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(colour)
        spine.set_linewidth(width)
