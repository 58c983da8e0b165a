"""Ablation of XML's recursion prior (``pooling.options.prior``: ``P_0 = prior I``, ``Q_0 = prior W_0``).

For each prior, the xml method (multi-similarity, lambda = 1, 64 prototypes) trains on every training class of the
protocol's class-disjoint split for 8 epochs x 40 iterations through the project's own ``train_fold`` and is tested on
the test classes at the last epoch; 3 seeds. Besides test MAP@R and P@1 (mean and sample std over seeds) it reports,
from the checkpoint kept by ``train_fold``, how many prototypes collapsed (norm below 1 % of the median norm) and how
many no test location chose (empty histogram column), averaged over seeds.

    python benchmarks/xml_prior.py --dataset cards --priors 0 1 10
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EPOCHS, ITERS = 8, 40


def prototype_stats(cfg, ctx, run_dir: Path, test_idx: np.ndarray) -> dict:
    """Collapsed prototypes (norm < 1 % of the largest) and prototypes no test location chose, for ``best.pt``."""
    import torch
    from xml_plugin.engine import train as T
    model = T.load_best(cfg, ctx, run_dir)
    pool = model.pooling
    norms = pool.prototypes.norm(dim=1)
    used = torch.zeros(pool.num_prototypes)
    with torch.no_grad():
        for x in ctx.source.eval_batches(test_idx, 128):
            used += model(x.to(ctx.device), from_cache=ctx.source.from_cache).histogram.sum(0).cpu()
    return {"collapsed": int((norms < 0.01 * norms.max()).sum()), "unused_on_test": int((used == 0).sum())}


def run(dataset: str, prior: float, seeds, folder: Path, lam: float = None) -> dict:
    from xml_plugin import config as C
    from xml_plugin.engine import train as T
    from xml_plugin.protocol.experiment import Experiment
    overrides = [("dataset.name", dataset), ("general.device", "cpu"), ("search.mode", "none"),
                 ("general.methods", ["xml"]), ("trainer.patience", None), ("trainer.max_epochs", EPOCHS),
                 ("trainer.iterations_per_epoch", ITERS), ("trainer.logs", False)]
    cfg = C.load({}, overrides, presets=C.presets_for({}, overrides))
    name = f"{dataset}_prior_{prior:g}" + ("" if lam is None else f"_lam_{lam:g}")
    exp = Experiment(cfg, name, progress=False)
    exp.cfg["general"]["experiment_folder"] = str(folder)
    exp.folder = folder / name
    ctx = exp.setup()
    mcfg = C.resolve(exp.method_config("xml"))  # lambda at its search default (1.0)
    mcfg["pooling"]["options"]["prior"] = float(prior)
    if lam is not None:
        mcfg["loss_wrapper"]["options"]["lam"] = float(lam)
    train_idx = np.sort(np.concatenate(exp.split.folds[0]))  # every training class
    test_idx = np.asarray(exp.split.test)
    maps, p1s, collapsed, unused = [], [], [], []
    for seed in seeds:
        run_dir = exp.folder / f"run_{seed}"
        res = T.train_fold(mcfg, ctx, train_idx, test_idx, run_dir, seed)
        last = res["history"][-1]
        maps.append(last["mean_average_precision_at_r"])
        p1s.append(last["precision_at_1"])
        stats = prototype_stats(mcfg, ctx, run_dir, test_idx)
        collapsed.append(stats["collapsed"])
        unused.append(stats["unused_on_test"])
    return {"dataset": dataset, "prior": prior, "lam": mcfg["loss_wrapper"]["options"]["lam"],
            "num_prototypes": mcfg["pooling"]["options"]["num_prototypes"],
            "map_at_r": float(np.mean(maps)), "map_at_r_std": float(np.std(maps, ddof=1)),
            "p_at_1": float(np.mean(p1s)), "p_at_1_std": float(np.std(p1s, ddof=1)), "per_seed_map": maps,
            "collapsed_prototypes": float(np.mean(collapsed)), "unused_on_test": float(np.mean(unused))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cards")
    ap.add_argument("--priors", type=float, nargs="+", default=[0.0, 1.0, 10.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--baseline", action="store_true", help="also run lam = 0 (prior 1) as a reference")
    ap.add_argument("--folder", help="runs folder (default: a new temporary one); finished runs in it are reused")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="xml_prior_"))
    jobs = [(prior, None) for prior in args.priors] + ([(1.0, 0.0)] if args.baseline else [])
    for prior, lam in jobs:
        t0 = time.perf_counter()
        out = run(args.dataset, prior, args.seeds, folder, lam)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        out["date"] = time.strftime("%Y-%m-%d")
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
