"""The two assignment rules of XML's histogram operator on a toy (docs/xml.md, "Assignment rules").

Each toy image has 16 local features in 2-D near 12 cluster centres. For each rule, ``PrototypePooling`` learns its
prototypes on 30 passes over the same 24 images (k-center seeds, RLS with forgetting 0.9, prior 1); then, on those
images, the mean relative GAP reconstruction error ``||z - W^T h|| / ||z||``, the prototypes never chosen and the
effective number ``exp(entropy)`` of the mean histogram (engine/diagnostics.py), and the share of local features that
the other rule would send elsewhere with the same prototypes. Prints a markdown table; a few seconds on one core.

    python benchmarks/xml_rules_toy.py
"""
from __future__ import annotations

import argparse

import torch

from xml_plugin.engine.diagnostics import gap_reconstruction_error, prototype_usage
from xml_plugin.models.xml_pooling import PrototypePooling, assignment_scores


def clustered_maps(num_images=24, clusters=12, n_side=4, noise=0.05, seed=0):
    """Feature maps [N, 2, n_side, n_side] whose local features sit near a few 2-D cluster centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, 2, generator=g) * 3.0  # [K, 2]
    n = n_side * n_side
    which = torch.randint(clusters, (num_images, n), generator=g)  # [N, n]
    local = centres[which] + noise * torch.randn(num_images, n, 2, generator=g)  # [N, n, 2]
    return local.transpose(1, 2).reshape(num_images, 2, n_side, n_side)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prototypes", type=int, nargs="+", default=[3, 6, 24, 64])
    ap.add_argument("--passes", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    maps = clustered_maps()
    local = maps.flatten(2).transpose(1, 2)  # [N, n, 2]
    print("| rule | m | GAP error | never chosen | effective number | assignments the other rule changes |")
    print("|---|---|---|---|---|---|")
    for rule, other in (("inner_product", "nearest"), ("nearest", "inner_product")):
        for m in args.prototypes:
            torch.manual_seed(0)
            pool = PrototypePooling(2, num_prototypes=m, forgetting=0.9, init="kcenter", assignment_rule=rule).train()
            for _ in range(args.passes):
                pool(maps)
            out = pool.eval()(maps)
            usage = prototype_usage(out.histogram)
            mine = assignment_scores(local, pool.prototypes, rule).argmax(1)
            theirs = assignment_scores(local, pool.prototypes, other).argmax(1)
            changed = float((mine != theirs).float().mean())
            print(f"| {rule} | {m} | {gap_reconstruction_error(out.embedding, out.histogram, pool.prototypes):.3f} | "
                  f"{usage['unused_prototypes']:.0f} | {usage['effective_prototypes']:.1f} | {100 * changed:.0f}% |")


if __name__ == "__main__":
    main()
