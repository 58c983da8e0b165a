"""Per-iteration time of the project's training loop vs a bare pytorch-metric-learning loop doing the same work.

Usage: ``python benchmarks/loop_overhead.py [--iterations 50 --rounds 8 --warmup 20 --threads 2 --json results.json]``

Both loops train the same head on the same cached feature maps (random, float16 like the project's cache,
``[N, 1280, 7, 7]``, N = ``--classes`` x ``--per_class``): 1x1 embedder (1280 -> 128) -> global average pooling,
``MultiSimilarityLoss()``, batches of 32 from PML's ``MPerClassSampler`` (m = 4), Adam (lr 1e-3, weight decay 1e-4:
the project's default optimizer), on CPU with ``--threads`` threads.

- ``ours``: ``xml_plugin.engine.train.train_fold`` with ``trainer.logs false``, one epoch of ``--iterations``, the
  feature source being a real ``FeatureCache`` (files written by this script). Validation is excluded by replacing
  ``train.evaluate_indices`` with a constant for the duration of the call (the library is not changed).
  ``ours+logs`` is the same with ``trainer.logs true`` (record-keeper + TensorBoard, the config default).
- ``pml``: ``pytorch_metric_learning.trainers.MetricLossOnly`` with models ``{"trunk": embedder+GAP, "embedder":
  Identity}``, fed a Dataset whose items are ``(features, label)``, ``dataloader_num_workers=0`` (the project's
  cached path has no workers either).

An iteration's time is the time between two consecutive batches handed to the loop (ours: the feature source's
generator is wrapped; PML: ``end_of_iteration_hook``), so it covers fetching the batch, forward, loss, backward,
optimizer step and the loop's own bookkeeping. Each round runs every loop once (order rotated per round, so load
drift hits all); medians are over all iterations of all rounds (the first iteration of each run is dropped).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import samplers as pml_samplers  # noqa: E402
from pytorch_metric_learning import trainers as pml_trainers  # noqa: E402

import xml_plugin  # noqa: E402,F401  (registers the components)
from xml_plugin import config as C  # noqa: E402
from xml_plugin.engine import train as T  # noqa: E402
from xml_plugin.engine.cache import FeatureCache  # noqa: E402
from xml_plugin.engine.io import atomic_write_json  # noqa: E402
from xml_plugin.models.embedder import Conv1x1Embedder  # noqa: E402
from xml_plugin.models.pooling import GlobalAveragePooling  # noqa: E402
from xml_plugin.models.trunks import Trunk  # noqa: E402

CHANNELS, SIDE, EMBEDDING, BATCH, PER_BATCH_CLASS = 1280, 7, 128, 32, 4
LR, WEIGHT_DECAY = 1e-3, 1e-4
LOOPS = ("ours", "ours+logs", "pml")


def _stamp() -> Tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


def _intervals(stamps: List[Tuple[float, float]]) -> Dict[str, List[float]]:
    """Milliseconds between consecutive stamps, wall and CPU, the first interval (start-up) dropped."""
    a = np.asarray(stamps)
    d = 1e3 * np.diff(a, axis=0)[1:]
    return {"wall": [float(v) for v in d[:, 0]], "cpu": [float(v) for v in d[:, 1]]}


# ------------------------------------------------------------------ data
class _Labels:
    """The smallest data set the trainer needs when every input comes from the cache."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)


def write_cache(folder: Path, features: np.ndarray) -> FeatureCache:
    """A real FeatureCache (one view per image) holding ``features`` [N, C, h, w] float16."""
    cache = FeatureCache(folder, {"benchmark": "loop_overhead", "shape": list(features.shape)})
    cache.folder.mkdir(parents=True, exist_ok=True)
    np.save(cache.folder / "eval.npy", features)
    np.save(cache.folder / "train.npy", features[:, None])  # [N, 1, C, h, w]
    atomic_write_json(cache.folder / "meta.json", {"n": len(features), "views": 1})
    return cache.load()


