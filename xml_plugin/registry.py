"""Name -> component registry: PML, torch and this project's parts, and the user's own.

``register(kind, obj, name=None)`` adds a component (also usable as a decorator; ``obj`` may be a module: every class
of it that fits the kind joins), ``unregister(kind, name)`` removes it and ``get(kind, name)`` resolves a name. Class names
(``MultiSimilarityLoss``) and snake_case names with or without the kind's suffix
(``multi_similarity_loss``, ``multi_similarity``) all resolve to the same object. An unknown
name raises :class:`UnknownComponentError`, which lists the close matches.
"""
from __future__ import annotations

import difflib
import inspect
import re
import threading
import types
from typing import Any, Dict, List, Optional

from .config import ConfigError, is_search_marker

KINDS = (
    "trunk",
    "pooling",
    "embedder",
    "loss",
    "miner",
    "loss_wrapper",
    "sampler",
    "optimizer",
    "lr_scheduler",
    "dataset",
    "distance",
    "reducer",
    "method",
)

# suffixes stripped from class names to make the short snake_case alias, per kind
_SUFFIXES = {
    "loss": ("_loss",),
    "miner": ("_miner",),
    "sampler": ("_sampler",),
    "distance": ("_distance",),
    "reducer": ("_reducer",),
    "pooling": ("_pooling",),
    "trunk": ("_trunk",),
    "loss_wrapper": ("_loss", "_wrapper"),
}


