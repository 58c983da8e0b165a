"""The tail regime: the last trunk blocks train from the cached output of the frozen ones, with their own learning
rate (optimizer.options.trunk_lr)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xml_plugin import config as C
from xml_plugin.engine import train as T
from xml_plugin.protocol.experiment import Experiment


ADAM_BETAS = (0.9, 0.999)  # torch's defaults, which the default optimizer config keeps


def adam_move_bound(lr: float, steps: int, betas=ADAM_BETAS) -> float:
    """The most one weight can move in ``steps`` Adam steps of learning rate ``lr``, derived here from Adam's update.

    Step ``t`` is ``lr * m_t / (1 - b1^t) / sqrt(v_t / (1 - b2^t))`` (eps only shrinks it), ``m_t = (1 - b1) sum_s
    b1^(t-s) g_s``, ``v_t = (1 - b2) sum_s b2^(t-s) g_s^2``; Cauchy-Schwarz on ``sum b1^(t-s) |g_s|`` bounds its size by
    ``lr (1 - b1) / (1 - b1^t) sqrt((1 - b2^t) / (1 - b2)) sqrt(sum_{j<t} (b1^2 / b2)^j)`` (``lr`` at ``t = 1``),
    whatever the gradients (an L2 weight decay is part of the gradient). The move is at most the sum of the steps.
    """
    b1, b2 = betas
    return lr * sum((1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2))
                    * math.sqrt(sum((b1 * b1 / b2) ** j for j in range(t))) for t in range(1, steps + 1))


def _fold(tiny_cfg, tmp_path, trunk_lr, lr=1e-3):
    """One fold of one epoch; returns the seeded start (the weights train_fold starts from), the trained weights and
    the number of optimizer steps."""
    cfg = tiny_cfg(**{"trunk": {"name": "tiny_cnn", "pretrained": False, "frozen_blocks": -1},
                      "optimizer.options.trunk_lr": trunk_lr, "optimizer.options.lr": lr, "trainer.max_epochs": 1,
                      "trainer.freeze_bn": True, "general.methods": ["baseline"], "search.mode": "none"})
    exp = Experiment(cfg, f"tail_{trunk_lr}_{lr}", progress=False)
    ctx = exp.setup()
    assert ctx.frozen_blocks == 1 and ctx.source.from_cache  # block 0 cached, block 1 trains
    ccfg = C.resolve(exp.method_config("baseline"))
    assert ccfg["optimizer"]["name"] == "Adam" and not set(ccfg["optimizer"]["options"]) & {"betas", "amsgrad"}
    tr, va = exp.split.folds[0]
    run = tmp_path / f"run_{trunk_lr}_{lr}"
    T.train_fold(ccfg, ctx, np.asarray(tr), np.asarray(va), run, seed=0)
    trained = torch.load(run / "best.pt", weights_only=True)["model"]  # max_epochs 1: best.pt is after the epoch
    T.seed_everything(0)  # train_fold seeds, then builds the head: the same initial weights
    start = T.build_head(ccfg, ctx.trunk, ctx.frozen_blocks).trainable_state_dict()
    return start, trained, int(ccfg["trainer"]["iterations_per_epoch"])


def _largest_move(start, trained, key):
    return (trained[key] - start[key]).abs().max().item()


def _assert_trained_by(move, lr, steps):
    # at most Adam's bound (6.04 lr for 6 steps); at least half the steps: the head's and the tail's gradients keep
    # their sign over 6 small steps for many weights, whose normalised steps m/sqrt(v) then stay near 1 (measured
    # 2026-12-01: 5.71 lr for the head, 5.99 lr for the tail's conv over 6 steps). lr 0 and a step 10% too large
    # fall outside (a halved step lands at the floor: 2.86 and 3.00 lr).
    assert steps / 2 * lr <= move <= adam_move_bound(lr, steps), (move, lr, steps)


def test_trunk_lr_zero_keeps_the_tail_and_trains_the_head(tiny_cfg, tmp_path):
    start, trained, steps = _fold(tiny_cfg, tmp_path, 0.0)
    tail = [k for k in start if k.startswith("tail.") and "weight" in k]
    assert tail and all(torch.equal(start[k], trained[k]) for k in tail)  # lr 0: unchanged
    _assert_trained_by(_largest_move(start, trained, "embedder.proj.weight"), 1e-3, steps)  # the head trained


def test_lr_zero_moves_nothing(tiny_cfg, tmp_path):
    # the control that makes the comparison above meaningful: the seeded start is the weights training starts from
    start, trained, _ = _fold(tiny_cfg, tmp_path, 0.0, lr=0.0)
    assert start.keys() == trained.keys() and all(torch.equal(start[k], trained[k]) for k in start)


def test_trunk_lr_trains_the_tail(tiny_cfg, tmp_path):
    start, trained, steps = _fold(tiny_cfg, tmp_path, 1e-3)
    conv = [k for k in start if k.startswith("tail.") and k.endswith("0.weight")]
    assert conv
    _assert_trained_by(_largest_move(start, trained, conv[0]), 1e-3, steps)


def test_tail_preset_trains_mobilenets_last_320_block_and_conv():
    from xml_plugin.models.trunks import MOBILENET_V2_SPLIT
    cfg = C.load({"config_models": ["tail"]})
    k = cfg["trunk"]["frozen_blocks"]
    assert k == -2 and MOBILENET_V2_SPLIT[k] == (17, 18) and MOBILENET_V2_SPLIT[-1] == (18, 19)
    assert cfg["optimizer"]["options"]["trunk_lr"] < cfg["optimizer"]["options"]["lr"]


def test_tail_conv_preset_trains_only_mobilenets_last_conv():
    from xml_plugin.models.trunks import MOBILENET_V2_SPLIT
    cfg = C.load({"config_models": ["tail_conv"]})
    k = cfg["trunk"]["frozen_blocks"]
    assert k == -1 and MOBILENET_V2_SPLIT[k] == (18, 19)  # features[18]: the 1x1 conv 320 -> 1280 with its BN
    assert cfg["optimizer"]["options"]["trunk_lr"] < cfg["optimizer"]["options"]["lr"]


def _tiny_bn_cnn(pretrained: bool = False, weights_path=None):
    """tiny_cnn with a BatchNorm in its last block, to see whether the tail's running statistics move."""
    from torch import nn
    from xml_plugin.models.trunks import Trunk
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())]
    return Trunk(blocks, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "tiny_bn_cnn", "random-init-seed0", output_stride=4)


