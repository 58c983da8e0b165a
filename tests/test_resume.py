"""Exact resume: for every method, a fold killed after an epoch and resumed ends as the uninterrupted fold does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from xml_plugin import config as C
from xml_plugin.engine import train as T
from xml_plugin.protocol.experiment import Experiment, method_config

EPOCHS, CUT = 3, 1  # killed after epoch 1's checkpoint, of 3
# small memories that wrap around and warm-ups and Kalman predictions that straddle the cut (6 iterations an epoch)
MEMORY = [("loss_wrapper.options.memory_size", 40), ("loss_wrapper.options.warmup_iterations", 4)]
PROTOTYPES = [("pooling.options.num_prototypes", 8)]
GSP = PROTOTYPES + [("pooling.options.iterations", 10), ("pooling.options.init_features", 32)]  # the transport solver's iterations: the slow part on CPU
OVERRIDES = {"xbm": MEMORY, "xbn": MEMORY, "axbn": MEMORY + [("loss_wrapper.options.gain_interval", 4)],
             "xml": PROTOTYPES, "gsp": GSP, "xml_gsp": GSP}
METHODS = ["baseline", "xml", "gsp", "xbm", "xbn", "axbn", "xml_gsp"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    overrides = tiny_overrides(tmp, **{"trainer.max_epochs": EPOCHS})
    exp = Experiment(C.load({}, overrides, presets=C.presets_for({}, overrides)), "resume", progress=False)
    exp.setup()
    return exp


def _states(snapshots):
    """Keeps the last checkpoint of a run (written before ``on_epoch`` is called): the final model and loss states."""
    def on_epoch(epoch, metrics, run_dir):
        if epoch == EPOCHS - 1:
            snapshots.update(torch.load(run_dir / "checkpoint.pt", weights_only=True))
    return on_epoch


def _assert_same_state(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("method", METHODS)
def test_interrupted_fold_resumes_exactly(experiment, tmp_path, method):
    cfg = C.resolve(method_config(experiment.base_cfg, method, OVERRIDES.get(method, [])))
    tr, va = (np.asarray(a) for a in experiment.split.folds[0])
    full_last, cut_last = {}, {}
    full_cb, cut_cb = _states(full_last), _states(cut_last)
    full = T.train_fold(cfg, experiment.ctx, tr, va, tmp_path / "full", seed=5,
                        on_epoch=lambda e, m: full_cb(e, m, tmp_path / "full"))

    def crash(epoch, metrics):
        if epoch == CUT:
            raise KeyboardInterrupt  # as if killed right after the epoch's checkpoint
    with pytest.raises(KeyboardInterrupt):
        T.train_fold(cfg, experiment.ctx, tr, va, tmp_path / "cut", seed=5, on_epoch=crash)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "result.json").exists()
    resumed = T.train_fold(cfg, experiment.ctx, tr, va, tmp_path / "cut", seed=5,
                           on_epoch=lambda e, m: cut_cb(e, m, tmp_path / "cut"))

    strip = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]
    assert len(strip(full)) == EPOCHS and strip(resumed) == strip(full)
    assert resumed["val"] == full["val"] and resumed["best_epoch"] == full["best_epoch"]
    best_full = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    best_cut = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)
    for part in ("model", "loss"):
        _assert_same_state(best_full[part], best_cut[part], f"best.pt {part}")
        _assert_same_state(full_last[part], cut_last[part], f"last {part}")
    if method in ("xbm", "xbn", "axbn"):  # the memory was in use and wrapped around: its state is not trivial
        assert int(full_last["loss"]["iteration"]) == EPOCHS * 6 and bool(full_last["loss"]["filled"])