class UnknownComponentError(KeyError):
    """A name that no registered component answers to."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class _Entry:
    __slots__ = ("name", "obj", "aliases")

    def __init__(self, name: str, obj: Any, aliases: List[str]):
        self.name, self.obj, self.aliases = name, obj, aliases


_entries: Dict[str, Dict[str, _Entry]] = {k: {} for k in KINDS}  # kind -> canonical name -> entry
_aliases: Dict[str, Dict[str, str]] = {k: {} for k in KINDS}  # kind -> normalised alias -> canonical
_populated = False
_loading_builtins = False  # True while the built-ins register: they never replace a name the user took first
_populating = threading.RLock()


def snake_case(name: str) -> str:
    """``MultiSimilarityLoss`` -> ``multi_similarity_loss``; ``NTXentLoss`` -> ``nt_xent_loss``."""
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)
    return s.replace("-", "_").lower()


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _check_kind(kind: str) -> None:
    if kind not in _entries:
        raise ValueError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")


def _aliases_for(kind: str, obj: Any, name: Optional[str]) -> List[str]:
    out = []
    if name:
        out.append(name)
    cls_name = getattr(obj, "__name__", None)
    if cls_name and not name:
        out.append(cls_name)
        snake = snake_case(cls_name)
        out.append(snake)
        for suffix in _SUFFIXES.get(kind, ()):
            if snake.endswith(suffix) and len(snake) > len(suffix):
                out.append(snake[: -len(suffix)])
    elif cls_name and cls_name != name:
        out.append(cls_name)
    return out


def register(kind: str, obj: Any = None, name: Optional[str] = None, *, overwrite: bool = True,
             aliases: Optional[List[str]] = None):
    """Register ``obj`` under ``kind``; returns ``obj`` so it also works as a decorator.

    ``name`` is the canonical name (default: the short snake_case form of the class name).
    Registering an existing name replaces it unless ``overwrite=False``. A module registers every class defined in it
    (or in its submodules) that fits the kind (see :func:`fits`), each named as if registered alone; a module with no
    such class raises :class:`NothingToRegisterError` (a ``ValueError``).
    """
    _check_kind(kind)
    if obj is None:  # decorator form
        return lambda o: register(kind, o, name, overwrite=overwrite, aliases=aliases)
    if isinstance(obj, types.ModuleType):
        if name or aliases:
            raise ValueError(f"register({kind!r}, module {obj.__name__}): a module's classes keep their own names; "
                             f"name= and aliases= are for one class")
        for cls in module_classes(kind, obj):
            register(kind, cls, overwrite=overwrite)
        return obj
    names = _aliases_for(kind, obj, name) + list(aliases or [])
    if not names:
        raise ValueError(f"register({kind!r}, ...) needs a name for {obj!r}")
    # canonical: the given name, else the short snake_case alias (``multi_similarity``)
    canonical = name if name else min(names[1:] or names, key=len)
    key = _normalise(canonical)
    if key in _aliases[kind] and _loading_builtins:
        return obj  # the user registered this name before the first lookup: theirs wins
    if key in _aliases[kind] and not overwrite:
        raise ValueError(f"{kind} {canonical!r} is already registered (pass overwrite=True to replace it)")
    if key in _aliases[kind]:
        _remove(kind, _aliases[kind][key])
    entry = _Entry(canonical, obj, names)
    _entries[kind][canonical] = entry
    for alias in names:
        a = _normalise(alias)
        # a canonical name always wins over an alias of another component
        if a not in _aliases[kind] or a == key:
            _aliases[kind][a] = canonical
    return obj


class NothingToRegisterError(ConfigError):
    """``register(kind, module)`` of a module that holds no class of that kind (exit 2 when ``--import`` runs it)."""


def _bases(kind: str) -> tuple:
    """The classes a component of ``kind`` derives from, for :func:`register` of a module."""
    import torch
    if kind == "loss":
        from pytorch_metric_learning.losses import BaseMetricLossFunction
        return (BaseMetricLossFunction,)
    if kind in ("miner", "distance", "reducer"):
        from pytorch_metric_learning import distances, miners, reducers
        return ({"miner": miners.BaseMiner, "distance": distances.BaseDistance,
                 "reducer": reducers.BaseReducer}[kind],)
    if kind == "sampler":
        return (torch.utils.data.Sampler,)
    if kind == "optimizer":
        return (torch.optim.Optimizer,)
    if kind == "lr_scheduler":
        sched = torch.optim.lr_scheduler
        return tuple(c for c in (getattr(sched, "LRScheduler", None), sched.ReduceLROnPlateau) if c is not None)
    if kind == "dataset":
        return (torch.utils.data.Dataset,)
    if kind == "method":
        return ()  # methods are config overlays (dicts): register each with a name
    return (torch.nn.Module,)  # trunk, pooling, embedder, loss_wrapper


def fits(kind: str, cls: Any) -> bool:
    """Is ``cls`` a component of ``kind``: a concrete subclass (its name not starting with ``Base``) of PML's base
    class for losses, miners, distances and reducers (a loss may also be any ``torch.nn.Module`` named ``...Loss``),
    of ``torch.nn.Module`` for trunks, poolings, embedders and loss wrappers, of torch's ``Sampler``, ``Optimizer``,
    ``LRScheduler`` / ``ReduceLROnPlateau``, ``Dataset``?"""
    import torch
    if not inspect.isclass(cls) or cls.__name__.startswith(("Base", "_")) or inspect.isabstract(cls):
        return False
    bases = _bases(kind)
    if kind == "loss" and issubclass(cls, torch.nn.Module) and cls.__name__.endswith("Loss"):
        return True
    return any(issubclass(cls, b) and cls is not b for b in bases)


def module_classes(kind: str, module: types.ModuleType) -> List[type]:
    """The classes that ``register(kind, module)`` registers: those defined in ``module`` or its submodules (not the
    ones it imports from elsewhere) that fit ``kind``, in name order."""
    prefix = module.__name__
    out = [obj for attr, obj in sorted(vars(module).items()) if inspect.isclass(obj) and fits(kind, obj)
           and (obj.__module__ == prefix or obj.__module__.startswith(prefix + "."))]
    if not out:
        own = sorted(a for a, o in vars(module).items() if inspect.isclass(o) and o.__module__ == prefix)
        what = {"loss": "a subclass of PML's BaseMetricLossFunction (or a torch.nn.Module named ...Loss)",
                "miner": "a subclass of PML's BaseMiner", "distance": "a subclass of PML's BaseDistance",
                "reducer": "a subclass of PML's BaseReducer", "sampler": "a torch.utils.data.Sampler",
                "optimizer": "a torch.optim.Optimizer", "lr_scheduler": "a torch learning-rate scheduler",
                "dataset": "a torch.utils.data.Dataset",
                "method": "none: methods are config overlays, register each with register('method', {...}, name=...)"
                }.get(kind, "a torch.nn.Module subclass")
        raise NothingToRegisterError(
            f"register({kind!r}, module {prefix}): the module holds no {kind} class ({what}, defined in the module); "
            f"its own classes: {', '.join(own) or 'none'}; a factory function registers with "
            f"xml_plugin.register({kind!r}, function, name=...)")
    return out


def _remove(kind: str, canonical: str) -> None:
    entry = _entries[kind].pop(canonical, None)
    if entry is None:
        return
    for alias, target in list(_aliases[kind].items()):
        if target == canonical:
            del _aliases[kind][alias]


def unregister(kind: str, name: str) -> None:
    """Remove a component (by any of its names)."""
    _ensure_populated()
    _check_kind(kind)
    canonical = _aliases[kind].get(_normalise(name))
    if canonical is None:
        raise _unknown(kind, name)
    _remove(kind, canonical)


def _unknown(kind: str, name: str) -> UnknownComponentError:
    candidates = sorted(_entries[kind])
    pool = sorted(set(candidates) | set(_aliases[kind]))
    close = difflib.get_close_matches(_normalise(str(name)), pool, n=5, cutoff=0.5)
    close = list(dict.fromkeys(_entries[kind][_aliases[kind][c]].name if c in _aliases[kind] else c for c in close))
    msg = f"unknown {kind} {name!r}."
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    msg += f" Registered {kind} names: {', '.join(candidates) if candidates else '(none)'}."
    msg += f" A class of your own joins with xml_plugin.register({kind!r}, YourClass)."
    return UnknownComponentError(msg)


def get(kind: str, name: str) -> Any:
    """The registered object for ``name`` (any alias, case-insensitive)."""
    _ensure_populated()
    _check_kind(kind)
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a string, got {name!r}")
    canonical = _aliases[kind].get(_normalise(name))
    if canonical is None:
        raise _unknown(kind, name)
    return _entries[kind][canonical].obj


def canonical_name(kind: str, name: str) -> str:
    get(kind, name)
    return _aliases[kind][_normalise(name)]


def names(kind: str) -> List[str]:
    """Canonical names registered under ``kind``, sorted."""
    _ensure_populated()
    _check_kind(kind)
    return sorted(_entries[kind])


def split_spec(spec: Any) -> tuple:
    """``"name"`` or ``{"name": ..., "options": {...}}`` (or options inline) -> (name, options)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"component spec {spec!r} has no 'name' key")
        opts = dict(spec.get("options") or {})
        for k, v in spec.items():
            if k not in ("name", "options"):
                opts[k] = v
        return spec["name"], opts
    raise TypeError(f"a component spec is a name or a dict with 'name', got {spec!r}")


