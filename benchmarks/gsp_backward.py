"""GSP's transport backward: analytic (implicit differentiation) vs unrolled autograd, memory and time.

Usage: ``python benchmarks/gsp_backward.py [--batch 32 --prototypes 64 --locations 49 --dim 128 --iterations 100]``

For each variant and each scope ("transport": ``gsp_transport`` on a cost tensor; "pooling": the whole
:class:`GeneralizedSumPooling` from a feature map) it reports
- the bytes autograd saves for the backward (counted with ``torch.autograd.graph.saved_tensors_hooks``);
- the peak resident-memory growth of one forward+backward, in a fresh subprocess per measurement (VmHWM
  from /proc after a warm-up and ``malloc_trim``; torch's CPU allocations are invisible to tracemalloc);
- the median wall time of forward+backward (the machine's other load shows in it: compare medians).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory import saved_bytes, status_kib  # noqa: E402

from xml_plugin.models.gsp import GeneralizedSumPooling, gsp_transport  # noqa: E402


def _make(args, backward: str, scope: str):
    """``(forward, run)``: ``forward()`` builds the loss, ``run()`` does one forward+backward."""
    torch.manual_seed(0)
    if scope == "transport":
        cost = (2 * torch.rand(args.batch, args.prototypes, args.locations)).requires_grad_()
        w_pi = torch.randn_like(cost)
        leaves = [cost]

        def forward():
            pi, rho = gsp_transport(cost, 0.3, 5.0, args.iterations, backward=backward)
            return (pi * w_pi).sum() + rho.sum()
    else:
        pool = GeneralizedSumPooling(args.dim, num_prototypes=args.prototypes, iterations=args.iterations,
                                     backward=backward, init="random")
        side = int(round(args.locations ** 0.5))
        fmap = torch.randn(args.batch, args.dim, side, args.locations // side).requires_grad_()
        leaves = [fmap, pool.prototypes]

        def forward():
            out = pool(fmap)
            return out.embedding.pow(2).sum() + out.histogram.pow(2).sum()

    def run():
        forward().backward()
        for leaf in leaves:
            leaf.grad = None
    return forward, run


def child(args) -> None:
    """One measurement in a fresh process: peak RSS growth of one forward+backward (after a warm-up).

    After the warm-up, glibc's ``malloc_trim`` hands the freed heap pages back, so that the measured call's
    allocations show in the resident set; the peak (VmHWM) is reset just before that call (Linux).
    """
    _, run = _make(args, args.child_backward, args.child_scope)
    run()  # warm-up: one-off buffers (thread pools, kernels) are not part of the backward's cost
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        after_reset = status_kib("VmHWM")
    except OSError:
        after_reset = None
    run()
    if after_reset is not None:
        peak = status_kib("VmHWM")
    else:  # no reset available: the lifetime peak, a lower bound of the growth
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_kib": peak - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prototypes", type=int, default=64)
    parser.add_argument("--locations", type=int, default=49)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rss-runs", type=int, default=3, help="subprocesses per RSS measurement (median)")
    parser.add_argument("--child-backward", help=argparse.SUPPRESS)
    parser.add_argument("--child-scope", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_backward:
        child(args)
        return
    print(f"B={args.batch} m={args.prototypes} n={args.locations} d={args.dim} iterations={args.iterations} "
          f"torch {torch.__version__} threads={torch.get_num_threads()}")
    header = f"{'scope':<10} {'backward':<9} {'saved for backward':>19} {'peak RSS growth':>16} {'fwd+bwd ms':>11}"
    print(header)
    print("-" * len(header))
    for scope in ("transport", "pooling"):
        for backward in ("analytic", "unrolled"):
            forward, run = _make(args, backward, scope)
            saved = saved_bytes(forward)
            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run()
                times.append(1e3 * (time.perf_counter() - t0))
            rss = []
            for _ in range(args.rss_runs):
                cmd = [sys.executable, os.path.abspath(__file__), "--child-backward", backward, "--child-scope", scope,
                       "--batch", str(args.batch), "--prototypes", str(args.prototypes),
                       "--locations", str(args.locations), "--dim", str(args.dim),
                       "--iterations", str(args.iterations)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rss.append(json.loads(out.strip().splitlines()[-1])["rss_kib"])
            print(f"{scope:<10} {backward:<9} {saved / 2**20:>15.2f} MiB {statistics.median(rss) / 1024:>12.2f} MiB "
                  f"{statistics.median(times):>11.1f}")


if __name__ == "__main__":
    main()
