"""Does a bfloat16 assignment product choose the same prototypes as float32, on real features?

    python benchmarks/bf16_assignment.py RUN_DIR [RUN_DIR ...] [--dataset cards] [--threads 1]
    python benchmarks/bf16_assignment.py --train inner_product nearest     # trains fold 0 of the main job's XML first

XML's hard histogram is an argmax over one [C, m] x [C, n] product per image (``PrototypePooling.pool_linear``); no
gradient goes through it, so computing it in bfloat16 (AMX on this CPU) would be a speed option like AMP, not a change
of method, if its choices agree with float32. For each trained XML run folder given (its ``best.pt``: embedder and
prototypes), every location of every test-transform view of the data set's cached maps is assigned both ways; prints
the fraction of locations whose chosen prototype agrees, the fraction of images whose histogram is identical, and the
time of both products. The decision rule (docs/benchmarks.md): bfloat16 would become the default only at >= 99.9%
agreement and an unchanged validation MAP@R.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xml_plugin import config as C  # noqa: E402
from xml_plugin.engine.model import build_head  # noqa: E402
from xml_plugin.engine.train import load_trainable  # noqa: E402
from xml_plugin.protocol.experiment import Experiment  # noqa: E402
from xml_plugin.protocol.run_index import read_run  # noqa: E402


def scores(protos_w, x, bias_term, dtype):
    """[B, m, n] inner-product scores w_j.(weight x_i + bias) in ``dtype`` (accumulation as torch does it)."""
    s = torch.matmul(protos_w.to(dtype), x.to(dtype)).float()
    return s if bias_term is None else s + bias_term[None, :, None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--train", nargs="*", default=[], metavar="RULE",
                   help="train fold 0 of the main job's XML (lam 0.1) with each assignment rule, then check those")
    p.add_argument("--dataset", default="cards")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    words = [("general.device", "cpu"), ("dataset.name", args.dataset), ("general.methods", ["xml"])]
    cfg = C.load({}, words, presets=C.presets_for({}, words))
    exp = Experiment(cfg, "bf16_check", progress=False)
    # the cache only: no folder is claimed
    exp._claim_folder = lambda *a, **k: None
    ctx = exp.setup()
    maps = torch.from_numpy(np.ascontiguousarray(ctx.source.cache._eval)).float()  # [N, C, h, w]
    x = maps.flatten(2)  # [N, C, n]
    runs = [(run, read_run(run)["config"]) for run in args.runs]
    if args.train:
        import tempfile
        from xml_plugin.engine import train as T
        from xml_plugin.protocol.experiment import method_config
        tr, va = (np.asarray(a) for a in exp.split.folds[0])
        for rule in args.train:
            ccfg = C.resolve(method_config(exp.base_cfg, "xml", [("pooling.options.assignment_rule", rule),
                                                                 ("loss_wrapper.options.lam", 0.1)]))
            run = Path(tempfile.mkdtemp()) / rule
            T.train_fold(ccfg, ctx, tr, va, run, seed=0)
            runs.append((run, ccfg))
    for run, config in runs:
        model = build_head(config, ctx.trunk, ctx.frozen_blocks)
        load_trainable(model, run / "best.pt", "cpu")
        weight, bias = model.embedder.linear()
        pool = model.pooling
        protos = pool.prototypes.detach().float()
        pw = protos @ weight.detach().float()  # [m, C]
        bt = None if bias is None else protos @ bias.detach().float()
        agree = same_hist = total = 0
        t32 = t16 = 0.0
        for start in range(0, len(x), 32):
            xb = x[start:start + 32]
            t0 = time.perf_counter()
            a = scores(pw, xb, bt, torch.float32)
            t1 = time.perf_counter()
            b = scores(pw, xb, bt, torch.bfloat16)
            t2 = time.perf_counter()
            t32, t16 = t32 + t1 - t0, t16 + t2 - t1
            if pool.assignment_rule == "nearest":
                off = (protos * protos).sum(1)[None, :, None]
                ca, cb = (off - 2 * a).argmin(1), (off - 2 * b).argmin(1)
            else:
                ca, cb = a.argmax(1), b.argmax(1)
            agree += int((ca == cb).sum())
            total += ca.numel()
            same_hist += int((torch.sort(ca, dim=1).values == torch.sort(cb, dim=1).values).all(dim=1).sum())
        print(f"{run}: rule {pool.assignment_rule}, {total} locations of {len(x)} images: "
              f"{100 * agree / total:.3f}% of the choices agree, {100 * same_hist / len(x):.1f}% of the histograms are "
              f"identical; product float32 {1e3 * t32:.0f} ms, bfloat16 {1e3 * t16:.0f} ms ({args.threads} thread)")


if __name__ == "__main__":
    main()
