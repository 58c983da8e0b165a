"""Under autocast (AMP) the poolings' own math stays in float32: XML's histogram and GSP's cost and transport give
finite outputs close to the float32 ones (CPU autocast with bfloat16 stands in for CUDA's float16 here)."""
from __future__ import annotations

import pytest
import torch

from xml_plugin.models.gsp import GeneralizedSumPooling
from xml_plugin.models.xml_pooling import PrototypePooling

# The largest |bf16 - float32| differences on this test's inputs, measured 2026-12-01 (torch 2.14.1, CPU), with the
# tolerance set at about twice each. The input's bfloat16 rounding is at most 2^-8 relative (measured 3.9e-3, 7.8e-3
# absolute); after it:
# - XML's embedding, GAP in bfloat16 (its mean rounded again), |z| <= 0.51: measured 1.7e-3 -> 4e-3
# - XML's hard histogram: no location changes prototype (the smallest gap between a location's two best scores
#   w_k^T x~_i, 0.0134, exceeds the largest change rounding makes to a score, 0.010) -> exact
# - GSP's embedding (float32 math on the rounded input), |z| <= 0.53: measured 9.6e-4 -> 2e-3
# - GSP's attributes, 0.07 .. 0.20: measured 1.4e-4 -> 3e-4
# A precision bug of a few percent (a 10% error is 5e-2 on these values) is far outside.
TOLERANCE = {("xml", "embedding"): 4e-3, ("xml", "histogram"): 0.0,
             ("gsp", "embedding"): 2e-3, ("gsp", "histogram"): 3e-4}


def _pair(pooling_cls, **kw):
    torch.manual_seed(0)
    a = pooling_cls(16, **kw)
    b = pooling_cls(16, **kw)
    if pooling_cls is GeneralizedSumPooling:  # prototypes set here, not by the module's initialisation
        with torch.no_grad():
            a.prototypes.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) / 4)
            a.initialized.fill_(True)
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
    for part in ("embedding", "histogram"):
        a, b = getattr(out_ref, part), getattr(out_amp, part)
        assert torch.isfinite(b).all()
        # the only difference left is the input's bfloat16 rounding (8 bits of mantissa)
        torch.testing.assert_close(b.float(), a, atol=TOLERANCE[name, part], rtol=0)
    assert torch.allclose(out_amp.histogram.sum(1), torch.ones(4), atol=1e-5)  # still in the simplex
