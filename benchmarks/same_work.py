"""The same small piece of work under different presets: train on all training classes of the class-disjoint split
for 320 iterations (8 epochs x 40) with multi-similarity (PML's defaults), GAP, and test on the test classes at the last
epoch; 3 seeds, through the project's own ``train_fold``. Reports test MAP@R and P@1 (mean and sample std over
seeds), the seconds per training step, the peak RSS and the feature cache's size.

    python benchmarks/same_work.py --dataset cards --presets protocol whole      # transforms: the protocol's vs whole card
    python benchmarks/same_work.py --dataset cards --presets whole whole_tail    # regimes: head only vs trunk tail
    python benchmarks/same_work.py --dataset kanji --presets protocol whole

Presets: ``protocol`` = the protocol's transforms (crops of scale 0.16-1, flip, test resize + center crop);
``whole`` = the data set's own preset (cards: crops 0.5-1, no flip, whole card at test; kanji: whole glyph at test);
``*_tail`` = the same with ``--config_models tail`` (MobileNetV2's last 320-channel block and 1x1 conv train).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROTOCOL = [("transforms.train", {"scale": [0.16, 1.0], "flip": True}), ("transforms.eval.mode", "center_crop")]


def words(dataset: str, preset: str) -> tuple:
    from xml_plugin import config as C
    overrides = [("dataset.name", dataset), ("general.device", "cpu"), ("search.mode", "none"),
                 ("general.methods", ["baseline"]), ("trainer.patience", None), ("trainer.max_epochs", 8),
                 ("trainer.iterations_per_epoch", 40), ("trainer.logs", False)]
    base, _, tail = preset.partition("_")
    if base == "protocol":
        overrides += PROTOCOL
    selection = {"config_models": ["tail"]} if tail == "tail" else {}
    return C.load(selection, overrides, presets=C.presets_for(selection, overrides))


def run(dataset: str, preset: str, seeds, folder: Path) -> dict:
    from xml_plugin import config as C
    from xml_plugin.engine import train as T
    from xml_plugin.protocol.experiment import Experiment
    cfg = words(dataset, preset)
    exp = Experiment(cfg, f"{dataset}_{preset}", progress=False)
    exp.cfg["general"]["experiment_folder"] = str(folder)
    exp.folder = folder / f"{dataset}_{preset}"
    ctx = exp.setup()
    ccfg = C.resolve(exp.method_config("baseline"))
    train_idx = np.sort(np.concatenate(exp.split.folds[0]))  # every training class
    test_idx = np.asarray(exp.split.test)
    maps, p1s, step_seconds = [], [], []
    for seed in seeds:
        t0 = time.perf_counter()
        res = T.train_fold(ccfg, ctx, train_idx, test_idx, exp.folder / f"run_{seed}", seed)
        step_seconds.append((time.perf_counter() - t0) / (8 * 40))
        last = res["history"][-1]
        maps.append(last["mean_average_precision_at_r"])
        p1s.append(last["precision_at_1"])
    cache = ctx.source.cache
    cache_bytes = sum(f.stat().st_size for f in cache.folder.glob("*.npy")) if cache is not None else 0
    return {"dataset": dataset, "preset": preset, "frozen_blocks": ctx.frozen_blocks,
            "map_at_r": float(np.mean(maps)), "map_at_r_std": float(np.std(maps, ddof=1)),
            "p_at_1": float(np.mean(p1s)), "seconds_per_step_incl_eval": float(np.mean(step_seconds)),
            "cache_mb": round(cache_bytes / 2 ** 20, 1), "per_seed_map": maps,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cards")
    ap.add_argument("--presets", nargs="+", default=["protocol", "whole"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="xml_same_work_"))
    for preset in args.presets:
        out = run(args.dataset, preset, args.seeds, folder)
        out["date"] = time.strftime("%Y-%m-%d")
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