NESTED_KINDS = ("distance", "reducer", "miner", "loss")  # an option of this name may be a component's bare name


def _nested(key: str, value: Any) -> bool:
    """Is option ``key: value`` a component spec? A ``{name: ...}`` mapping under an option named after a kind
    (``distance``, ``reducer``, ``miner``, ``embedder`` ...), or a bare name for the kinds of ``NESTED_KINDS``."""
    if isinstance(value, str):
        return key in NESTED_KINDS
    return isinstance(value, dict) and "name" in value and key in _entries and key != "method"


def build(kind: str, spec: Any, *args, **extra) -> Any:
    """Instantiate a component from a spec; ``extra`` keyword arguments are added to the options.

    An option named after a component kind (``distance``, ``reducer``, ``miner``, ``loss``) whose value is a name or
    a ``{name: ..., options: ...}`` spec is built first (``{name: multi_similarity, options: {distance: {name:
    cosine_similarity}, reducer: mean}}``). Options the constructor does not take raise an ``UnknownOptionError``
    (a ``ConfigError``) that names the valid ones.
    """
    name, opts = split_spec(spec)
    obj = get(kind, name)
    opts = {k: build(k, v) if _nested(k, v) else v for k, v in opts.items()}
    opts = {**opts, **extra}
    if not callable(obj):
        return obj
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        bad = [k for k in opts if k not in sig.parameters]
        if bad:
            raise _unknown_option(kind, name, bad[0], _options(obj))
    try:
        return obj(*args, **opts)
    except TypeError as exc:  # **kwargs passed down a class hierarchy (PML): name the options of the whole chain
        bad = [k for k in opts if f"argument '{k}'" in str(exc)]
        if "unexpected keyword argument" not in str(exc) or not bad:
            raise
        raise _unknown_option(kind, name, bad[0], _options(obj)) from None


