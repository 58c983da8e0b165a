"""Several processes for one model: 2 processes (torchrun, gloo on 127.0.0.1) x 16 samples train as one process
with the 32-sample global batch, for every method whose cross-batch part sees the whole batch; a 2-process fold ends
as the 1-process fold; a group killed mid-fold resumes from its checkpoint.

The references are computed here, in the pytest process, by the ordinary single-process ``train_fold``. Run as a
script (``torchrun ... tests/test_distributed.py MODE OUT METHOD``) this file is the worker.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_overrides  # noqa: E402  (also registers the tiny trunk)
from xml_plugin import config as C  # noqa: E402
from xml_plugin.engine import distributed as D  # noqa: E402
from xml_plugin.engine import train as T  # noqa: E402
from xml_plugin.protocol.experiment import method_config  # noqa: E402

STEP_METHODS = ["baseline", "xml", "gsp", "xbn", "axbn"]
CUT = 0  # the killed group dies right after epoch 0's checkpoint
TOL = 1e-5  # one step
FOLD_TOL = 1e-4  # 6 steps: float32 rounding (another summation order in the all-reduce and the RLS sums) accumulates
PROTOTYPES = [("pooling.options.num_prototypes", 8)]
MEMORY = [("loss_wrapper.options.memory_size", 48), ("loss_wrapper.options.warmup_iterations", 0)]
OVERRIDES = {"xml": PROTOTYPES,
             # a k-center pool of 256 local features: filled (and the prototypes set) by the first global batch
             "gsp": PROTOTYPES + [("pooling.options.iterations", 10), ("pooling.options.init_features", 32)],
             "xbn": MEMORY, "axbn": MEMORY}


# ---------------------------------------------------------------------------------------------------------------------
# the tiny problem, identical in every process

class FixedCache:
    """Frozen-trunk features made here: 12 classes x 8 images of [8, 8, 8] (class pattern + noise), 2 views each."""

    views = 2

    def __init__(self, n_classes: int = 12, per_class: int = 8):
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(n_classes, 8, 8, 8, generator=g)
        self.labels = np.repeat(np.arange(n_classes), per_class)
        base = centres[self.labels] + 0.7 * torch.randn(len(self.labels), 8, 8, 8, generator=g)
        self.feats = torch.stack([base, base + 0.2 * torch.randn(base.shape, generator=g)], dim=1).relu()  # [N, 2, ...]

    def train_features(self, idx, views, pooled=False):
        assert not pooled, "this cache holds maps only"
        return self.feats[torch.as_tensor(idx), torch.as_tensor(views)]

    def eval_features(self, idx, pooled=False):
        return self.feats[torch.as_tensor(idx), 0]


def context():
    import tiny
    cache = FixedCache()
    ctx = T.RunContext(None, cache.labels, T.FeatureSource(None, cache), tiny.tiny_cnn(), 1, torch.device("cpu"), False)
    idx = np.arange(len(cache.labels))
    return ctx, idx[cache.labels < 8], idx[cache.labels >= 8]  # train: 8 classes, validation: 4


def method_cfg(method: str, iterations: int, epochs: int):
    overrides = tiny_overrides(Path("/nonexistent"), **{
        "trainer.batch_size": 32, "trainer.iterations_per_epoch": iterations, "trainer.max_epochs": epochs,
        # plain SGD: the update is proportional to the gradient, so a wrongly scaled gradient shows (Adam's first
        # step would hide a constant factor)
        "optimizer": {"name": "SGD", "options": {"lr": 0.5}}})
    cfg = C.load({}, overrides, presets=C.presets_for({}, overrides))
    return C.resolve(method_config(cfg, method, OVERRIDES.get(method, [])))


def train(method: str, run_dir: Path, iterations: int, epochs: int, on_epoch=None):
    """``train_fold`` on the tiny problem; returns (result, the trained model's and loss's states on this rank)."""
    ctx, tr, va = context()
    built = {}
    build_head, build_loss = T.build_head, T.build_loss
    T.build_head = lambda *a, **k: built.setdefault("model", build_head(*a, **k))
    T.build_loss = lambda *a, **k: built.setdefault("loss", build_loss(*a, **k))
    try:
        res = T.train_fold(method_cfg(method, iterations, epochs), ctx, tr, va, run_dir, seed=7, on_epoch=on_epoch)
    finally:
        T.build_head, T.build_loss = build_head, build_loss
    states = {"model": {k: v.detach().clone() for k, v in built["model"].trainable_state_dict().items()},
              "loss": {k: v.detach().clone() for k, v in built["loss"].state_dict().items()}} if built else None
    return res, states


# ---------------------------------------------------------------------------------------------------------------------
# the worker (torchrun ... tests/test_distributed.py MODE OUT METHOD)

def worker(mode: str, out: Path, method: str) -> None:
    """``both``: one step of every method of STEP_METHODS (``out/step``), then a whole fold of ``method``
    (``out/whole``); ``fold``: a whole fold (``out``); ``kill``: the same, but rank 1 dies after epoch CUT."""
    torch.set_num_threads(1)
    D.init_from_env()
    r = D.rank()
    if mode == "both":
        for m in STEP_METHODS:
            res, states = train(m, out / "step" / m, 1, 1)
            torch.save({"result": res, "states": states}, out / "step" / f"{m}.rank{r}.pt")
        out = out / "whole"

    def die(epoch, metrics):
        if mode == "kill" and epoch == CUT and r == 1:
            os._exit(3)  # killed after the checkpoint: torchrun then stops the whole group
    res, states = train(method, out / method, 3, 2, on_epoch=die)
    torch.save({"result": res, "states": states}, out / f"{method}.rank{r}.pt")


def torchrun(tmp: Path, mode: str, method: str, check: bool = True) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, mode, str(tmp), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_close(a: dict, b: dict, what: str, tol: float = TOL) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), f"{what}: {k} differs by {(a[k] - b[k]).abs().max()}"
        else:
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def assert_same_history(a, b):
    assert len(a) == len(b)
    for ha, hb in zip(strip(a), strip(b)):
        assert ha.keys() == hb.keys()
        for k in ha:
            assert ha[k] == pytest.approx(hb[k], abs=FOLD_TOL, rel=FOLD_TOL), k


# ---------------------------------------------------------------------------------------------------------------------
# the tests

FOLD_METHOD = "xml"


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """One torchrun launch (process start-up is the slow part): the steps of every method, then a whole fold."""
    out = tmp_path_factory.mktemp("group")
    torchrun(out, "both", FOLD_METHOD)
    return out


def test_one_step_of_two_processes_is_one_step_of_the_global_batch(group, tmp_path):
    for method in STEP_METHODS:
        ref, ref_states = train(method, tmp_path / "single" / method, 1, 1)
        T.seed_everything(7)  # as train_fold does before building the model
        start = T.build_head(method_cfg(method, 1, 1), context()[0].trunk, 1).trainable_state_dict()
        moved = max(float((ref_states["model"][k] - v).abs().max()) for k, v in start.items() if v.is_floating_point())
        assert moved > 1e-3, f"{method}: the step barely moved the model ({moved}); the comparison would be vacuous"
        ranks = [torch.load(group / "step" / f"{method}.rank{r}.pt", weights_only=False) for r in (0, 1)]
        for r, got in enumerate(ranks):
            assert got["result"]["history"][0]["train_loss"] == pytest.approx(ref["history"][0]["train_loss"],
                                                                              abs=TOL, rel=TOL), method
            for part in ("model", "loss"):  # parameters and buffers (prototypes, RLS state, memory, filter ...)
                assert_close(got["states"][part], ref_states[part], f"{method} rank {r} {part}")
        for part in ("model", "loss"):  # every rank ends with the very same state
            for k, v in ranks[0]["states"][part].items():
                assert torch.equal(v, ranks[1]["states"][part][k]), f"{method}: {part} {k} differs between ranks"
        if method == "gsp":
            assert ranks[0]["states"]["model"]["pooling.initialized"].item()  # initialised from the global batch
        if method == "xml":
            assert ranks[0]["states"]["model"]["pooling.initialized"].item()
        if method in ("xbn", "axbn"):
            assert int(ranks[0]["states"]["loss"]["queue_pointer"]) == 32  # the global batch was enqueued
        assert (group / "step" / method / "result.json").is_file()  # written by rank 0


def test_a_two_process_fold_and_a_killed_group_resumed_end_as_one_process(group, tmp_path):
    method = FOLD_METHOD
    ref, ref_states = train(method, tmp_path / "single", 3, 2)

    whole = group / "whole"
    got = torch.load(whole / f"{method}.rank0.pt", weights_only=False)
    assert_same_history(got["result"]["history"], ref["history"])
    assert got["result"]["best_epoch"] == ref["best_epoch"]
    for part in ("model", "loss"):
        assert_close(got["states"][part], ref_states[part], f"2-process fold {part}", FOLD_TOL)

    cut = tmp_path / "cut"
    killed = torchrun(cut, "kill", method, check=False)
    assert killed.returncode != 0
    ckpt = torch.load(cut / method / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == CUT + 1 and not (cut / method / "result.json").exists()
    torchrun(cut, "fold", method)
    resumed = torch.load(cut / f"{method}.rank0.pt", weights_only=False)["result"]
    assert resumed["history"][0]["seconds"] == ckpt["state"]["history"][0]["seconds"]  # epoch 0 came from the checkpoint
    assert_same_history(resumed["history"], ref["history"])
    best_ref = torch.load(tmp_path / "single" / "best.pt", weights_only=False)
    best_cut = torch.load(cut / method / "best.pt", weights_only=False)
    for part in ("model", "loss"):
        assert_close(best_cut[part], best_ref[part], f"resumed best.pt {part}", FOLD_TOL)
    assert json.loads((cut / method / "result.json").read_text())["epochs_run"] == 2


def test_a_batch_that_does_not_split_into_the_processes_is_a_config_error(monkeypatch):
    monkeypatch.setattr(D, "world_size", lambda: 3)
    monkeypatch.setattr(D, "rank", lambda: 1)
    assert list(D.local_part(np.arange(6))) == [2, 3]
    with pytest.raises(C.ConfigError, match="divisible by the number of processes"):
        D.local_part(np.arange(32))


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
