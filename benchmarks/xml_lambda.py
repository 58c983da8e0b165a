"""XML's validation curve over lambda, per variant, on validation classes only (the test classes are never touched).

    python benchmarks/xml_lambda.py --dataset cards [--seeds 3] [--workers auto] [--out docs/results/xml_lambda]
    python benchmarks/xml_lambda.py --dataset kanji

Every variant of XML (``assignment_rule`` inner_product | nearest x ``cross_fit`` ridge | recursive x the pooling's
``prior`` 0 | 1) is trained on the 4 folds of the data set (frozen trunk, the main job's config) for each ``lam`` in
{0, 0.03, 0.1, 0.3, 1, 3} and each seed, with the multi-similarity parameters fixed at the baseline's best of the fair
main job (``BASELINE_BEST``, read off docs/results.md: the loss parameters are held where the baseline is best, so the
curve shows what the cross-batch term adds to them). At ``lam = 0`` XML's loss is the base loss, whatever the
variant: it is trained once per seed (the ``lam = 0`` level). Per (variant, lam): the validation MAP@R averaged over
the folds, its mean and 95% t-interval over the seeds, and the last epoch's health diagnostics averaged over folds and
seeds (GAP reconstruction error on training batches and on the validation classes, unused and effective prototypes,
cross-batch reconstruction error, the two loss terms and their gradient norms).

Writes ``OUT_<dataset>.csv`` (every fold), ``OUT_<dataset>_summary.csv`` and a plot ``OUT_<dataset>.png`` (MAP@R
against lam, one line per variant, the lam = 0 level dashed). Resumable: the folds are run folders of an experiment
folder (``--folder``); a rerun reads finished folds back.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xml_plugin import config as C  # noqa: E402
from xml_plugin.protocol.experiment import Experiment, method_config  # noqa: E402
from xml_plugin.protocol.workers import FoldPool, resolve_workers  # noqa: E402

LAMS = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)
RULES, FITS, PRIORS = ("inner_product", "nearest"), ("ridge", "recursive"), (0.0, 1.0)
BASELINE_BEST = {  # the baseline's best multi-similarity parameters in the fair main jobs (frozen trunk)
    "cards": {"alpha": 2.328, "beta": 6.512, "base": 0.9053},
    "kanji": {"alpha": 1.072, "beta": 26.94, "base": 0.6028},
}
HEALTH = ("gap_error", "val_gap_error", "unused_prototypes", "val_unused_prototypes", "effective_prototypes",
          "val_effective_prototypes", "cross_error", "base_loss", "cross_term", "base_grad_norm", "cross_grad_norm")


def variant_name(rule: str, fit: str, prior: float) -> str:
    return f"{rule}/{fit}/prior{prior:g}"


def unit_config(base_cfg, dataset: str, rule: str, fit: str, prior: float, lam: float):
    loss = BASELINE_BEST[dataset]
    over = [("loss.options.alpha", loss["alpha"]), ("loss.options.beta", loss["beta"]),
            ("loss.options.base", loss["base"]), ("pooling.options.assignment_rule", rule),
            ("pooling.options.prior", prior), ("loss_wrapper.options.cross_fit", fit),
            ("loss_wrapper.options.lam", lam)]
    return C.resolve(method_config(base_cfg, "xml", over))


def t_half_width(values) -> float:
    from scipy import stats
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cards", choices=sorted(BASELINE_BEST))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", default="auto")
    p.add_argument("--lams", type=float, nargs="+", default=list(LAMS))
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--fits", nargs="+", default=list(FITS), choices=FITS)
    p.add_argument("--priors", type=float, nargs="+", default=list(PRIORS))
    p.add_argument("--folder", default="experiments", help="where the experiment folder xml_lambda_<dataset> goes")
    p.add_argument("--out", default="docs/results/xml_lambda")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides as KEY=YAML, e.g. trainer.max_epochs=2")
    args = p.parse_args()
    words = [("general.experiment_folder", args.folder), ("general.device", "cpu"), ("dataset.name", args.dataset),
             ("loss.name", "multi_similarity"), ("general.methods", ["xml"]), ("search.mode", "none")]
    words += [(k, C.parse_value(v)) for k, v in (e.split("=", 1) for e in args.extra)]
    cfg = C.load({}, words, presets=C.presets_for({}, words))
    exp = Experiment(cfg, f"xml_lambda_{args.dataset}", progress=False)
    # no experiment fingerprint: every fold trained here is identified by its run folder's hash (the whole training
    # config, fold and seed), so the folder is reused across changes of the method's defaults
    exp._claim_folder = lambda dataset, split: exp.folder.mkdir(parents=True, exist_ok=True)
    exp.setup()
    folds = range(len(exp.split.folds))
    seeds = [1000 * (s + 1) for s in range(args.seeds)]  # as reproductions are seeded
    jobs = []  # (variant, lam, seed, config)
    for lam in args.lams:
        grid = itertools.product(args.rules, args.fits, args.priors)
        for rule, fit, prior in (grid if lam > 0 else [(RULES[0], FITS[0], 1.0)]):
            name = variant_name(rule, fit, prior) if lam > 0 else "lam=0 (base loss)"
            for seed in seeds:
                jobs.append((name, lam, seed, unit_config(exp.base_cfg, args.dataset, rule, fit, prior, lam)))
    units = [("xml", ccfg, f, seed, f"{name} lam {lam:g} seed {seed} fold {f}") for name, lam, seed, ccfg in jobs
             for f in folds]
    n = resolve_workers(args.workers, "cpu")
    print(f"{len(units)} folds on {n} worker(s)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if n > 1:
        pool = FoldPool(exp, n)
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(units), desc="xml lambda folds", unit="fold")
            results = pool.run(units, on_done=lambda i, r: bar.update(1))
            bar.close()
        finally:
            pool.close()
    else:
        results = [exp._train(*u[:4], desc=u[4]) for u in units]
    wall = time.perf_counter() - t0
    rows = []
    for (method, ccfg, f, seed, desc), res, job in zip(units, results, [j for j in jobs for _ in folds]):
        health = (res["history"][-1].get("health") or {}) if res["history"] else {}
        rows.append({"dataset": args.dataset, "variant": job[0], "lam": job[1], "seed": seed, "fold": f,
                     "val_map_r": res["val"]["mean_average_precision_at_r"], "best_epoch": res["best_epoch"],
                     **{k: health.get(k, float("nan")) for k in HEALTH}})
    out = Path(f"{args.out}_{args.dataset}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = []
    for (variant, lam), group in itertools.groupby(sorted(rows, key=lambda r: (r["variant"], r["lam"])),
                                                   key=lambda r: (r["variant"], r["lam"])):
        group = list(group)
        per_seed = [np.mean([r["val_map_r"] for r in group if r["seed"] == s]) for s in seeds]
        summary.append({"dataset": args.dataset, "variant": variant, "lam": lam, "val_map_r": float(np.mean(per_seed)),
                        "ci95": t_half_width(per_seed), "seeds": len(per_seed),
                        **{k: float(np.nanmean([r[k] for r in group])) if any(np.isfinite(r[k]) for r in group)
                           else float("nan") for k in HEALTH}})
    with open(Path(f"{out}_summary.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    level = [s for s in summary if s["lam"] == 0]
    print(f"# XML validation MAP@R against lam, {args.dataset} ({len(units)} folds, {wall:.0f} s on {n} worker(s), "
          f"{time.strftime('%Y-%m-%d %H:%M')})\n")
    print("| variant | lam | val MAP@R (%) | gap err (val) | unused (val) | cross err | lam L_xml / L | grad ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in sorted(summary, key=lambda s: (s["lam"] > 0, s["variant"], s["lam"])):
        ratio = s["cross_term"] / s["base_loss"] if s["base_loss"] else float("nan")
        grad = s["cross_grad_norm"] / s["base_grad_norm"] if s["base_grad_norm"] else float("nan")
        print(f"| {s['variant']} | {s['lam']:g} | {100 * s['val_map_r']:.2f} ± {100 * s['ci95']:.2f} | "
              f"{s['val_gap_error']:.3f} | {s['val_unused_prototypes']:.1f} | {s['cross_error']:.3f} | {ratio:.3f} | "
              f"{grad:.3f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant in sorted({s["variant"] for s in summary if s["lam"] > 0}):
            pts = sorted((s["lam"], s["val_map_r"], s["ci95"]) for s in summary if s["variant"] == variant)
            ax.errorbar([q[0] for q in pts], [100 * q[1] for q in pts], yerr=[100 * q[2] for q in pts], marker="o",
                        capsize=2, label=variant)
        if level:
            ax.axhline(100 * level[0]["val_map_r"], color="k", linestyle="--", label="lam = 0 (base loss)")
        ax.set_xscale("log")
        ax.set_xlabel("lam")
        ax.set_ylabel("validation MAP@R (%), mean of 4 folds")
        ax.set_title(f"XML on {args.dataset}: validation MAP@R against lam (mean ± 95% CI over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except Exception as exc:  # the tables are the result; a plot failure must not lose them
        print(f"warning: plot failed: {exc}", file=sys.stderr)
    try:
        plot_health(units, results, [j for j in jobs for _ in folds], Path(f"{out}_health.png"), args.dataset)
    except Exception as exc:
        print(f"warning: health plot failed: {exc}", file=sys.stderr)


HEALTH_PANELS = (("val_gap_error", "GAP reconstruction error (validation)"),
                 ("val_unused_prototypes", "prototypes never chosen (validation, of 64)"),
                 ("cross_error", "cross-batch reconstruction error (training batch)"),
                 ("grad_ratio", "||grad lam L_xml|| / ||grad L|| (training batch)"))


def plot_health(units, results, jobs, path: Path, dataset: str, lams=(0.0, 0.1, 1.0)) -> None:
    """The health diagnostics over training (per epoch, mean over folds and seeds) for lam = 0 and each variant at a
    few lams: ``OUT_<dataset>_health.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {}
    for res, job in zip(results, jobs):
        name, lam = job[0], job[1]
        if lam not in lams:
            continue
        for h in res["history"]:
            health = h.get("health") or {}
            row = dict(health)
            if health.get("base_grad_norm"):
                row["grad_ratio"] = health.get("cross_grad_norm", float("nan")) / health["base_grad_norm"]
            for key, _ in HEALTH_PANELS:
                if key in row and np.isfinite(row[key]):
                    series.setdefault((name, lam, key), {}).setdefault(h["epoch"], []).append(row[key])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, HEALTH_PANELS):
        for (name, lam, k), by_epoch in sorted(series.items()):
            if k != key:
                continue
            epochs = sorted(by_epoch)
            ax.plot(epochs, [np.mean(by_epoch[e]) for e in epochs], marker=".",
                    label=name if lam == 0 else f"{name}, lam {lam:g}",
                    linestyle="--" if lam == 0 else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if key == "grad_ratio":
            ax.set_yscale("symlog", linthresh=1e-3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.suptitle(f"XML health over training on {dataset} (mean over folds and seeds)")
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