def _takes(obj: Any) -> set:
    """Keyword names ``obj`` accepts: its own signature's, or along the ``__init__`` chain when it forwards **kwargs."""
    if not callable(obj):
        return set()
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return set(_options(obj))
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return set(_options(obj))
    return {p.name for p in params}


def build_with(kind: str, spec: Any, available: Dict[str, Any], *args) -> Any:
    """Build a component, passing those of ``available`` (num_classes, embedding_size ...) that its constructor takes
    and the spec does not set."""
    name, opts = split_spec(spec)
    obj = get(kind, name)
    takes = _takes(obj)
    extra = {k: v for k, v in available.items() if k in takes and k not in opts}
    return build(kind, {"name": name, "options": opts}, *args, **extra)


def accepted_options(kind: str, name: str) -> List[str]:
    """The option names a component's constructor takes (for a class, along its ``__init__`` chain)."""
    return _options(get(kind, name))


def _unknown_option(kind: str, name: str, key: str, accepted: List[str]) -> "UnknownOptionError":
    accepted = [a for a in accepted if a not in ("args", "kwargs")]
    close = difflib.get_close_matches(key, accepted, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UnknownOptionError(f"{kind} {name!r} takes no option {key!r}: {hint}it takes {', '.join(accepted) or 'none'}")


def check_option_names(kind: str, spec: Any, consumed: tuple = ()) -> None:
    """Raise ``UnknownOptionError`` for an option the component does not take (close matches and the accepted ones
    named), also inside nested component specs. ``consumed``: option names the engine takes out before building."""
    name, opts = split_spec(spec)
    obj = get(kind, name)
    accepted = _options(obj) if callable(obj) else []
    takes_any = False
    if callable(obj) and not inspect.isclass(obj):
        try:
            takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(obj).parameters.values())
        except (TypeError, ValueError):
            takes_any = True
    for key, value in opts.items():
        if key in consumed:
            continue
        if _nested(key, value):
            check_option_names(key, value)
        if not takes_any and key not in accepted:
            raise _unknown_option(kind, name, key, accepted)


class UnknownOptionError(ConfigError):
    """An option that a component's constructor does not take."""


# placeholders for what the engine passes at build time, so that a constructor can run before any data is loaded
_PLACEHOLDERS = {"num_classes": 4, "embedding_size": 8, "dim": 8, "in_channels": 8}
VALUE_CHECKED = ("loss", "miner", "distance", "reducer", "optimizer", "lr_scheduler")  # built by check_options


