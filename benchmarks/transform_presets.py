"""The same small piece of work under the protocol's transforms and under an embedded data set's own preset.

"The same work": the baseline (multi-similarity with PML's defaults, GAP, the 1x1 projection to 128 dims on the frozen
MobileNetV2, Adam 1e-3) trained on ALL training classes of the class-disjoint split (the four folds together) for 320
iterations (8 epochs x 40, batch 32 = 8 classes x 4), then tested on the test classes; the last epoch's test MAP@R and
P@1, for 3 seeds, through the project's own ``train_fold`` (feature cache included).

    python benchmarks/transform_presets.py                      # cards and kanji (200 classes), both presets
    python benchmarks/transform_presets.py --datasets cards --seeds 0 1 2

Presets: ``protocol`` = random resized crops of scale 0.16-1, horizontal flips, test image resized to 256/224 of the
input size and center-cropped; ``preset`` = the data set's own (config_dataset/<name>.yaml; docs/data.md). One JSON
line per (data set, preset). ``same_work`` and ``load_config`` are reused by benchmarks/tail_regime.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ITERATIONS_PER_EPOCH, EPOCHS = 40, 8
PROTOCOL = [("transforms.train", {"scale": [0.16, 1.0], "flip": True}), ("transforms.eval.mode", "center_crop")]
TRANSFORM_PRESETS = {"protocol": PROTOCOL, "preset": []}


def load_config(dataset: str, overrides: Iterable[Tuple[str, object]] = (),
                selection: Dict[str, List[str]] = None) -> dict:
    """The config of the same work on ``dataset``: its automatic preset, then ``selection`` files and ``overrides``."""
    from xml_plugin import config as C
    words = [("dataset.name", dataset), ("general.device", "cpu"), ("search.mode", "none"),
             ("general.methods", ["baseline"]), ("trainer.patience", None), ("trainer.max_epochs", EPOCHS),
             ("trainer.iterations_per_epoch", ITERATIONS_PER_EPOCH), ("trainer.logs", False)] + list(overrides)
    selection = selection or {}
    return C.load(selection, words, presets=C.presets_for(selection, words))


def prepare(cfg: dict, name: str, folder: Path):
    """(experiment, run context, the baseline's resolved config, every training index, the test indices, seconds the
    set-up took: data set, split, trunk and feature cache, built or reused)."""
    from xml_plugin import config as C
    from xml_plugin.protocol.experiment import Experiment
    exp = Experiment(cfg, name, progress=False)
    exp.cfg["general"]["experiment_folder"] = str(folder)
    exp.folder = folder / name
    t0 = time.perf_counter()
    ctx = exp.setup()
    setup_seconds = time.perf_counter() - t0
    ccfg = C.resolve(exp.method_config("baseline"))
    train_idx = np.sort(np.concatenate(exp.split.folds[0]))  # fold 0's train + val = every training class
    return exp, ctx, ccfg, train_idx, np.asarray(exp.split.test), setup_seconds


def same_work(cfg: dict, name: str, seeds: Sequence[int], folder: Path) -> dict:
    """Train the baseline on every training class, test on the test classes after the last epoch, once per seed."""
    from xml_plugin.engine import train as T
    exp, ctx, ccfg, train_idx, test_idx, setup_seconds = prepare(cfg, name, folder)
    maps, p1s, epoch_seconds = [], [], []
    for seed in seeds:
        res = T.train_fold(ccfg, ctx, train_idx, test_idx, exp.folder / f"run_{seed}", seed)
        last = res["history"][-1]
        maps.append(last["mean_average_precision_at_r"])
        p1s.append(last["precision_at_1"])
        epoch_seconds += [h["seconds"] for h in res["history"]]
    cache = ctx.source.cache
    cache_bytes = sum(f.stat().st_size for f in cache.folder.glob("*.npy")) if cache is not None else 0
    return {"run": name, "dataset": ctx.dataset.fingerprint(), "frozen_blocks": ctx.frozen_blocks,
            "transforms": cfg["transforms"], "optimizer": cfg["optimizer"],
            "train_classes": int(len(np.unique(ctx.labels[train_idx]))),
            "test_classes": int(len(np.unique(ctx.labels[test_idx]))), "seeds": list(seeds),
            "map_at_r": float(np.mean(maps)), "map_at_r_std": float(np.std(maps, ddof=1)) if len(maps) > 1 else 0.0,
            "p_at_1": float(np.mean(p1s)), "per_seed_map_at_r": [round(m, 4) for m in maps],
            "seconds_per_epoch_incl_test": float(np.median(epoch_seconds)), "setup_seconds": round(setup_seconds, 1),
            "cache_mb": round(cache_bytes / 2 ** 20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["cards", "kanji"])
    ap.add_argument("--presets", nargs="+", default=list(TRANSFORM_PRESETS), choices=list(TRANSFORM_PRESETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kanji_classes", type=int, default=200,
                    help="kanji's num_classes here (200, as the smoke preset: its feature caches take minutes, not the "
                         "40+ min of the 1000-class default on this 2-core machine)")
    args = ap.parse_args()
    import os
    import torch
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="xml_transform_presets_"))
    for dataset in args.datasets:
        for preset in args.presets:
            words = TRANSFORM_PRESETS[preset]
            if dataset == "kanji":
                words = words + [("dataset.options_for.kanji.num_classes", args.kanji_classes)]
            out = same_work(load_config(dataset, words), f"{dataset}_{preset}", args.seeds, folder)
            out.update(date=time.strftime("%Y-%m-%d %H:%M"), load1=round(os.getloadavg()[0], 1))
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
