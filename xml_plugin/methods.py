"""Methods: named config overlays (``benchmark_configs/config_methods/<name>.yaml``) registered as kind ``method``.

A method is what the protocol compares: ``baseline`` (the loss with GAP), ``xml``, ``gsp``, ``xbm``, ``xbn``, ``axbn`` ...
Register your own with ``xml_plugin.register("method", {"pooling": {...}, ...}, name="mine")`` (a dict overlay, or a
function ``cfg -> overlay``).
"""
from __future__ import annotations

from .config import config_root, load_yaml
from .registry import register

METHODS_CATEGORY = "config_methods"


def register_method_files(folder=None) -> None:
    folder = folder or config_root() / METHODS_CATEGORY
    for path in sorted(folder.glob("*.yaml")):
        register("method", load_yaml(path), name=path.stem)


register_method_files()
