"""The feature cache's plan (pooled or full, RAM or memory-mapped, disk check) and the pooled cache's equivalence with
the full one for a GAP method."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xml_plugin import config as C
from xml_plugin.engine import cache as K
from xml_plugin.engine import train as T
from xml_plugin.engine.model import EmbeddingModel
from xml_plugin.models.embedder import Conv1x1Embedder
from xml_plugin.models.pooling import GlobalAveragePooling
from xml_plugin.protocol.experiment import Experiment, method_config

GAP = {"pooling": {"name": "gap"}, "embedder": {"name": "conv1x1", "options": {"size": 16}}}
GMP = {"pooling": {"name": "gmp"}, "embedder": {"name": "conv1x1"}}
XML = {"pooling": {"name": "xml"}, "embedder": {"name": "conv1x1"}}


def test_cache_size_is_two_bytes_per_value():
    # 10 images, 1 eval + 5 augmented views, 1280 x 7 x 7 float16 maps; pooled: 1280 values per view
    assert K.cache_bytes(10, 5, (1280, 7, 7), pooled=False) == 10 * 6 * 1280 * 49 * 2
    assert K.cache_bytes(10, 5, (1280, 7, 7), pooled=True) == 10 * 6 * 1280 * 2
    # the issue's figure: about 0.75 MB per image at the default 5 views of MobileNetV2's 7x7x1280
    assert K.cache_bytes(1, 5, (1280, 7, 7), pooled=False) == pytest.approx(0.75e6, rel=0.01)


def test_pooled_only_when_every_method_is_linear_then_gap_on_a_frozen_trunk():
    plan = lambda cfgs, frozen=4, **kw: K.cache_plan(cfgs, frozen, 4, 100, 5, (32, 7, 7), **kw)  # noqa: E731
    assert plan([GAP, {"pooling": "gap", "embedder": {"name": "none"}}])["pooled"] is True
    assert plan([GAP, GMP])["pooled"] is False  # max after a linear map does not commute
    assert plan([GAP, XML])["pooled"] is False
    assert plan([GAP], frozen=3)["pooled"] is False  # a trained trunk tail needs the maps
    assert plan([{**GAP, "pooling": {"search": "categorical", "choices": ["gap", "gmp"]}}])["pooled"] is False
    assert plan([GAP], pooled=False)["pooled"] is False
    assert plan([GAP])["bytes"] == 100 * 6 * 32 * 2
    with pytest.raises(C.ConfigError, match="cache.pooled is true"):
        plan([GMP], pooled=True)
    with pytest.raises(C.ConfigError, match="auto, true or false"):
        plan([GAP], pooled="yes")


def test_ram_fraction_and_disk_check():
    size = 100 * 6 * 32 * 49 * 2
    plan = lambda **kw: K.cache_plan([GMP], 4, 4, 100, 5, (32, 7, 7), **kw)  # noqa: E731
    assert plan(ram_bytes=4 * size)["in_ram"] is True
    assert plan(ram_bytes=4 * size - 1)["in_ram"] is False  # above a quarter of the RAM: memory-mapped
    assert plan(ram_bytes=2 * size, ram_fraction=0.5)["in_ram"] is True
    assert plan(free_bytes=size)["bytes"] == size
    with pytest.raises(C.ConfigError) as info:
        plan(free_bytes=size - 1)
    msg = str(info.value)
    assert f"{size} bytes" in msg and f"{size - 1} bytes" in msg and "\n" not in msg
    for fix in ("cache.folder", "cache.views", "cache.pooled", "trunk.frozen_blocks"):
        assert fix in msg


def _exp(tiny_cfg, name, **extra):
    cfg = tiny_cfg(**{"trunk.frozen_blocks": 2, "general.methods": ["baseline"], **extra})
    exp = Experiment(cfg, name, progress=False)
    exp.setup()
    return exp, cfg


def test_pooled_cache_gives_the_full_caches_embeddings_and_fold_result(tiny_cfg, tmp_path, capsys):
    full, cfg = _exp(tiny_cfg, "full", **{"cache.pooled": False})
    pooled, _ = _exp(tiny_cfg, "pooled")  # auto: baseline is gap on a frozen trunk
    fc, pc = full.ctx.source.cache, pooled.ctx.source.cache
    assert not fc.pooled and pc.pooled and fc.folder != pc.folder
    assert "pooled feature cache" in capsys.readouterr().err
    n = len(full.ctx.dataset)
    assert fc._train.shape[:3] == (n, 2, 16) and fc._train.ndim == 5 and pc._train.shape == (n, 2, 16)
    assert fc._train.nbytes == pc._train.nbytes * fc._train.shape[3] * fc._train.shape[4]
    idx = np.arange(12)
    # the pooled vectors are the full maps' spatial means (up to float16 rounding of the stored values)
    torch.testing.assert_close(pc.eval_features(idx), fc.eval_features(idx).mean(dim=(2, 3)), atol=2e-3, rtol=2e-3)
    torch.manual_seed(0)
    model = EmbeddingModel(torch.nn.Identity(), torch.nn.Sequential(), Conv1x1Embedder(16, 8, bias=True),
                           GlobalAveragePooling(8))
    a = model(fc.eval_features(idx), from_cache=True).embedding
    b = model(pc.eval_features(idx), from_cache=True).embedding
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    # the same fold trained from either cache
    ccfg = C.resolve(method_config(cfg, "baseline"))
    tr, va = (np.asarray(x) for x in full.split.folds[0])
    r_full = T.train_fold(ccfg, full.ctx, tr, va, tmp_path / "f", seed=1)
    r_pool = T.train_fold(ccfg, pooled.ctx, tr, va, tmp_path / "p", seed=1)
    assert [h["train_loss"] for h in r_pool["history"]] == pytest.approx([h["train_loss"] for h in r_full["history"]],
                                                                         rel=1e-2)
    assert r_pool["val"]["mean_average_precision_at_r"] == pytest.approx(r_full["val"]["mean_average_precision_at_r"],
                                                                         abs=1e-2)


def test_pooled_features_need_linear_then_gap():
    model = EmbeddingModel(torch.nn.Identity(), torch.nn.Sequential(torch.nn.ReLU()), Conv1x1Embedder(4, 2),
                           GlobalAveragePooling(2))
    with pytest.raises(RuntimeError, match="pooled"):
        model(torch.randn(3, 4), from_cache=True)


def test_full_disk_is_refused_before_building_and_large_caches_are_memory_mapped(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(K, "free_disk_bytes", lambda folder: 1000)
    with pytest.raises(C.ConfigError, match="only 0.00 GB .1000 bytes. are free"):
        _exp(tiny_cfg, "disk", **{"cache.pooled": False})
    assert not list((tmp_path / "cache").glob("features/*"))  # nothing written
    monkeypatch.undo()
    exp, _ = _exp(tiny_cfg, "mm", **{"cache.pooled": False, "cache.ram_fraction": 1e-12})
    cache = exp.ctx.source.cache
    assert isinstance(cache._train, np.memmap) and isinstance(cache._eval, np.memmap)
    exp2, _ = _exp(tiny_cfg, "ram", **{"cache.pooled": False})
    assert exp2.ctx.source.cache.folder == cache.folder and not isinstance(exp2.ctx.source.cache._train, np.memmap)
