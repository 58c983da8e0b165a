"""The tail regime (MobileNetV2's last blocks train from cached activations) against the head-only regime (frozen trunk,
only the 1x1 projection trains), on cards with its preset:

* cost: the seconds of one training step (batch 32 read from the feature cache, forward, multi-similarity, backward,
  Adam step; median and interquartile range over ``--steps`` steps after ``--warmup``), the bytes autograd saves for
  backward, the peak RSS growth of one step, the trained parameters, the feature cache on disk, the seconds to embed
  one test image from the cache;
* learning: "the same work" of benchmarks/transform_presets.py (every training class, 320 iterations, test on the test
  classes at the last epoch, 3 seeds), the baseline (multi-similarity, GAP);
* the fair main job's wall time estimated from these figures (144 fold trainings of 240 iterations, their validations
  and the test embeddings), with the head-only estimate to compare with its measured time (docs/benchmarks.md).

    python benchmarks/tail_regime.py                                  # head vs the tail preset
    python benchmarks/tail_regime.py --variants head tail:-2:1e-4 tail:-1:1e-4 tail:-2:1e-5

A variant is ``head`` (trunk.frozen_blocks auto: all frozen; the baseline then gets the pooled cache, one vector per
view), ``head:full`` (the same on the full cached maps, cache.pooled false) or ``tail:-K:LR`` (the last K trunk blocks train with
optimizer.options.trunk_lr LR; ``tail`` alone = --config_models tail as shipped). One JSON line per variant, then the
estimate.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import saved_bytes, status_kib  # noqa: E402
from transform_presets import load_config, prepare, same_work  # noqa: E402

FAIR_JOB = {"fold_trainings": 144, "iterations": 240, "epochs": 6, "test_embeddings": 20 * 4}


def variant_config(variant: str) -> dict:
    if variant == "head":
        return load_config("cards")
    if variant == "head:full":  # the head-only regime on the full [1280, 7, 7] maps (no pooled cache)
        return load_config("cards", [("cache.pooled", False)])
    kind, *rest = variant.split(":")
    if kind != "tail" or len(rest) not in (0, 2):
        raise SystemExit(f"variant {variant!r}: use head, head:full, tail or tail:-K:LR")
    overrides = [("trunk.frozen_blocks", int(rest[0])), ("optimizer.options.trunk_lr", float(rest[1]))] if rest else []
    return load_config("cards", overrides, {"config_models": ["tail"]})


def cost(cfg: dict, name: str, folder: Path, steps: int, warmup: int) -> dict:
    """Step time, memory and evaluation cost of one regime, with the trainer's own components."""
    from xml_plugin import registry
    from xml_plugin.engine import train as T
    exp, ctx, ccfg, train_idx, test_idx, _ = prepare(cfg, name, folder)
    classes, labels = np.unique(ctx.labels[train_idx], return_inverse=True)
    model = T.build_head(ccfg, ctx.trunk, ctx.frozen_blocks)
    loss_module = T.build_loss(ccfg, len(classes), model.pooling.dim, None)
    opt_name, opts = registry.split_spec(ccfg["optimizer"])
    trunk_lr = opts.pop("trunk_lr", None)
    tail = [p for p in model.tail.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("tail.")]
    groups = [{"params": head}] + ([{"params": tail, "lr": float(trunk_lr or opts["lr"])}] if tail else [])
    optimizer = registry.build("optimizer", {"name": opt_name, "options": opts}, groups)
    batches = T.make_batches(labels, ccfg, warmup + steps, seed=0)
    rng = np.random.default_rng(0)
    model.train()
    T._freeze_bn(model)  # what trainer.freeze_bn does every epoch

    def forward(x, y):
        return loss_module(model(x, from_cache=True).embedding, y)

    times, cpu, rss_growth = [], [], 0
    for i, x in enumerate(ctx.source.train_batches([train_idx[b] for b in batches], rng)):
        y = torch.as_tensor(labels[batches[i]])
        if i == warmup:  # every buffer (gradients, Adam's moments) exists: measure one step's peak RSS growth
            saved = saved_bytes(lambda: forward(x, y))
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            before = status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        t0, c0 = time.perf_counter(), time.process_time()
        loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i == warmup:
            rss_growth = status_kib("VmHWM") - before
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    t0 = time.perf_counter()
    T.evaluate_indices(model, ctx, test_idx)
    eval_seconds = time.perf_counter() - t0
    cache = ctx.source.cache
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {"frozen_blocks": ctx.frozen_blocks, "trunk_blocks_trained": ctx.trunk.num_blocks - ctx.frozen_blocks,
            "trained_parameters": sum(p.numel() for g in groups for p in g["params"]),
            "cached_shape": list(cache.feature_shape),
            "cache_mb": round(sum(f.stat().st_size for f in cache.folder.glob("*.npy")) / 2 ** 20, 1),
            "step_seconds_median": round(float(med), 4), "step_seconds_iqr": [round(float(q1), 4), round(float(q3), 4)],
            "step_cpu_seconds_median": round(float(np.median(cpu)), 4),
            "saved_for_backward_mb": round(saved / 2 ** 20, 2), "step_rss_growth_mb": round(rss_growth / 1024, 1),
            "eval_ms_per_image": round(1000 * eval_seconds / len(test_idx), 3),
            "train_images": int(len(train_idx)), "test_images": int(len(test_idx))}


def fair_job_seconds(step_seconds: float, eval_ms_per_image: float, train_images: int, test_images: int) -> float:
    """Training steps and embeddings of the fair main job (4 folds: a fold validates on a quarter of the training
    images, every epoch); loop, search and report overhead not included."""
    J = FAIR_JOB
    val_images = train_images / 4
    embedded = J["fold_trainings"] * J["epochs"] * val_images + J["test_embeddings"] * test_images
    return J["fold_trainings"] * J["iterations"] * step_seconds + embedded * eval_ms_per_image / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["head", "tail"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no_learning", action="store_true", help="only the cost figures")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 when another job shares 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="xml_tail_regime_"))
    for variant in args.variants:
        cfg = variant_config(variant)
        out = {"variant": variant, "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
               "load1_before": round(os.getloadavg()[0], 1)}
        out.update(cost(cfg, f"cost_{variant.replace(':', '_')}", folder, args.steps, args.warmup))
        out["fair_job_estimate_seconds"] = round(fair_job_seconds(out["step_seconds_median"], out["eval_ms_per_image"],
                                                                  out["train_images"], out["test_images"]))
        if not args.no_learning:
            work = same_work(cfg, f"work_{variant.replace(':', '_')}", args.seeds, folder)
            out.update({k: work[k] for k in ("map_at_r", "map_at_r_std", "p_at_1", "per_seed_map_at_r",
                                             "seconds_per_epoch_incl_test", "optimizer")})
        out["load1_after"] = round(os.getloadavg()[0], 1)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
