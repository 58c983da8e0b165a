"""The speed-ups change nothing beyond float rounding: a pooling's ``pool_linear`` (pool, then project) against the
plain path (project every location with the 1x1 embedder, then pool), for the outputs, the gradients and the
prototype recursion."""
from __future__ import annotations

import copy

import pytest
import torch

from xml_plugin.engine.model import EmbeddingModel
from xml_plugin.models.embedder import Conv1x1Embedder
from xml_plugin.models.pooling import GlobalAveragePooling, GlobalMaxPooling
from xml_plugin.models.xml_pooling import PrototypePooling


def _model(pooling, bias=False, channels=24, dim=8):
    torch.manual_seed(0)
    return EmbeddingModel(torch.nn.Identity(), torch.nn.Identity(), Conv1x1Embedder(channels, dim, bias=bias), pooling)


def _plain(model, x):
    """The reference: every location projected by the 1x1 convolution, then the pooling's own forward."""
    return model.pooling(model.embedder(x))


@pytest.mark.parametrize("bias", [False, True])
def test_gap_pool_then_project_equals_project_then_pool(bias):
    fast = _model(GlobalAveragePooling(8), bias)
    slow = copy.deepcopy(fast)
    x = torch.randn(6, 24, 5, 7)
    a, b = fast(x, from_cache=True).embedding, _plain(slow, x).embedding
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the gradients of the projection (the only thing trained here)
    target = torch.randn_like(a)
    ((a - target) ** 2).sum().backward()
    ((b - target) ** 2).sum().backward()
    torch.testing.assert_close(fast.embedder.proj.weight.grad, slow.embedder.proj.weight.grad, atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(fast.embedder.proj.bias.grad, slow.embedder.proj.bias.grad, atol=1e-5, rtol=1e-5)


def test_gmp_and_soft_xml_take_the_plain_path():
    x = torch.randn(2, 24, 3, 3)
    w = torch.randn(8, 24)
    assert GlobalMaxPooling(8).pool_linear(x, w) is None  # max does not commute with a linear map
    soft = PrototypePooling(8, num_prototypes=4, assignment="soft")
    assert soft.pool_linear(x, w) is None  # its histogram has a gradient through every location


@pytest.mark.parametrize("rule", ["inner_product", "nearest"])
@pytest.mark.parametrize("bias", [False, True])
def test_hard_xml_histograms_embeddings_and_prototypes_match_the_plain_path(bias, rule):
    torch.manual_seed(1)
    fast = _model(PrototypePooling(8, num_prototypes=6, forgetting=0.9, assignment_rule=rule), bias)
    slow = copy.deepcopy(fast)
    fast.train()
    slow.train()
    for step in range(5):  # seeding on the first batch, then the recursion, identical on both paths
        x = torch.randn(10, 24, 4, 4)
        torch.manual_seed(100 + step)  # k-means++ seeding draws from torch's RNG: the same draws on both
        a = fast(x, from_cache=True)
        torch.manual_seed(100 + step)
        b = _plain(slow, x)
        torch.testing.assert_close(a.embedding, b.embedding, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.histogram, b.histogram), step  # the chosen prototypes are the same locations
        torch.testing.assert_close(fast.pooling.prototypes, slow.pooling.prototypes, atol=1e-4, rtol=1e-4)
    # the histogram is a count of chosen prototypes, recomputed here by brute force: the largest inner product with
    # the features scaled into the unit ball (per image, by the largest norm), or the nearest prototype
    x = torch.randn(3, 24, 2, 2)
    fast.eval()
    out = fast(x, from_cache=True)
    local = torch.einsum("dc,bchw->bhwd", fast.embedder.proj.weight.flatten(1), x).reshape(3, 4, 8)
    if bias:
        local = local + fast.embedder.proj.bias
    if rule == "inner_product":
        scaled = local / local.norm(dim=-1).amax(dim=1)[:, None, None]
        chosen = (scaled[:, :, None, :] * fast.pooling.prototypes[None, None]).sum(-1).argmax(-1)  # [B, n]
    else:
        chosen = ((local[:, :, None, :] - fast.pooling.prototypes[None, None]) ** 2).sum(-1).argmin(-1)  # [B, n]
    expect = torch.nn.functional.one_hot(chosen, 6).float().mean(1)
    assert torch.equal(out.histogram, expect)


def test_a_full_cache_holds_its_maps_spatial_means_and_checks_them(tmp_path):
    """The pooled copy of a full-map cache is the float32 mean of the stored float16 maps (computed here with numpy in
    float64), recorded and verified like the maps."""
    import json

    import numpy as np

    from xml_plugin.engine import cache as K
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(7, 5, 3, 2, 2)).astype(np.float16)  # [N, C, h, w]... as eval [N, C, h, w] below
    np.save(tmp_path / "eval.npy", maps[:, 0])
    np.save(tmp_path / "train.npy", maps)  # [N, V=5, C=3, h, w]
    records = K.write_pooled_copy(tmp_path, chunk=3)
    np.testing.assert_allclose(np.load(tmp_path / "eval_pooled.npy"), maps[:, 0].astype(np.float64).mean(axis=(-2, -1)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "train_pooled.npy"), maps.astype(np.float64).mean(axis=(-2, -1)),
                               rtol=1e-6, atol=1e-6)
    assert np.load(tmp_path / "train_pooled.npy").dtype == np.float32
    records.update({a: K.array_record(tmp_path / a) for a in K.ARRAYS})
    K.verify_arrays(tmp_path, records)
    raw = bytearray((tmp_path / "train_pooled.npy").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "train_pooled.npy").write_bytes(bytes(raw))
    with pytest.raises(K.DamagedFileError, match="train_pooled"):
        K.verify_arrays(tmp_path, records)
    json.dumps(records)  # plain data for meta.json


def test_a_gap_method_on_the_pooled_copy_trains_as_on_the_maps(tiny_cfg, tmp_path):
    """baseline (linear embedder + GAP) over a wholly frozen trunk reads the pooled copy; a fold trained that way ends
    as one trained on the full maps, up to float rounding."""
    import numpy as np

    from xml_plugin import config as C
    from xml_plugin.engine import train as T
    from xml_plugin.protocol.experiment import Experiment, method_config
    exp = Experiment(tiny_cfg(**{"trainer.max_epochs": 2, "trunk.frozen_blocks": "auto"}), "pooled_copy",
                     progress=False)
    ctx = exp.setup()
    assert ctx.source.cache.has_pooled_copy and ctx.frozen_blocks == ctx.trunk.num_blocks
    cfg = C.resolve(method_config(exp.base_cfg, "baseline"))
    assert ctx.for_config(cfg).source.pooled
    assert not ctx.for_config(C.resolve(method_config(exp.base_cfg, "xml"))).source.pooled
    tr, va = (np.asarray(a) for a in exp.split.folds[0])
    fast = T.train_fold(cfg, ctx, tr, va, tmp_path / "fast", seed=1)
    import dataclasses

    class _Full(T.FeatureSource):
        def for_config(self, cfg, whole):
            return self
    full_ctx = dataclasses.replace(ctx, source=_Full(ctx.source.dataset, ctx.source.cache))
    slow = T.train_fold(cfg, full_ctx, tr, va, tmp_path / "slow", seed=1)
    for a, b in zip(fast["history"], slow["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["mean_average_precision_at_r"] == pytest.approx(b["mean_average_precision_at_r"], abs=1e-4)
