"""One frozen fold of the main job against a bare loop doing the same arithmetic, side by side in one run.

    python benchmarks/fold_floor.py [--dataset cards] [--methods baseline xml] [--rounds 3] [--threads 1]

For each method, on the main job's data, cache and config (``cards``, 6 epochs x 40 iterations, multi-similarity at
its defaults, the method's overlay), one fold (fold 0) is trained

- ``ours``: by ``xml_plugin.engine.train.train_fold`` exactly as the protocol calls it (the config default
  ``trainer.logs: true``, checkpoints every epoch, the XML health diagnostics, validation each epoch), and
- ``bare``: by a plain loop written here: the same components built from the same config (the model's trainable part,
  the PML loss or the project's loss wrapper, the optimizer), the same batches (the project's sampler call), the same
  cached inputs read straight from the cache's arrays (the pooled copy for GAP methods, the float16 maps otherwise), the
  same number of validations (MAP@R of the validation fold with PML's AccuracyCalculator), and nothing else (no logs,
  no checkpoints, no diagnostics, no early-stopping bookkeeping).

Rounds alternate the two (order rotated) and the medians are reported with their ratio ``ours / bare``: the loop's
overhead over its arithmetic. Warm: the data set and the feature cache are built by a first, untimed set-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xml_plugin import config as C  # noqa: E402
from xml_plugin import registry  # noqa: E402
from xml_plugin.engine import train as T  # noqa: E402
from xml_plugin.engine.model import build_head  # noqa: E402
from xml_plugin.protocol.experiment import Experiment, method_config  # noqa: E402


def experiment(args, folder: Path) -> Experiment:
    words = [("general.experiment_folder", str(folder)), ("general.device", "cpu"), ("dataset.name", args.dataset),
             ("loss.name", args.loss), ("trainer.patience", None)]  # the same number of validations in both
    cfg = C.load({}, words, presets=C.presets_for({}, words))
    exp = Experiment(cfg, "fold_floor", progress=False)
    exp.setup()
    return exp


def bare_fold(cfg, ctx, train_idx, val_idx, seed: int) -> float:
    """The plain loop; returns the best validation MAP@R (a check that both loops learn the same thing)."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    T.seed_everything(seed)
    labels_all = ctx.labels
    classes, train_labels = np.unique(labels_all[train_idx], return_inverse=True)
    model = build_head(cfg, ctx.trunk, ctx.frozen_blocks)
    hist_size = getattr(model.pooling, "num_prototypes", None)
    loss_fn = T.build_loss(cfg, len(classes), model.pooling.dim, hist_size, len(train_idx))
    if hasattr(loss_fn, "bind_pooling"):
        loss_fn.bind_pooling(model.pooling)
    name, opts = registry.split_spec(cfg["optimizer"])
    opts = {k: v for k, v in opts.items() if k not in ("loss_lr", "trunk_lr")}
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    opt = registry.build("optimizer", {"name": name, "options": opts}, params)
    source = ctx.for_config(cfg).source
    cache, pooled = source.cache, source.pooled
    train_arr = cache._train_pooled if pooled else cache._train
    eval_arr = cache._eval_pooled if pooled else cache._eval
    needs_hist = getattr(loss_fn, "needs_histograms", False)
    calc = AccuracyCalculator(include=("mean_average_precision_at_r",), k="max_bin_count")
    tr = cfg["trainer"]
    iters, epochs = int(tr["iterations_per_epoch"]), int(tr["max_epochs"])
    best = -1.0
    val_labels = labels_all[val_idx]
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        batches = T.make_batches(train_labels, cfg, iters, seed * 1000 + epoch)
        model.train()
        T._freeze_bn(model)
        for b in batches:
            idx = train_idx[b]
            views = rng.integers(0, cache.views, size=len(b))
            x = torch.from_numpy(np.ascontiguousarray(train_arr[idx, views]))
            x = x if pooled else x.float()
            out = model(x, from_cache=True)
            y = torch.as_tensor(train_labels[b])
            loss = loss_fn(out.embedding, y, histograms=out.histogram) if needs_hist else loss_fn(out.embedding, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            embs = []
            for start in range(0, len(val_idx), 128):
                x = torch.from_numpy(np.ascontiguousarray(eval_arr[val_idx[start:start + 128]]))
                embs.append(model(x if pooled else x.float(), from_cache=True).embedding)
            e = torch.nn.functional.normalize(torch.cat(embs), dim=1)  # the project's metrics normalise first
        acc = calc.get_accuracy(e, torch.as_tensor(val_labels))
        best = max(best, acc["mean_average_precision_at_r"])
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cards")
    p.add_argument("--loss", default="multi_similarity")
    p.add_argument("--methods", nargs="+", default=["baseline", "xml"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        exp = experiment(args, Path(tmp))
        tr, va = (np.asarray(a) for a in exp.split.folds[0])
        rows = {}
        for method in args.methods:
            cfg = C.resolve(method_config(exp.base_cfg, method))
            times = {"ours": [], "bare": []}
            values = {}
            for r in range(args.rounds):
                for kind in (("ours", "bare") if r % 2 == 0 else ("bare", "ours")):
                    t0 = time.perf_counter()
                    if kind == "ours":
                        res = T.train_fold(cfg, exp.ctx, tr, va, Path(tmp) / f"{method}_{r}", seed=0)
                        values["ours"] = res["val"][T.OBJECTIVE]
                    else:
                        values["bare"] = bare_fold(cfg, exp.ctx, tr, va, seed=0)
                    times[kind].append(time.perf_counter() - t0)
            ours, bare = statistics.median(times["ours"]), statistics.median(times["bare"])
            rows[method] = {"ours_s": ours, "bare_s": bare, "ratio": ours / bare, "ours_val_map_r": values["ours"],
                            "bare_val_map_r": values["bare"], "times": times}
            print(f"{method:10s} ours {ours:6.2f} s  bare {bare:6.2f} s  ratio {ours / bare:4.2f}  "
                  f"(validation MAP@R ours {values['ours']:.4f}, bare {values['bare']:.4f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
