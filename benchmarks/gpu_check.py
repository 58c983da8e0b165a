"""GPU readiness: fine-tuned folds with AMP for baseline, XML, GSP and XBN, a timed step, and a smoke fair job.

    python benchmarks/gpu_check.py                      # on a CUDA machine: cards, the whole trunk trained, < 8 min
    python benchmarks/gpu_check.py --device cpu --tiny  # the same logic on CPU at a tiny budget (the tests run this)

For each method: one fold of the fine-tuned regime (``trunk.frozen_blocks 0``: no feature cache, images decoded and
augmented on the fly, AMP on CUDA) with ``--iterations`` iterations, the median time of a training step, the best
validation MAP@R, and the peak GPU memory. Then a smoke fair job (``config_general/smoke``) of baseline vs XML in the
same regime. Checks, each printed as ok/FAIL (exit 1 if any fails): every loss and metric finite, MAP@R in [0, 1], the
peak memory under ``--max_memory_gb``, the smoke job's report written with its paired rows. ``--json`` writes every
figure.
"""
from __future__ import annotations

import argparse
import json
import math
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
from xml_plugin.engine import train as T  # noqa: E402
from xml_plugin.protocol.experiment import Experiment, method_config  # noqa: E402

METHODS = ("baseline", "xml", "gsp", "xbn")


def overrides(args, folder: Path):
    words = [("general.experiment_folder", str(folder)), ("general.device", args.device), ("general.workers", 1),
             ("trunk.frozen_blocks", 0), ("trainer.amp", True), ("trainer.patience", None), ("trainer.logs", False),
             ("trainer.iterations_per_epoch", args.iterations), ("trainer.max_epochs", 1)]
    if args.tiny:  # the tests' tiny data and trunk (registered by tests/tiny.py)
        words += [("dataset.name", "tiny_shapes"), ("dataset.options", {}),
                  ("trunk", {"name": "tiny_cnn", "pretrained": False, "frozen_blocks": 0}), ("embedder.size", 16),
                  ("transforms.image_size", 32), ("trainer.batch_size", 16),
                  ("method_overrides.gsp.pooling.options.init_features", 16),
                  ("method_overrides.gsp.pooling.options.num_prototypes", 8),
                  ("method_overrides.xml.pooling.options.num_prototypes", 8)]
    return words


class _StepClock:
    """Wraps the feature source: the time between consecutive training batches is one step."""

    def __init__(self, source):
        self.source, self.stamps = source, []

    def __getattr__(self, name):
        return getattr(self.source, name)

    def for_config(self, cfg, whole):
        return self

    def train_batches(self, *a, **k):
        for x in self.source.train_batches(*a, **k):
            self.stamps.append(time.perf_counter())
            yield x
        self.stamps.append(time.perf_counter())


def _cli_words(words):
    """(dotted key, value) pairs -> command-line words (YAML values, mappings spelled out key by key)."""
    import yaml
    out = []
    for key, value in words:
        if isinstance(value, dict) and value:
            out += _cli_words([(f"{key}.{k}", v) for k, v in value.items()])
        else:
            out += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()]
    return out


def check(results: dict, name: str, ok: bool, detail: str) -> None:
    results.setdefault("checks", []).append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny data set and trunk (CPU check of the logic)")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--max_memory_gb", type=float, default=40.0)
    p.add_argument("--no_smoke", action="store_true", help="skip the smoke fair job")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import tiny  # noqa: F401  (registers tiny_shapes and tiny_cnn)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu --tiny", file=sys.stderr)
        return 2
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "methods": {}, "date": time.strftime("%Y-%m-%d %H:%M")}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        words = overrides(args, Path(tmp))
        cfg = C.load({}, words, presets=C.presets_for({}, words))
        exp = Experiment(cfg, "gpu_check", progress=False)
        ctx = exp.setup()
        check(results, "regime", ctx.frozen_blocks == 0 and not ctx.source.from_cache,
              f"frozen blocks {ctx.frozen_blocks}, from cache {ctx.source.from_cache} (the whole trunk trains)")
        tr, va = (np.asarray(a) for a in exp.split.folds[0])
        for method in args.methods:
            mcfg = C.resolve(method_config(exp.base_cfg, method))
            clock = _StepClock(ctx.source)
            import dataclasses
            mctx = dataclasses.replace(ctx, source=clock)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = T.train_fold(mcfg, mctx, tr, va, Path(tmp) / "runs" / method, seed=0)
            if cuda:
                torch.cuda.synchronize()
            steps = np.diff(clock.stamps)[1:] if len(clock.stamps) > 2 else np.array([float("nan")])
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
            row = {"fold_s": time.perf_counter() - t0, "step_ms": 1e3 * float(statistics.median(steps)),
                   "val_map_r": res["val"][T.OBJECTIVE], "train_loss": res["history"][-1]["train_loss"],
                   "peak_memory_gb": peak}
            results["methods"][method] = row
            print(f"{method:9s} step {row['step_ms']:8.1f} ms  fold {row['fold_s']:6.1f} s  "
                  f"val MAP@R {row['val_map_r']:.4f}  loss {row['train_loss']:.4f}  peak {peak:.2f} GB", flush=True)
            finite = all(math.isfinite(v) for v in (row["val_map_r"], row["train_loss"]))
            check(results, f"{method} finite", finite and 0 <= row["val_map_r"] <= 1,
                  f"loss {row['train_loss']:.4g}, MAP@R {row['val_map_r']:.4g}")
            if cuda:
                check(results, f"{method} memory", peak <= args.max_memory_gb,
                      f"{peak:.2f} GB <= {args.max_memory_gb} GB")
        if not args.no_smoke:
            from xml_plugin.cli import main as run_main
            smoke = [w for w in words if w[0] not in ("trainer.max_epochs", "trainer.iterations_per_epoch")]
            if args.tiny:  # the logic only: one trial, one epoch of two steps
                smoke += [("general.n_trials", 1), ("trainer.max_epochs", 1), ("trainer.iterations_per_epoch", 2)]
            t0 = time.perf_counter()
            code = run_main(["--experiment_name", "smoke_gpu", "--config_general", "smoke", "--methods", "baseline",
                             "xml", "--no_progress", *_cli_words(smoke)])
            report = Path(tmp) / "smoke_gpu" / "report.csv"
            paired = [r for r in report.read_text().splitlines()[1:] if ",baseline," in r] if report.is_file() else []
            results["smoke_job_s"] = time.perf_counter() - t0
            print(f"smoke fair job (baseline vs xml, fine-tuned): {results['smoke_job_s']:.0f} s", flush=True)
            check(results, "smoke fair job", code == 0 and len(paired) > 0,
                  f"exit {code}, {len(paired)} paired rows in report.csv")
    results["seconds"] = time.perf_counter() - t_all
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(c["ok"] for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