def _one_step(tiny_cfg, tmp_path, name, **extra):
    """The tail and head weights before and after a fold of ONE training iteration (tail = the last block)."""
    cfg = tiny_cfg(**{"trunk": {"name": "tiny_cnn", "pretrained": False, "frozen_blocks": -1},
                      "trainer.max_epochs": 1, "trainer.iterations_per_epoch": 1,
                      "general.methods": ["baseline"], "search.mode": "none", **extra})
    exp = Experiment(cfg, name, progress=False)
    ctx = exp.setup()
    ccfg = C.resolve(exp.method_config("baseline"))
    tr, va = exp.split.folds[0]
    T.train_fold(ccfg, ctx, np.asarray(tr), np.asarray(va), tmp_path / f"run_{name}", seed=0)
    after = torch.load(tmp_path / f"run_{name}" / "best.pt", weights_only=True)["model"]
    T.seed_everything(0)  # train_fold seeds, then builds the head: the same initial weights
    return T.build_head(ccfg, ctx.trunk, ctx.frozen_blocks).trainable_state_dict(), after


def test_trunk_lr_is_the_step_size_of_the_tail_and_lr_that_of_the_head(tiny_cfg, tmp_path):
    # Adam's first step moves every parameter with a nonzero gradient by lr * g / (|g| + eps) ~ lr: the largest moves
    # of the tail and the head are their two learning rates
    before, after = _one_step(tiny_cfg, tmp_path, "lrs", **{"optimizer": {"name": "Adam", "options": {
        "lr": 1e-3, "weight_decay": 0.0, "trunk_lr": 1e-5}}})
    move = {k: (after[k] - before[k]).abs().max().item() for k in before if before[k].is_floating_point()}
    tail = max(v for k, v in move.items() if k.startswith("tail."))
    head = move["embedder.proj.weight"]
    assert abs(tail - 1e-5) < 1e-6 and abs(head - 1e-3) < 1e-4


def test_without_trunk_lr_the_tail_uses_the_optimizers_lr(tiny_cfg, tmp_path):
    before, after = _one_step(tiny_cfg, tmp_path, "same", **{"optimizer": {"name": "Adam", "options": {
        "lr": 1e-3, "weight_decay": 0.0}}})
    tail = max((after[k] - before[k]).abs().max().item() for k in before if k.startswith("tail."))
    assert abs(tail - 1e-3) < 1e-4


def test_frozen_batchnorm_keeps_the_tails_running_statistics(tiny_cfg, tmp_path):
    import xml_plugin
    xml_plugin.register("trunk", _tiny_bn_cnn, name="tiny_bn_cnn")
    try:
        stats = {}
        for freeze in (True, False):
            before, after = _one_step(tiny_cfg, tmp_path, f"bn_{freeze}", **{
                "trunk": {"name": "tiny_bn_cnn", "pretrained": False, "frozen_blocks": -1},
                "trainer.freeze_bn": freeze, "optimizer.options.trunk_lr": 1e-4})
            key = next(k for k in before if k.startswith("tail.") and k.endswith("running_mean"))
            stats[freeze] = torch.equal(before[key], after[key])
        assert stats == {True: True, False: False}  # frozen: unchanged; not frozen: the batch moved them
    finally:
        xml_plugin.unregister("trunk", "tiny_bn_cnn")


def test_a_bad_trunk_lr_is_an_input_error(tiny_cfg, tmp_path):
    with pytest.raises(C.ConfigError, match="optimizer.options.trunk_lr must be a number >= 0"):
        _one_step(tiny_cfg, tmp_path, "bad", **{"optimizer.options.trunk_lr": "fast"})
