"""Loss wrappers (XML cross-batch, zero-shot, XBN memory) and the shared ridge routine. Importing registers them."""
import importlib as _importlib

from .ridge import ridge_fit_predict

__all__ = ["ridge_fit_predict"]

_EXPORTS = {
    "cross_batch": ["CrossBatchMetricLoss"],
    "zero_shot": ["ZeroShotLoss"],
    "xbn": ["CrossBatchNormMemory"],
}
for _mod, _names in _EXPORTS.items():
    try:
        _m = _importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _exc:  # TODO(lead): plain imports once every module has landed
        if _exc.name != f"{__name__}.{_mod}":
            raise
        continue
    for _n in _names:
        if hasattr(_m, _n):
            globals()[_n] = getattr(_m, _n)
            __all__.append(_n)
