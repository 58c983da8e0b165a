"""Data sets (real formats and embedded builders), class-disjoint splits, transforms. Importing registers them."""
import importlib as _importlib

__all__ = []

_EXPORTS = {
    "datasets": ["get_dataset", "DMLDataset", "cache_root"],
    "splits": ["class_disjoint_splits", "protocol_splits", "Split"],
    "transforms": ["train_transform", "eval_transform"],
    "real": [],
    "embedded": [],
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
