"""Input checks made before anything is written: every component's options against its constructor (names, types,
values), a dry run of the loss on a tiny batch, and the ranges of the protocol's numbers. Bad input is a
:class:`xml_plugin.config.ConfigError` naming the key and the fix."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from .. import config as C
from .. import registry
from ..engine import train as T

CONSUMED_OPTIONS = {"optimizer": ("loss_lr", "trunk_lr"), "trunk": ("frozen_blocks",), "lr_scheduler": ("step",)}


def check_components(cfg: Dict[str, Any], method: str) -> None:
    """Every component's options against its constructor (``registry.check_options``: unknown options, and the value
    checks of losses, miners, optimizers, schedulers), then the pooling and the loss wrapper (which ``check_options``
    does not build: they need sizes and the base loss) built once on placeholder sizes, so that their own value checks
    run before anything is trained: a ValueError or AssertionError there is bad input."""
    ds = cfg.get("dataset") or {}
    specs = {"dataset": {"name": ds.get("name"), "options": {**(ds.get("options_for") or {}).get(ds.get("name"), {}),
                                                             **(ds.get("options") or {})}}}
    for kind in ("trunk", "embedder", "pooling", "loss", "miner", "loss_wrapper", "sampler", "optimizer",
                 "lr_scheduler"):
        if cfg.get(kind):
            specs[kind] = cfg[kind]
    for kind, spec in specs.items():
        if spec:  # names along the constructor chain; the values of losses, miners, optimizers, schedulers ...
            try:
                registry.check_options(kind, spec, CONSUMED_OPTIONS.get(kind, ()))
            except C.ConfigError as exc:
                raise C.ConfigError(f"method {method!r}: {exc}") from None
    for kind, spec in specs.items():
        if spec and kind != "dataset":
            check_option_types(kind, spec, method)
    dim = int((cfg.get("embedder") or {}).get("size", 128) or 128) if isinstance(cfg.get("embedder"), dict) else 128
    dry_run_loss(cfg, method, dim)
    built = {}
    try:
        # the loss and miner are built only as the wrapper's arguments (check_options has value-checked them)
        for kind in ("pooling", "loss", "miner", "loss_wrapper") if cfg.get("loss_wrapper") else ("pooling",):
            if not cfg.get(kind):
                continue
            if kind == "pooling":
                built[kind] = registry.build("pooling", cfg["pooling"], dim=dim)
            elif kind == "loss_wrapper":
                histogram = getattr(built.get("pooling"), "num_prototypes", None)
                built[kind] = T.build_with("loss_wrapper", cfg[kind], {
                    "num_classes": 4, "embedding_size": dim, "loss": built["loss"], "miner": built.get("miner"),
                    "histogram_size": histogram})
                if hasattr(built[kind], "bind_pooling") and built.get("pooling") is not None:
                    built[kind].bind_pooling(built["pooling"])  # cross_fit recursive needs a prototype recursion
            else:
                built[kind] = T.build_with(kind, cfg[kind], {"num_classes": 4, "embedding_size": dim})
    except (ValueError, AssertionError) as exc:
        raise C.ConfigError(f"method {method!r}: {kind} {registry.split_spec(cfg[kind])[0]!r} refuses its options "
                            f"({' '.join(str(exc).split()) or type(exc).__name__}); check --{kind}.options") from None


def _kind_of_default(default: Any) -> Optional[Tuple[tuple, str]]:
    """The accepted types of an option whose constructor default is ``default`` (None: not checked)."""
    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, (int, float)):
        return (int, float), "a number"
    if isinstance(default, str):
        return (str,), "a string"
    return None


def check_option_types(kind: str, spec: Any, method: str) -> None:
    """Each option's value against the type of its constructor default (a number, a string, a flag): a list or a string
    where a number is expected is refused here, not inside the first trial."""
    import inspect
    name, opts = registry.split_spec(spec)
    if not isinstance(name, str):
        return
    try:
        params = inspect.signature(registry.get(kind, name)).parameters
    except (TypeError, ValueError):
        return
    for key, value in opts.items():
        p = params.get(key)
        if p is None or value is None or C.is_search_marker(value):
            continue
        accepted = _kind_of_default(p.default)
        if accepted is None:
            continue
        types, what = accepted
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise C.ConfigError(f"method {method!r}: {kind} {name!r} option {key!r} must be {what} (its default is "
                                f"{p.default!r}), got {value!r}; set it with --{kind}.options.{key} VALUE")


TRUSTED_MODULES = ("pytorch_metric_learning", "torch", "xml_plugin")


def dry_run_loss(cfg: Dict[str, Any], method: str, dim: int) -> None:
    """The loss (with its miner and wrapper) built on placeholder sizes and called once forward and backward on a tiny
    random batch, so that an option it refuses only when it computes fails now, before anything is written. A failure
    of the project's or PML's own components is bad input; one inside a user's registered component is a bug and is
    raised as it is (exit 1, traceback)."""
    if not cfg.get("loss"):
        return
    names = [(k, registry.split_spec(cfg[k])[0]) for k in ("loss", "miner", "loss_wrapper") if cfg.get(k)]
    trusted = all(getattr(registry.get(k, n), "__module__", "").split(".")[0] in TRUSTED_MODULES for k, n in names)
    pooling = cfg.get("pooling")
    m = None
    if pooling:
        opts = registry.split_spec(pooling)[1]
        m = opts.get("num_prototypes", 64) if isinstance(opts.get("num_prototypes", 64), int) else 64
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)  # [16]: 4 classes x 4
    try:
        with torch.random.fork_rng(devices=[]):
            module = T.build_loss(C.resolve(cfg), 4, dim, m, train_size=64)
            emb = torch.randn(len(labels), dim, generator=gen, requires_grad=True)
            if getattr(module, "needs_histograms", False):
                hist = torch.softmax(torch.randn(len(labels), int(m or 64), generator=gen), dim=1)
                loss = module(emb, labels, histograms=hist)
            else:
                loss = module(emb, labels)
            if loss.requires_grad:
                loss.backward()
    except C.ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - PML and torch refuse values with many kinds of errors
        if not trusted:
            raise
        raise C.ConfigError(f"method {method!r}: the loss {', '.join(f'{k} {n!r}' for k, n in names)} fails on a "
                            f"test batch with these options ({type(exc).__name__}: {' '.join(str(exc).split())[:200]});"
                            f" check --loss.options / --miner / --loss_wrapper.options") from None


MAX_TRIALS, MAX_REPRODUCTIONS, MAX_SEARCHES = 100_000, 10_000, 1000
MAX_SEED = 2 ** 31 - 1 - 1000 * (MAX_REPRODUCTIONS + 1)  # reproduction r trains with seed + 1000 (r + 1)


def _is_device(value: Any) -> bool:
    if value in (None, "auto"):
        return True
    if not isinstance(value, str):
        return False
    try:
        return torch.device(value).type in ("cpu", "cuda", "mps")
    except RuntimeError:
        return False


def check_numbers(cfg: Dict[str, Any]) -> None:
    """Range checks of the protocol's numbers (ConfigError naming the key and the accepted range)."""
    def need(path: str, ok, what: str) -> None:
        value = C.get_path(cfg, path)
        try:
            good = ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise C.ConfigError(f"{path} must be {what}, got {value!r} (set it with --{path} VALUE)")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    need("general.n_trials", lambda v: is_int(v) and 1 <= v <= MAX_TRIALS, f"an integer in [1, {MAX_TRIALS}]")
    need("general.reproductions", lambda v: is_int(v) and 1 <= v <= MAX_REPRODUCTIONS,
         f"an integer in [1, {MAX_REPRODUCTIONS}] (2 or more for an interval)")
    need("general.seed", lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
    need("cache.seed", lambda v: v is None or (is_int(v) and 0 <= v <= MAX_SEED), f"an integer in [0, {MAX_SEED}]")
    need("general.num_threads", lambda v: v is None or (is_int(v) and 1 <= v <= 1024),
         "null (torch's default) or an integer in [1, 1024]")
    need("general.heartbeat_seconds", lambda v: v is None or (is_int(v) and 1 <= v <= 3600),
         "an integer in [1, 3600] (seconds)")
    need("general.device", _is_device, "auto, cpu, cuda, cuda:N or mps")
    from ..data.splits import SCHEMES
    need("dataset.split", lambda v: v is None or v in SCHEMES, f"null or one of {', '.join(SCHEMES)}")
    need("general.workers", lambda v: v in (None, "auto") or (is_int(v) and 1 <= v <= 1024),
         "auto (the usable cores on CPU) or an integer in [1, 1024] (1: train in the main process)")
    need("general.searches", lambda v: v is None or (is_int(v) and 1 <= v <= MAX_SEARCHES),
         f"an integer in [1, {MAX_SEARCHES}] (searches per method with different sampler seeds; 3 or more resolve a "
         f"verdict over searches)")
    need("general.attribution", lambda v: v is None or isinstance(v, bool), "true or false")
    for flag in ("trainer.amp", "trainer.freeze_bn", "trainer.logs"):
        need(flag, lambda v: v is None or isinstance(v, bool), "true or false")
    need("dataset.num_folds", lambda v: is_int(v) and v >= 2, "an integer >= 2")
    need("dataset.test_fraction", lambda v: 0 < float(v) < 1, "a fraction in (0, 1)")
    need("trainer.batch_size", lambda v: is_int(v) and v >= 2, "an integer >= 2")
    need("trainer.iterations_per_epoch", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("trainer.max_epochs", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("trainer.patience", lambda v: v is None or (is_int(v) and v >= 0), "null or an integer >= 0")
    need("cache.views", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("general.methods", lambda v: isinstance(v, list) and len(v) >= 1 and len(set(v)) == len(v),
         "a non-empty list of distinct method names")
    need("search.mode", lambda v: v in ("auto", "none", "all"), "one of auto, none, all")
    sampler = cfg.get("sampler") or {}
    if isinstance(sampler, dict) and registry.split_spec(sampler)[0] in ("m_per_class", "MPerClassSampler"):
        m = (sampler.get("options") or {}).get("m", 4)
        bs = cfg["trainer"]["batch_size"]
        if not (isinstance(m, int) and m >= 1 and bs % m == 0 and bs // m >= 2):
            raise C.ConfigError(f"trainer.batch_size {bs} must be a multiple of the sampler's m = {m} with at least 2 "
                                f"classes per batch (e.g. --trainer.batch_size {max(2, 2 * m) if isinstance(m, int) else 32})")
    ref = (cfg.get("general") or {}).get("reference")
    if ref is not None and ref not in cfg["general"]["methods"]:
        raise C.ConfigError(f"general.reference {ref!r} is not one of the compared methods {cfg['general']['methods']}")
