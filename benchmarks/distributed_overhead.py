"""Cost of "cross-batch parts see the global batch" with several processes: the all-gathers per training step, as a
ratio to the step, and DDP's gradient all-reduce, on CPU with gloo.

Usage (2 processes on one machine, loopback):
    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        --master_port 29500 benchmarks/distributed_overhead.py [--iterations 60 --warmup 5 --json out.json]
Without torchrun it times one process with the whole global batch (the reference step).

The step is the engine's XML step on cached feature maps: random ``[b, 1280, 7, 7]`` float32 (MobileNetV2's last
block), 1x1 embedder 1280 -> 128, XML pooling (64 prototypes, hard assignment: the prototype recursion runs in
forward), ``CrossBatchMetricLoss(MultiSimilarityLoss)``, SGD; global batch ``--batch`` (default 32, 16 per process
with 2). Per step, on rank 0: the whole step (forward, gathers, loss, backward with DDP's all-reduce, optimizer step),
the time inside the all-gathers (embeddings, histograms, and the pooling's gather of histograms and embeddings for
the recursion), and the same step under ``DistributedDataParallel.no_sync()`` (no gradient all-reduce): the
difference is the all-reduce's cost. Medians over ``--iterations`` steps after ``--warmup``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from xml_plugin.engine import distributed as D  # noqa: E402
from xml_plugin.losses.cross_batch import CrossBatchMetricLoss  # noqa: E402
from xml_plugin.models.xml_pooling import PrototypePooling  # noqa: E402


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedder = nn.Conv2d(1280, 128, 1)
        self.pooling = PrototypePooling(128, num_prototypes=64)

    def forward(self, x):
        return self.pooling(self.embedder(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split over the processes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    world = D.init_from_env()
    torch.manual_seed(0)
    model = Head()
    loss_fn = CrossBatchMetricLoss(MultiSimilarityLoss(), lam=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    net = D.wrap_model(model)
    gather_seconds = [0.0]

    def timed(x):
        t = time.perf_counter()
        out = D.all_gather(x)
        gather_seconds[0] += time.perf_counter() - t
        return out
    D.set_gather_hooks(model, timed if world > 1 else None)
    plain_all_gather = D.all_gather

    def timed_batch(x):  # gather_batch's all-gather (module-level name looked up at call time)
        t = time.perf_counter()
        out = plain_all_gather(x)
        gather_seconds[0] += time.perf_counter() - t
        return out

    local = args.batch // world
    g = torch.Generator().manual_seed(1 + D.rank())
    x = torch.randn(local, 1280, 7, 7, generator=g).relu()
    y = torch.arange(args.batch) // 4  # 4 per class, as MPerClassSampler(m=4)

    def step(sync: bool) -> float:
        t0 = time.perf_counter()
        ctx = net.no_sync() if (world > 1 and not sync) else torch.enable_grad()
        with ctx:
            out = net(x)
            D.all_gather = timed_batch
            try:
                emb, hist = D.gather_batch(out.embedding, out.histogram)
            finally:
                D.all_gather = plain_all_gather
            loss = loss_fn(emb, y, histograms=hist)
            opt.zero_grad(set_to_none=True)
            (loss * world if world > 1 else loss).backward()
        opt.step()
        return time.perf_counter() - t0

    modes = (("step", True), ("step_without_allreduce", False)) if world > 1 else (("step", True),)
    times = {name: [] for name, _ in modes}
    gathers = {name: [] for name, _ in modes}
    for i in range(args.warmup + args.iterations):
        for name, sync in modes:  # interleaved, so that load drift on a shared machine hits both alike
            gather_seconds[0] = 0.0
            D.barrier()
            dt = step(sync)
            if i >= args.warmup:
                times[name].append(dt)
                gathers[name].append(gather_seconds[0])
    rows = {name: {"median_s": statistics.median(times[name]), "gather_median_s": statistics.median(gathers[name])}
            for name, _ in modes}
    if not D.is_main():
        return
    s = rows["step"]
    result = {"processes": world, "global_batch": args.batch, "per_process": local, "threads": torch.get_num_threads(),
              "step_ms": 1e3 * s["median_s"], "gather_ms": 1e3 * s["gather_median_s"],
              "gather_over_step": s["gather_median_s"] / s["median_s"]}
    if world > 1:
        nosync = rows["step_without_allreduce"]["median_s"]
        result.update(step_without_allreduce_ms=1e3 * nosync,
                      allreduce_ms=1e3 * (s["median_s"] - nosync),
                      allreduce_over_step=(s["median_s"] - nosync) / s["median_s"])
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
