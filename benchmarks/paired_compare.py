"""Paired differences between two methods of two finished experiments that used the same seeds (same data set, folds
and budget of reproductions), from their reproductions.csv files, with the report's own paired-t intervals.

    python benchmarks/paired_compare.py EXP_A METHOD_A EXP_B METHOD_B     # METHOD_A - METHOD_B, paired by seed

Example (docs/results.md): was XML's gain on cards its regulariser, or the multi-similarity parameters its search found?
    python benchmarks/paired_compare.py experiments/cards_frozen xml experiments/cards_baseline_at_xml_params baseline
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def records(folder: str, method: str, label: str) -> list:
    with open(Path(folder) / "reproductions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == method and r["embedding"] != "fold"]
    if not rows:
        raise SystemExit(f"error: no reproductions of {method!r} in {folder}/reproductions.csv")
    return [dict(r, method=label, seed=int(r["seed"]), value=float(r["value"])) for r in rows]


def main(argv) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    from xml_plugin.protocol.report import _metric_label, paired_differences
    a, b = f"{argv[1]} ({argv[0]})", f"{argv[3]} ({argv[2]})"
    diffs = paired_differences(records(argv[0], argv[1], a) + records(argv[2], argv[3], b), reference=b)
    print(f"| {a} - {b} | Embedding | Metric | difference (points) | n | verdict |\n|---|---|---|---:|---:|---|")
    for d in diffs:
        print(f"| | {d['embedding']} | {_metric_label(d['metric'])} | "
              f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f} | {d['n']} | {d['verdict']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