def _has_marker(value: Any) -> bool:
    if is_search_marker(value):
        return True
    if isinstance(value, dict):
        return any(_has_marker(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(_has_marker(v) for v in value)


def _build_for_check(kind: str, name: str, opts: Dict[str, Any]) -> Any:
    args: tuple = ()
    if kind in ("optimizer", "lr_scheduler"):
        import torch
        args = ([torch.nn.Parameter(torch.zeros(1))],)
        if kind == "lr_scheduler":
            args = (torch.optim.SGD(args[0], lr=0.1),)
    return build_with(kind, {"name": name, "options": opts}, _PLACEHOLDERS, *args)


def check_options(kind: str, spec: Any, consumed: tuple = ()) -> None:
    """Check a component spec before anything runs: option names against the constructor (along its ``__init__``
    chain), nested specs included; then, for the kinds of ``VALUE_CHECKED`` whose options hold no search marker, the
    constructor itself runs on placeholder sizes, so that its own value checks (PML's, torch's) apply.

    Raises ``ConfigError`` naming the component, the option and the constructor's message."""
    check_option_names(kind, spec, consumed)
    name, opts = split_spec(spec)
    opts = {k: v for k, v in opts.items() if k not in consumed}
    for key, value in opts.items():
        if _nested(key, value):
            check_options(key, value)
    if kind not in VALUE_CHECKED or _has_marker(opts):
        return
    try:
        _build_for_check(kind, name, opts)
    except TypeError as exc:  # a required option left out
        if "required" not in str(exc) or "missing" not in str(exc):
            raise
        raise ConfigError(f"{kind} {name!r} needs more options ({exc}); set them in {kind}.options") from None
    except (ValueError, AssertionError) as exc:
        if isinstance(exc, ConfigError):
            raise
        bad = [k for k in opts if _accepts_without(kind, name, opts, k)] or list(opts)
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"{kind} {name!r} refuses option {', '.join(f'{k}={opts[k]!r}' for k in bad)} "
                          f"({message}); fix it in {kind}.options") from None


def _accepts_without(kind: str, name: str, opts: Dict[str, Any], key: str) -> bool:
    """Does the constructor accept ``opts`` once ``key`` is left at its default (``key`` is then the culprit)?"""
    try:
        _build_for_check(kind, name, {k: v for k, v in opts.items() if k != key})
    except (TypeError, ValueError, AssertionError):
        return False
    return True


def _options(obj: Any) -> List[str]:
    """Named constructor parameters of ``obj`` and, for a class, of every ``__init__`` up its MRO."""
    out: List[str] = []
    for fn in ([c.__dict__["__init__"] for c in obj.__mro__ if "__init__" in c.__dict__ and c is not object]
               if inspect.isclass(obj) else [obj]):
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        out += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# built-ins

def _register_module_classes(kind: str, module: Any, base: Any, skip: tuple = ()) -> None:
    for attr in dir(module):
        obj = getattr(module, attr)
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and attr not in skip:
            if not attr.startswith("Base"):
                register(kind, obj)


def _populate_pml() -> None:
    from pytorch_metric_learning import distances, losses, miners, reducers, samplers
    from pytorch_metric_learning.losses.base_metric_loss_function import BaseMetricLossFunction

    import torch

    wrappers = ("CrossBatchMemory", "MultipleLosses", "SelfSupervisedLoss")
    for attr in dir(losses):
        obj = getattr(losses, attr)
        if (inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and not attr.startswith("Base")
                and attr not in wrappers and (issubclass(obj, BaseMetricLossFunction) or attr.endswith("Loss"))):
            register("loss", obj)
    register("loss_wrapper", losses.CrossBatchMemory, name="pml_xbm")  # not checkpointable: the xbm method uses ours
    from pytorch_metric_learning.miners.base_miner import BaseMiner
    _register_module_classes("miner", miners, BaseMiner)
    from pytorch_metric_learning.distances.base_distance import BaseDistance
    _register_module_classes("distance", distances, BaseDistance)
    from pytorch_metric_learning.reducers.base_reducer import BaseReducer
    _register_module_classes("reducer", reducers, BaseReducer)
    import torch.utils.data
    _register_module_classes("sampler", samplers, torch.utils.data.Sampler)
    register("sampler", samplers.MPerClassSampler, name="m_per_class")


def _populate_torch() -> None:
    import torch
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            register("optimizer", obj, name=attr, aliases=[attr.lower()])
    sched = torch.optim.lr_scheduler
    for attr in dir(sched):
        obj = getattr(sched, attr)
        if inspect.isclass(obj) and attr[0].isupper() and attr not in ("LRScheduler", "_LRScheduler", "Optimizer"):
            if hasattr(obj, "step"):
                register("lr_scheduler", obj, name=attr, aliases=[snake_case(attr)])


def _ensure_populated() -> None:
    global _populated, _loading_builtins
    if _populated:
        return
    with _populating:
        if _populated:
            return
        _populated = True  # set first: our modules call register() while being imported
        _loading_builtins = True
        try:
            _populate_torch()
            _populate_pml()
            # our own components register themselves on import
            import importlib
            for mod in ("xml_plugin.models", "xml_plugin.losses", "xml_plugin.data", "xml_plugin.methods"):
                importlib.import_module(mod)
        finally:
            _loading_builtins = False


def describe() -> Dict[str, List[str]]:
    """All kinds with their canonical names: what ``run.py --list`` prints."""
    return {k: names(k) for k in KINDS}


__all__ = ["register", "unregister", "get", "names", "build", "split_spec", "canonical_name", "describe",
           "accepted_options", "check_option_names", "check_options", "build_with", "UnknownComponentError", "UnknownOptionError", "KINDS",
           "snake_case", "fits", "module_classes", "NothingToRegisterError"]
