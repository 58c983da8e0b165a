"""AXBN's Kalman gain over iterations for gain_interval N = 1 and N = 100 (the paper's constants q = 1, r = 0.01,
p0 = 1, batch 32), from the module itself: writes docs/img/axbn_gain.png.

    python benchmarks/axbn_gain.py [--iterations 300] [--out docs/img/axbn_gain.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def gains(interval: int, iterations: int, batch: int = 32, dim: int = 8) -> list:
    from pytorch_metric_learning import losses

    from xml_plugin.losses.xbn import CrossBatchNormMemory
    torch.manual_seed(0)
    w = CrossBatchNormMemory(losses.ContrastiveLoss(), dim, memory_size=4 * batch, adaptation="axbn",
                             gain_interval=interval)
    out = []
    for _ in range(iterations):
        w(torch.randn(batch, dim), torch.randint(0, 8, (batch,)))
        out.append(w.last_gain)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--out", default=str(REPO / "docs" / "img" / "axbn_gain.png"))
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for n, style in ((1, "-"), (100, "-")):
        g = gains(n, args.iterations)
        ax.plot(range(1, len(g) + 1), g, style, label=f"gain_interval N = {n}", lw=1.5)
        print(f"N = {n}: gain at iterations 1, 2, 10, 50, 100, 101: "
              + ", ".join(f"{g[i - 1]:.4f}" for i in (1, 2, 10, 50, 100, 101)))
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("Kalman gain K")
    ax.set_title("AXBN gain (q = 1, r = 0.01, p0 = 1, batch 32)")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
