"""Under autocast (AMP) the poolings' own math stays in float32: XML's histogram and GSP's cost and transport give
finite outputs close to the float32 ones (CPU autocast with bfloat16 stands in for CUDA's float16 here)."""
from __future__ import annotations

import pytest
import torch

from xml_plugin.models.gsp import GeneralizedSumPooling
from xml_plugin.models.xml_pooling import PrototypePooling


def _pair(pooling_cls, **kw):
    torch.manual_seed(0)
    a = pooling_cls(16, **kw)
    b = pooling_cls(16, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("name", ["xml", "gsp"])
def test_pooling_under_bf16_autocast_is_float32_and_close(name):
    if name == "xml":
        ref, amp = _pair(PrototypePooling, num_prototypes=8)
    else:
        ref, amp = _pair(GeneralizedSumPooling, num_prototypes=8, init="random")
    torch.manual_seed(1)
    x = torch.randn(4, 16, 5, 5)
    for module in (ref, amp):
        module.train()
    torch.manual_seed(2)
    out_ref = ref(x)
    torch.manual_seed(2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        # what an autocast region gives the pooling: the embedder's output in reduced precision
        out_amp = amp(x.to(torch.bfloat16))
    assert out_amp.histogram.dtype == torch.float32
    if name == "gsp":  # GSP's weighted sum is part of its float32 math; XML's embedding is GAP in the input's dtype
        assert out_amp.embedding.dtype == torch.float32
    for a, b in ((out_ref.embedding, out_amp.embedding), (out_ref.histogram, out_amp.histogram)):
        assert torch.isfinite(b).all()
        # the only difference left is the input's bfloat16 rounding (8 bits of mantissa)
        torch.testing.assert_close(b.float(), a, atol=0.05, rtol=0.05)
    assert torch.allclose(out_amp.histogram.sum(1), torch.ones(4), atol=1e-5)  # still in the simplex
