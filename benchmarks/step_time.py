"""Time and memory of one full training step: GAP+MS vs XML+MS vs GSP+MS (analytic and unrolled backward).

Usage: ``python benchmarks/step_time.py [--steps 10 --warmup 2 --threads 2 --batch_size 32 --image_size 224
--trunk mobilenet_v2 --json results.json]``

A step is what the trainer does on uncached images (``xml_plugin/engine/train.py``): the whole trunk (trainable,
train mode, BatchNorm layers frozen in eval mode like ``trainer.freeze_bn``) -> 1x1 embedder (128) -> pooling ->
loss -> backward -> SGD step, on a fixed batch of random images (8 classes x 4 for batch 32).

Time: every variant is built once in this process; after ``--warmup`` steps each, the ``--steps`` measured steps run
round-robin (variant order rotated every round), so a change of the machine's load hits all variants alike.
Reported: median and interquartile range of the step's wall time, and the ratio of medians to GAP.

Memory, two measures (each variant measured in a fresh subprocess, after a warm-up step so that weights,
gradients, momentum buffers, XML's prototypes and thread pools already exist):
- ``peak RSS growth``: the resident-set peak during one step minus the resident set just before it. Before the step
  glibc's ``malloc_trim`` returns freed heap pages and the peak counter (VmHWM) is reset through
  ``/proc/self/clear_refs``; without that reset (not Linux) it falls back to ``getrusage`` ru_maxrss, whose
  lifetime peak includes the identical warm-up steps. It counts everything the step allocates (activations kept
  for backward, gradient temporaries, the loss's matrices). torch's CPU allocator has no cache, so freed tensors
  do not hide allocations.
- ``saved for backward``: bytes of the tensors autograd keeps between forward and backward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``; a tensor saved twice counts twice): deterministic, load-independent.
The memory target (analytic < unrolled) is judged on this exact count: the two GSP backwards differ by a few MiB
(the unrolled solver keeps a few ``[B, n]`` vectors per iteration) while a step's RSS growth is ~2.5 GiB of trunk
activations whose run-to-run spread is larger than that difference; the RSS column shows the step's total.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory import saved_bytes, status_kib  # noqa: E402

from pytorch_metric_learning.losses import MultiSimilarityLoss  # noqa: E402

import xml_plugin  # noqa: E402,F401  (registers the components)
from xml_plugin import registry  # noqa: E402
from xml_plugin.engine.model import EmbeddingModel, split_trunk  # noqa: E402
from xml_plugin.engine.train import _freeze_bn  # noqa: E402  (the trainer's own: BN in eval mode, still trained)
from xml_plugin.losses.cross_batch import CrossBatchMetricLoss  # noqa: E402
from xml_plugin.models.embedder import Conv1x1Embedder  # noqa: E402
from xml_plugin.models.gsp import GeneralizedSumPooling  # noqa: E402
from xml_plugin.models.pooling import GlobalAveragePooling  # noqa: E402
from xml_plugin.models.xml_pooling import PrototypePooling  # noqa: E402

VARIANTS = ("GAP+MS", "XML+MS", "GSP+MS analytic", "GSP+MS unrolled")
EMBEDDING = 128
PROTOTYPES = 64
PER_CLASS = 4
LR = 1e-3


def _pooling(variant: str) -> nn.Module:
    if variant == "GAP+MS":
        return GlobalAveragePooling(EMBEDDING)
    if variant == "XML+MS":
        return PrototypePooling(EMBEDDING, num_prototypes=PROTOTYPES)
    backward = variant.split()[-1]
    return GeneralizedSumPooling(EMBEDDING, num_prototypes=PROTOTYPES, backward=backward, init="random")


def _loss(variant: str) -> nn.Module:
    base = MultiSimilarityLoss()
    return CrossBatchMetricLoss(base, lam=1.0) if variant == "XML+MS" else base


class Step:
    """One variant: model, loss, optimizer and a fixed random batch; ``__call__`` runs one training step."""

    def __init__(self, variant: str, trunk, images: torch.Tensor, labels: torch.Tensor):
        torch.manual_seed(0)
        frozen, tail = split_trunk(trunk, 0)  # nothing frozen: the whole trunk is trained (a copy per variant)
        self.model = EmbeddingModel(frozen, tail, Conv1x1Embedder(trunk.out_channels, size=EMBEDDING), _pooling(variant))
        self.loss = _loss(variant)
        self.needs_histograms = getattr(self.loss, "needs_histograms", False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
        self.images, self.labels = images, labels

    def forward(self) -> torch.Tensor:
        out = self.model(self.images)
        if self.needs_histograms:
            return self.loss(out.embedding, self.labels, histograms=out.histogram)
        return self.loss(out.embedding, self.labels)

    def __call__(self) -> float:
        self.model.train()
        self.loss.train()
        _freeze_bn(self.model)
        loss = self.forward()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def make_batch(batch_size: int, image_size: int):
    if batch_size % PER_CLASS:
        raise ValueError(f"--batch_size must be a multiple of {PER_CLASS} (classes x {PER_CLASS}), got {batch_size}")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    labels = torch.arange(batch_size // PER_CLASS).repeat_interleave(PER_CLASS)
    return images, labels


def build_trunk(name: str):
    return registry.build("trunk", {"name": name, "options": {"pretrained": True}})


def child(args) -> None:
    """Fresh process: peak RSS growth of one step of ``args.child`` and the bytes saved for its backward."""
    torch.set_num_threads(args.threads)
    images, labels = make_batch(args.batch_size, args.image_size)
    step = Step(args.child, build_trunk(args.trunk), images, labels)
    step()  # warm-up: momentum buffers, gradients, XML prototypes exist from here on
    step.model.train()
    _freeze_bn(step.model)
    saved = saved_bytes(step.forward)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    method = "VmHWM"
    try:
        before = status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        method = "ru_maxrss"
        before = status_kib("VmRSS") if os.path.exists("/proc/self/status") else 0
    step()
    peak = status_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_growth_kib": peak - before, "saved_bytes": saved, "method": method}))


def measure_memory(args, variant: str) -> Dict[str, float]:
    """Median over ``--mem_runs`` fresh processes of the peak RSS growth; the saved bytes (identical every run)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--trunk", args.trunk,
           "--threads", str(args.threads), "--batch_size", str(args.batch_size), "--image_size", str(args.image_size)]
    runs = []
    for _ in range(args.mem_runs):
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"memory measurement of {variant} failed:\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"rss_growth_kib": statistics.median(r["rss_growth_kib"] for r in runs),
            "rss_growth_runs_kib": [r["rss_growth_kib"] for r in runs],
            "saved_bytes": runs[0]["saved_bytes"], "method": runs[0]["method"]}


