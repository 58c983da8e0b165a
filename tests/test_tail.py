"""The tail regime: the last trunk blocks train from the cached output of the frozen ones, with their own learning
rate (optimizer.options.trunk_lr)."""
from __future__ import annotations

import numpy as np
import torch

from xml_plugin import config as C
from xml_plugin.engine import train as T
from xml_plugin.protocol.experiment import Experiment


def _fold(tiny_cfg, tmp_path, trunk_lr):
    cfg = tiny_cfg(**{"trunk": {"name": "tiny_cnn", "pretrained": False, "frozen_blocks": -1},
                      "optimizer.options.trunk_lr": trunk_lr, "trainer.max_epochs": 1, "trainer.freeze_bn": True,
                      "general.methods": ["baseline"], "search.mode": "none"})
    exp = Experiment(cfg, f"tail_{trunk_lr}", progress=False)
    ctx = exp.setup()
    assert ctx.frozen_blocks == 1 and ctx.source.from_cache  # block 0 cached, block 1 trains
    ccfg = C.resolve(exp.method_config("baseline"))
    tr, va = exp.split.folds[0]
    run = tmp_path / f"run_{trunk_lr}"
    T.train_fold(ccfg, ctx, np.asarray(tr), np.asarray(va), run, seed=0)
    trained = torch.load(run / "best.pt", weights_only=False)["model"]
    start = T.build_head(ccfg, ctx.trunk, ctx.frozen_blocks).trainable_state_dict()
    return start, trained


def test_trunk_lr_zero_keeps_the_tail_and_trains_the_head(tiny_cfg, tmp_path):
    start, trained = _fold(tiny_cfg, tmp_path, 0.0)
    tail = [k for k in start if k.startswith("tail.") and "weight" in k]
    assert tail and all(torch.equal(start[k], trained[k]) for k in tail)  # lr 0: unchanged
    assert not torch.equal(start["embedder.proj.weight"], trained["embedder.proj.weight"])  # the head trained


def test_trunk_lr_trains_the_tail(tiny_cfg, tmp_path):
    start, trained = _fold(tiny_cfg, tmp_path, 1e-3)
    conv = [k for k in start if k.startswith("tail.") and k.endswith("0.weight")]
    assert conv and not torch.equal(start[conv[0]], trained[conv[0]])


def test_tail_preset_trains_mobilenets_last_320_block_and_conv():
    from xml_plugin.models.trunks import MOBILENET_V2_SPLIT
    cfg = C.load({"config_models": ["tail"]})
    k = cfg["trunk"]["frozen_blocks"]
    assert k == -2 and MOBILENET_V2_SPLIT[k] == (17, 18) and MOBILENET_V2_SPLIT[-1] == (18, 19)
    assert cfg["optimizer"]["options"]["trunk_lr"] < cfg["optimizer"]["options"]["lr"]
