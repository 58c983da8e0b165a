"""Each method's config: the shared config, the method's overlay, the command line's overrides (they win over the
overlay), then ``method_overrides.<method>``; and the part of a config that decides what a training run computes.
Pure functions on config dicts (README, "One rule for overlays")."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Sequence, Tuple

from .. import config as C
from .. import registry

METHOD_OVERRIDES = C.METHOD_OVERRIDES
COMPONENT_SECTIONS = ("loss_wrapper", "miner", "lr_scheduler")  # sections that are null unless a method or the user sets them


def apply_overrides(cfg: Dict[str, Any], overrides: Sequence[Tuple[str, Any]]) -> Tuple[Dict[str, Any], List[str]]:
    """``cfg`` with the command-line overrides applied; returns it and the overrides that do not apply to it.

    An override inside a component section that is null here (``--loss_wrapper.options.lam 0.3`` for ``baseline``,
    whose ``loss_wrapper`` is null) does not apply: it is for the methods that have that section.
    """
    skipped = []
    for path, value in overrides:
        head = path.split("~")[0].split(".")
        if head[0] in COMPONENT_SECTIONS and not cfg.get(head[0]) and (
                (len(head) > 1 and head[1] != "name") or (len(head) == 1 and isinstance(value, dict)
                                                          and "name" not in value)):
            skipped.append(path)
            continue
        cfg = C.apply_override(cfg, path, value)
    return cfg, skipped


def method_config(cfg: Dict[str, Any], method: str, overrides: Sequence[Tuple[str, Any]] = ()) -> Dict[str, Any]:
    """The base config, then the method's overlay (``config_methods/<method>.yaml`` or a registered dict), then the
    command-line ``overrides`` (they win over the overlay), then ``method_overrides.<method>`` (values for that method
    only). Search markers stay; see :meth:`ExperimentState.method_config` for ``search.mode``."""
    return _method_config(cfg, method, overrides)[0]


def _method_config(cfg, method, overrides):
    """:func:`method_config` and the overrides that did not apply to this method."""
    overlay = registry.get("method", method)
    if callable(overlay):
        overlay = overlay(copy.deepcopy(cfg))
    overlay = overlay or {}
    base = {k: v for k, v in cfg.items() if k != METHOD_OVERRIDES}
    out, skipped = apply_overrides(C.merge(base, overlay), overrides)
    per_method = C.merge(cfg.get(METHOD_OVERRIDES) or {}, out.pop(METHOD_OVERRIDES, None) or {})
    return C.merge(out, per_method.get(method) or {}), skipped


# options added to the defaults as null after results existed: a null one is left out of every identity (run folders,
# feature caches, experiment fingerprints), so the folders made before the option existed keep their names
LATER_NULL_OPTIONS = (("transforms", "train", "pad"),)


def without_later_nulls(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` without the null :data:`LATER_NULL_OPTIONS` (a copy when one is dropped, else ``cfg`` itself)."""
    out = cfg
    for *parents, last in LATER_NULL_OPTIONS:
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and node[last] is None:
            out = copy.deepcopy(out) if out is cfg else out
            node = out
            for key in parents:
                node = node[key]
            del node[last]
    return out


def training_key(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a config that decides what a training run computes (not where results go, nor the budget)."""
    cfg = without_later_nulls(cfg)
    return {k: v for k, v in cfg.items() if k not in ("general", "search", "cache", "eval", "report")} | {
        "cache_views": cfg.get("cache", {}).get("views")}