def quartiles(values: List[float]):
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunk", default="mobilenet_v2")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--mem_runs", type=int, default=1, help="fresh processes per variant for the RSS (median)")
    parser.add_argument("--no_memory", action="store_true", help="skip the subprocess memory measurements")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (for an interquartile range), got {args.steps}")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"{args.trunk}, batch {args.batch_size} ({args.batch_size // PER_CLASS} classes x {PER_CLASS}), "
          f"{args.image_size} px, embedding {EMBEDDING}, {PROTOTYPES} prototypes, SGD; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    images, labels = make_batch(args.batch_size, args.image_size)
    trunk = build_trunk(args.trunk)
    steps = {v: Step(v, trunk, images, labels) for v in VARIANTS}
    for _ in range(args.warmup):
        for v in VARIANTS:
            steps[v]()
    times: Dict[str, List[float]] = {v: [] for v in VARIANTS}
    t_start = time.perf_counter()
    for r in range(args.steps):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]  # rotate: no variant always first
        for v in order:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(1e3 * (time.perf_counter() - t0))
    print(f"timing: {args.steps} rounds in {time.perf_counter() - t_start:.0f} s")
    del steps
    gc.collect()

    memory = {v: measure_memory(args, v) for v in VARIANTS} if not args.no_memory else {}
    load_after = os.getloadavg()

    results = {}
    gap_median = statistics.median(times["GAP+MS"])
    header = (f"{'variant':<16} {'median ms':>10} {'IQR ms':>15} {'/ GAP':>6} {'peak RSS growth':>16} "
              f"{'saved for bwd':>15} {'saved - GAP':>12}")
    print(header)
    print("-" * len(header))
    for v in VARIANTS:
        q1, med, q3 = quartiles(times[v])
        mem = memory.get(v, {})
        results[v] = {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "ratio_to_gap": med / gap_median,
                      "times_ms": times[v], "peak_rss_growth_mib": mem.get("rss_growth_kib", float("nan")) / 1024,
                      "saved_for_backward_mib": mem.get("saved_bytes", float("nan")) / 2 ** 20,
                      "memory_method": mem.get("method"),
                      "peak_rss_growth_runs_mib": [k / 1024 for k in mem.get("rss_growth_runs_kib", [])]}
        r = results[v]
        extra = r["saved_for_backward_mib"] - memory.get("GAP+MS", {}).get("saved_bytes", float("nan")) / 2 ** 20
        print(f"{v:<16} {med:>10.0f} {f'{q1:.0f}-{q3:.0f}':>15} {r['ratio_to_gap']:>6.3f} "
              f"{r['peak_rss_growth_mib']:>12.0f} MiB {r['saved_for_backward_mib']:>11.2f} MiB {extra:>8.2f} MiB")

    targets = [
        ("XML within 10% of GAP", results["XML+MS"]["ratio_to_gap"] <= 1.10,
         f"ratio {results['XML+MS']['ratio_to_gap']:.3f}"),
        ("GSP within 25% of GAP (analytic backward, the default)",
         results["GSP+MS analytic"]["ratio_to_gap"] <= 1.25, f"ratio {results['GSP+MS analytic']['ratio_to_gap']:.3f}"),
    ]
    if memory:
        a, u = results["GSP+MS analytic"], results["GSP+MS unrolled"]
        targets.append(("analytic backward uses less memory than unrolled (saved for backward)",
                        a["saved_for_backward_mib"] < u["saved_for_backward_mib"],
                        f"saved {a['saved_for_backward_mib']:.2f} vs {u['saved_for_backward_mib']:.2f} MiB "
                        f"(peak RSS growth {a['peak_rss_growth_mib']:.0f} vs {u['peak_rss_growth_mib']:.0f} MiB, "
                        f"the whole step)"))
    print()
    for name, ok, detail in targets:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "child"}, "torch": torch.__version__,
                       "load_average_before": load_before, "load_average_after": load_after, "results": results,
                       "targets": [{"target": n, "pass": bool(ok), "detail": d} for n, ok, d in targets]}, f, indent=2)


if __name__ == "__main__":
    main()
