"""Trunks, embedders and poolings (GAP, GMP, XML prototypes, GSP). Importing registers them."""
import importlib as _importlib

from .pooling import GlobalAveragePooling, GlobalMaxPooling, Pooling, PoolingOutput

__all__ = ["Pooling", "PoolingOutput", "GlobalAveragePooling", "GlobalMaxPooling"]

_EXPORTS = {
    "trunks": ["Trunk", "freeze_batchnorm"],
    "embedder": ["Conv1x1Embedder"],
    "xml_pooling": ["PrototypePooling"],
    "gsp": ["GeneralizedSumPooling", "gsp_transport"],
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
