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
