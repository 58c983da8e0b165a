"""Draw XML's 2-D toy: GAP as a convex combination of prototypes (docs/methods.md, XML), for docs/xml.md.

Each toy "image" is a set of 2-D local features drawn from a few clusters with image-specific mixing
weights. ``PrototypePooling`` learns its prototypes on a stream of such images (k-means++ seeds, then
recursive least squares); each panel shows a few images' local features, the prototypes, and every
image's GAP ``z`` beside its reconstruction ``W^T h`` from the histogram, for one number of prototypes.

    python benchmarks/xml_toy.py [--out docs/img/xml_toy.png] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from xml_plugin.models.xml_pooling import PrototypePooling  # noqa: E402

CENTRES = torch.tensor([[-3.0, -2.0], [-2.5, 2.5], [0.5, 0.0], [3.0, 2.0], [2.5, -2.5], [0.0, 4.0]])  # [K, 2]
SIDE = 6  # local features per image: SIDE x SIDE = 36


def toy_images(num_images: int, generator: torch.Generator, spread: float = 0.45) -> torch.Tensor:
    """Feature maps [N, 2, SIDE, SIDE]: per image, mixing weights over the clusters, then noisy draws."""
    k = CENTRES.shape[0]
    mix = torch.distributions.Dirichlet(torch.full((k,), 0.4)).sample((num_images,))  # [N, K]
    which = torch.multinomial(mix, SIDE * SIDE, replacement=True, generator=generator)  # [N, n]
    local = CENTRES[which] + spread * torch.randn(num_images, SIDE * SIDE, 2, generator=generator)  # [N, n, 2]
    return local.transpose(1, 2).reshape(num_images, 2, SIDE, SIDE)


def fit_pooling(num_prototypes: int, seed: int, steps: int = 60, batch: int = 16) -> PrototypePooling:
    """Learn prototypes as in training: seed on the first batch, then one RLS step per batch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pool = PrototypePooling(2, num_prototypes=num_prototypes, forgetting=0.95).train()
    for _ in range(steps):
        pool(toy_images(batch, gen))
    return pool.eval()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "img", "xml_toy.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prototypes", type=int, nargs="+", default=[2, 6, 24])
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed + 1000)
    shown = toy_images(4, torch.Generator().manual_seed(args.seed + 1000))  # the images drawn in every panel
    test = toy_images(200, torch.Generator().manual_seed(args.seed + 2000))  # for the error in the titles
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]

    fig, axes = plt.subplots(1, len(args.prototypes), figsize=(5.2 * len(args.prototypes), 5.8), sharex=True,
                             sharey=True)
    for ax, m in zip(axes, args.prototypes):
        pool = fit_pooling(m, args.seed)
        with torch.no_grad():
            out = pool(shown)
            approx = out.histogram @ pool.prototypes  # [N, 2] = W^T h
            t_out = pool(test)
            rel = ((t_out.embedding - t_out.histogram @ pool.prototypes).norm(dim=1).mean()
                   / t_out.embedding.norm(dim=1).mean()).item()
        local = shown.flatten(2).transpose(1, 2)  # [N, n, 2]
        for i, c in enumerate(colours):
            ax.scatter(local[i, :, 0], local[i, :, 1], s=14, color=c, alpha=0.55, linewidths=0)
        ax.scatter(pool.prototypes[:, 0], pool.prototypes[:, 1], marker="x", s=70, color="black", linewidths=2,
                   label="prototypes $w_k$", zorder=3)
        for i, c in enumerate(colours):
            z, a = out.embedding[i], approx[i]
            ax.plot([z[0], a[0]], [z[1], a[1]], color=c, linewidth=1.5, zorder=4)
            ax.scatter([z[0]], [z[1]], marker="o", s=110, color=c, edgecolors="black", linewidths=1.2, zorder=5,
                       label="GAP $z$" if i == 0 else None)
            ax.scatter([a[0]], [a[1]], marker="s", s=90, color="white", edgecolors=c, linewidths=2.2, zorder=5,
                       label="$W^T h$" if i == 0 else None)
        ax.set_title(f"m = {m} prototypes\nmean $\\|z - W^T h\\| / \\|z\\|$ = {rel:.3f} (200 images)", fontsize=11)
        ax.set_aspect("equal")
        ax.grid(alpha=0.25)
    axes[0].legend(loc="lower left", fontsize=9, framealpha=0.9)
    fig.suptitle("XML toy: local features of 4 images (dots, one colour per image); "
                 "each image's GAP (circle) vs its convex combination of prototypes (square)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out_path = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    print(out_path)
    return out_path


if __name__ == "__main__":
    main()
