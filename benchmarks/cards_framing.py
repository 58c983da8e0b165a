"""How a card sits in its stored image, measured on validation classes: the choice of `cards`' framing.

    python benchmarks/cards_framing.py [--framings margins fill aspect] [--seeds 3] [--workers auto]

Framings (docs/data.md):

* ``margins``: the card's outline resized to 256 px high on a white 256 x 256 square (the card fills the height only;
  white margins left and right); training crops of scale 0.5-1 of the square, the whole square at test;
* ``fill``: the card's outline resized whole to 256 x 256 (it fills the trunk's grid; its aspect changes by about 1.4);
  the same crops, the whole image at test;
* ``aspect``: the card's outline stored at its own aspect; training crops of 0.5-1 of the card with the card's aspect
  (x [3/4, 4/3]), padded to a square with white, the whole card padded at test (``transforms.train.pad``,
  ``transforms.eval.mode: pad``).

The choice: the baseline (multi-similarity with PML's defaults, GAP, the main job's trainer: 6 epochs of 40 iterations,
early stopping on validation MAP@R) on the 4 folds of the protocol's split, ``--seeds`` seeds; the mean validation
MAP@R over the folds, mean and 95% t-interval over the seeds. Only validation classes decide.

For the record (not for the choice): the same work as ``benchmarks/transform_presets.py`` (the baseline trained on all
26 training classes for 320 iterations, tested on the 26 test classes after the last epoch, seeds 0 1 2), and the time
the set-up took (render + feature cache, built cold in a fresh cache folder unless ``--cache`` is given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FRAMINGS = {
    "margins": [("dataset.options_for.cards.framing", "margins")],
    "fill": [("dataset.options_for.cards.framing", "fill")],
    "aspect": [("dataset.options_for.cards.framing", "aspect"), ("transforms.train.pad", True),
               ("transforms.eval.mode", "pad")],
}


def validation(words, seeds, workers: str, folder: Path, name: str) -> dict:
    """Mean validation MAP@R (and P@1) of the baseline over the 4 folds, per seed."""
    from xml_plugin import config as C
    from xml_plugin.protocol.experiment import Experiment
    from xml_plugin.protocol.workers import FoldPool, resolve_workers
    from xml_lambda import t_half_width
    base = [("general.experiment_folder", str(folder)), ("general.device", "cpu"), ("dataset.name", "cards"),
            ("loss.name", "multi_similarity"), ("general.methods", ["baseline"]), ("search.mode", "none"),
            ("trainer.logs", False)]
    cfg = C.load({}, base + list(words), presets=C.presets_for({}, base + list(words)))
    exp = Experiment(cfg, name, progress=False)
    t0 = time.perf_counter()
    exp.setup()
    setup_seconds = time.perf_counter() - t0
    ccfg = C.resolve(exp.method_config("baseline"))
    units = [("baseline", ccfg, f, 1000 * (s + 1), f"{name} seed {s} fold {f}")
             for s in range(seeds) for f in range(len(exp.split.folds))]
    n = resolve_workers(workers, "cpu")
    t0 = time.perf_counter()
    if n > 1:
        pool = FoldPool(exp, n)
        try:
            results = pool.run(units)
        finally:
            pool.close()
    else:
        results = [exp._train(*u[:4], desc=u[4]) for u in units]
    folds = len(exp.split.folds)
    per_seed = [float(np.mean([r["val"]["mean_average_precision_at_r"] for r in results[s * folds:(s + 1) * folds]]))
                for s in range(seeds)]
    p1 = float(np.mean([r["val"]["precision_at_1"] for r in results]))
    return {"val_map_at_r": float(np.mean(per_seed)), "ci95": t_half_width(per_seed), "per_seed": per_seed,
            "val_p_at_1": p1, "setup_seconds": round(setup_seconds, 1), "folds_seconds": round(time.perf_counter() - t0, 1),
            "workers": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--framings", nargs="+", default=list(FRAMINGS), choices=list(FRAMINGS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--no_same_work", action="store_true", help="skip the test-class record")
    ap.add_argument("--cache", help="the cache root to use (default: a fresh one, so the set-up time is a cold build)")
    args = ap.parse_args()
    if args.cache:
        os.environ["XML_PLUGIN_CACHE"] = args.cache
    else:
        os.environ["XML_PLUGIN_CACHE"] = tempfile.mkdtemp(prefix="xml_cards_framing_cache_")
    folder = Path(tempfile.mkdtemp(prefix="xml_cards_framing_"))
    for framing in args.framings:
        words = FRAMINGS[framing]
        out = {"framing": framing, "overrides": {k: v for k, v in words}}
        out.update(validation(words, args.seeds, args.workers, folder, f"val_{framing}"))
        if not args.no_same_work:
            import torch
            from transform_presets import load_config, same_work
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, os.cpu_count() or 1))
            work = same_work(load_config("cards", words), f"same_{framing}", [0, 1, 2], folder)
            torch.set_num_threads(threads)
            out.update(test_map_at_r_same_work=work["map_at_r"], test_per_seed=work["per_seed_map_at_r"],
                       test_p_at_1_same_work=work["p_at_1"])
        out.update(date=time.strftime("%Y-%m-%d %H:%M"), load1=round(os.getloadavg()[0], 1))
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