class CachedFeatures(torch.utils.data.Dataset):
    """Items ``(features [C, h, w] float32, label)`` from float16 feature maps: the PML loop's data set."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(self.features[i].astype(np.float32)), int(self.labels[i])


# ------------------------------------------------------------------ ours
class _TimedSource(T.FeatureSource):
    """The project's feature source, stamping the time at which each training batch is handed over."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stamps: List[Tuple[float, float]] = []

    def train_batches(self, batches, rng):
        for x in super().train_batches(batches, rng):
            self.stamps.append(_stamp())
            yield x
        self.stamps.append(_stamp())  # the end of the last iteration


@contextlib.contextmanager
def no_validation():
    """``train_fold`` without the validation pass: ``evaluate_indices`` returns constants meanwhile."""
    original = T.evaluate_indices
    T.evaluate_indices = lambda *a, **k: {"precision_at_1": 0.0, "r_precision": 0.0, T.OBJECTIVE: 0.0}
    try:
        yield
    finally:
        T.evaluate_indices = original


def run_ours(cache: FeatureCache, labels: np.ndarray, iterations: int, seed: int, work: Path,
             logs: bool) -> Dict[str, List[float]]:
    cfg = C.load({}, [("trainer.batch_size", BATCH), ("trainer.iterations_per_epoch", iterations),
                      ("trainer.max_epochs", 1), ("trainer.patience", None), ("trainer.logs", logs),
                      ("embedder", {"name": "conv1x1", "size": EMBEDDING}), ("pooling", {"name": "gap"}),
                      ("loss", {"name": "multi_similarity", "options": {}}), ("miner", None), ("loss_wrapper", None),
                      ("sampler", {"name": "m_per_class", "options": {"m": PER_BATCH_CLASS}}),
                      ("optimizer", {"name": "Adam", "options": {"lr": LR, "weight_decay": WEIGHT_DECAY}})])
    cfg = C.resolve(cfg)
    # a "trunk" whose single block is entirely frozen: the model's input is the cached [B, 1280, 7, 7] map
    trunk = Trunk([nn.Identity()], CHANNELS, (0.0,) * 3, (1.0,) * 3, "cached", "none")
    source = _TimedSource(_Labels(labels), cache)
    ctx = T.RunContext(_Labels(labels), labels, source, trunk, 1, torch.device("cpu"), progress=False)
    idx = np.arange(len(labels))
    with no_validation():
        T.train_fold(cfg, ctx, idx, idx[:BATCH], work / f"ours-{logs}-{seed}", seed=seed)
    return _intervals(source.stamps)


# ------------------------------------------------------------------ bare PML
class HeadTrunk(nn.Module):
    """1x1 embedder -> GAP, returning the embedding tensor (PML's trainers want a tensor)."""

    def __init__(self):
        super().__init__()
        self.embedder = Conv1x1Embedder(CHANNELS, size=EMBEDDING)
        self.pooling = GlobalAveragePooling(EMBEDDING)

    def forward(self, x):
        return self.pooling(self.embedder(x)).embedding


