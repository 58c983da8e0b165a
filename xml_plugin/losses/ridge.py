"""The closed-form ridge step shared by XML's cross-batch fit and GSP's zero-shot fit (docs/methods.md, XML and GSP)."""
from __future__ import annotations

import torch


def ridge_fit_predict(h_fit: torch.Tensor, z_fit: torch.Tensor, h_pred: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Fit ``W = argmin ||H_fit W - Z_fit||^2 + ridge ||W||^2`` and return ``H_pred W``.

    ``h_fit`` [a, m], ``z_fit`` [a, d], ``h_pred`` [b, m] -> [b, d]. Uses the kernel form
    ``H^T (H H^T + ridge I)^-1 Z`` when ``a < m`` and the primal form ``(H^T H + ridge I)^-1 H^T Z``
    otherwise; both are equal. Differentiable in all three inputs. Computed in float32 at least.
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    if h_fit.dim() != 2 or z_fit.dim() != 2 or h_pred.dim() != 2:
        raise ValueError("ridge_fit_predict expects 2-D tensors h_fit [a, m], z_fit [a, d], h_pred [b, m]")
    if h_fit.shape[0] != z_fit.shape[0] or h_fit.shape[1] != h_pred.shape[1]:
        raise ValueError(f"shape mismatch: h_fit {tuple(h_fit.shape)}, z_fit {tuple(z_fit.shape)}, "
                         f"h_pred {tuple(h_pred.shape)}")
    out_dtype = z_fit.dtype
    dtype = torch.promote_types(out_dtype, torch.float32)
    h, z, hp = h_fit.to(dtype), z_fit.to(dtype), h_pred.to(dtype)
    a, m = h.shape
    if a < m:  # kernel form: solve an [a, a] system
        gram = h @ h.T + ridge * torch.eye(a, dtype=dtype, device=h.device)  # [a, a]
        alpha = torch.linalg.solve(gram, z)  # [a, d]
        out = (hp @ h.T) @ alpha  # [b, d]
    else:  # primal form: solve an [m, m] system
        gram = h.T @ h + ridge * torch.eye(m, dtype=dtype, device=h.device)  # [m, m]
        w = torch.linalg.solve(gram, h.T @ z)  # [m, d]
        out = hp @ w
    return out.to(out_dtype)