def run_pml(features: np.ndarray, labels: np.ndarray, iterations: int, seed: int) -> Dict[str, List[float]]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    head = HeadTrunk()
    sampler = pml_samplers.MPerClassSampler(labels, m=PER_BATCH_CLASS, batch_size=BATCH,
                                            length_before_new_iter=BATCH * iterations)
    stamps: List[Tuple[float, float]] = []
    trainer = pml_trainers.MetricLossOnly(
        models={"trunk": head, "embedder": nn.Identity()},
        optimizers={"trunk_optimizer": torch.optim.Adam(head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)},
        batch_size=BATCH, loss_funcs={"metric_loss": pml_losses.MultiSimilarityLoss()},
        dataset=CachedFeatures(features, labels), sampler=sampler, iterations_per_epoch=iterations,
        data_device=torch.device("cpu"), dataloader_num_workers=0,
        end_of_iteration_hook=lambda trainer: stamps.append(_stamp()))
    trainer.train(num_epochs=1)
    return _intervals(stamps)


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50, help="training iterations per loop per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds; each runs every loop once")
    parser.add_argument("--warmup", type=int, default=20, help="iterations of an unmeasured first run of each loop")
    parser.add_argument("--classes", type=int, default=26)
    parser.add_argument("--per_class", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.iterations < 3:
        parser.error(f"--iterations must be >= 3, got {args.iterations}")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(args.classes), args.per_class)
    features = rng.standard_normal((len(labels), CHANNELS, SIDE, SIDE), dtype=np.float32).clip(0, None).astype(np.float16)
    load_before = os.getloadavg()
    print(f"{len(labels)} cached maps [{CHANNELS}, {SIDE}, {SIDE}] float16, {args.classes} classes; batch {BATCH} "
          f"(m={PER_BATCH_CLASS}); {args.iterations} iterations x {args.rounds} rounds per loop; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    times = {k: {"wall": [], "cpu": []} for k in LOOPS}
    with tempfile.TemporaryDirectory(prefix="loop_overhead.") as tmp:
        work = Path(tmp)
        cache = write_cache(work / "cache", features)
        runners = {"ours": lambda s, n: run_ours(cache, labels, n, s, work, logs=False),
                   "ours+logs": lambda s, n: run_ours(cache, labels, n, s, work, logs=True),
                   "pml": lambda s, n: run_pml(features, labels, n, s)}
        for name in LOOPS:  # warm-up: one-off costs (imports, thread pools) out of the way
            runners[name](999, max(3, args.warmup))
        for r in range(args.rounds):
            order = LOOPS[r % len(LOOPS):] + LOOPS[:r % len(LOOPS)]
            for name in order:
                t = runners[name](r, args.iterations)
                for kind in ("wall", "cpu"):
                    times[name][kind] += t[kind]
    load_after = os.getloadavg()

    results = {}
    ref = {kind: statistics.median(times["pml"][kind]) for kind in ("wall", "cpu")}
    header = (f"{'loop':<10} {'wall median':>11} {'wall IQR':>15} {'wall p10':>9} {'CPU median':>11} "
              f"{'wall / PML':>10} {'CPU / PML':>9} {'its':>5}")
    print("milliseconds per iteration")
    print(header)
    print("-" * len(header))
    for name in LOOPS:
        w, c = times[name]["wall"], times[name]["cpu"]
        q1, med, q3 = statistics.quantiles(w, n=4, method="inclusive")
        p10 = statistics.quantiles(w, n=10, method="inclusive")[0]
        results[name] = {"wall_median_ms": med, "wall_q1_ms": q1, "wall_q3_ms": q3, "wall_p10_ms": p10,
                         "wall_mean_ms": statistics.fmean(w), "cpu_median_ms": statistics.median(c),
                         "wall_ratio_to_pml": med / ref["wall"], "cpu_ratio_to_pml": statistics.median(c) / ref["cpu"],
                         "iterations": len(w)}
        r = results[name]
        print(f"{name:<10} {med:>11.2f} {f'{q1:.1f}-{q3:.1f}':>15} {p10:>9.2f} {r['cpu_median_ms']:>11.2f} "
              f"{r['wall_ratio_to_pml']:>10.3f} {r['cpu_ratio_to_pml']:>9.3f} {len(w):>5}")
    ratio = results["ours"]["wall_ratio_to_pml"]
    ok = bool(ratio <= 1.05)
    print(f"\n{'PASS' if ok else 'FAIL'}  our loop (logs off) within 5% of PML's MetricLossOnly: median wall ratio "
          f"{ratio:.3f} (CPU-time ratio {results['ours']['cpu_ratio_to_pml']:.3f})")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "load_average_before": load_before,
                       "load_average_after": load_after, "results": results,
                       "target": {"name": "within 5% of PML", "pass": ok, "ratio": ratio}}, f, indent=2)


if __name__ == "__main__":
    main()
