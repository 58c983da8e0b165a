"""The fair-comparison protocol (docs/methods.md, the protocol): per method an Optuna search over the config's
marked keys with the same budget, reproductions of the best configuration, paired verdicts, the report. Resumable and
shareable between workers."""
from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import optuna
import torch

from .. import config as C
from .. import registry
from ..engine import distributed as D
from ..engine import train as T
from ..engine.cache import FeatureCache, pooled_choice
from ..engine.evaluate import fold_ensemble_metrics, query_gallery
from ..engine.io import DamagedFileError, atomic_write_json, read_json, read_json_checked, stable_hash
from ..engine.model import build_trunk, frozen_blocks
from . import slots
from .log import ExperimentLog, experiment_bar
from .names import check_name, owns_study, study_name
from .workers import FoldPool, resolve_workers
from .run_index import record_run

log = logging.getLogger("xml_plugin")


class TrialFailed(RuntimeError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.fail_reason = reason


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
    only). Search markers stay; see :meth:`Experiment.method_config` for ``search.mode``."""
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


def training_key(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a config that decides what a training run computes (not where results go, nor the budget)."""
    return {k: v for k, v in cfg.items() if k not in ("general", "search", "cache", "eval", "report")} | {
        "cache_views": cfg.get("cache", {}).get("views")}


def open_storage(url: str, heartbeat_seconds: int):
    """The Optuna storage at ``url``; a URL that cannot be opened is input (ConfigError naming host, port and fix)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise C.ConfigError(f"--storage {url!r} is not a database URL ({exc}); use e.g. "
                            f"sqlite:///path/optuna.db or postgresql://user:password@host:5432/dbname") from None
    try:
        return slots.make_storage(url, heartbeat_seconds)
    except OperationalError as exc:
        where = parsed.database if parsed.get_backend_name() == "sqlite" else \
            f"host {parsed.host or 'localhost'}, port {parsed.port or 'default'}, database {parsed.database}"
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise C.ConfigError(f"cannot open the Optuna storage {parsed.render_as_string(hide_password=True)} ({where}): "
                            f"{reason}. Is the server running and reachable, and do the user and database exist?") from None
    except (ModuleNotFoundError, ImportError) as exc:
        raise C.ConfigError(f"--storage {parsed.render_as_string(hide_password=True)} needs a database driver that is "
                            f"not installed ({exc}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except ArgumentError as exc:  # NoSuchModuleError: a dialect SQLAlchemy does not know
        raise C.ConfigError(f"--storage {parsed.render_as_string(hide_password=True)}: unknown database kind "
                            f"{parsed.drivername!r} ({' '.join(str(exc).split())[:120]}); use sqlite:///path/optuna.db "
                            f"or postgresql://user:password@host:5432/dbname") from None
    except (DatabaseError, optuna.exceptions.StorageInternalError) as exc:  # opens, but is not a readable database
        raise damaged_storage(url, exc) from None


NOT_RESULTS = {"general": ("experiment_folder", "storage", "num_threads", "workers", "heartbeat_seconds", "methods",
                            "reference",
                            "n_trials", "reproductions", "seed"),
               "trainer": ("num_workers", "logs"), "eval": ("batch_size",), "cache": ("folder", "batch_size"),
               "report": None, METHOD_OVERRIDES: None}


def busy_cores(seconds: float = 0.1) -> Optional[float]:
    """How many cores other processes keep busy right now: /proc/stat sampled over ``seconds`` while this process sleeps
    (the load average would count this process's own past work and jobs that just ended); None where it cannot tell."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    span = total1 - total0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / span) if span > 0 else None


def oversubscription_advice(threads: int, busy: Optional[float], cores: int) -> Optional[str]:
    """A warning when other work already keeps every core busy and this job would add several threads: a multi-thread
    CPU job next to others slows down far more than its share (docs/benchmarks.md, docs/trunks.md)."""
    if threads <= 1 or busy is None or busy < cores - 0.5:
        return None
    return (f"warning: other processes keep {busy:.1f} of the {cores} cores busy and this job would run {threads} "
            f"threads; with other jobs running, --general.num_threads 1 each is much faster")


def result_view(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` without what cannot change a result (folders, storage, threads, logging; the budget is kept apart)."""
    out = copy.deepcopy(cfg)
    for section, keys in NOT_RESULTS.items():
        if keys is None:
            out.pop(section, None)
        elif isinstance(out.get(section), dict):
            for k in keys:
                out[section].pop(k, None)
    return out


def _without_nulls(d: Any) -> Any:
    """``d`` without null values (a default added later as null does not change a configuration)."""
    if isinstance(d, dict):
        return {k: _without_nulls(v) for k, v in d.items() if v is not None}
    return d


def fingerprint_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``'path: old -> new'`` for every leaf that differs (methods compared where both have them)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict) and v and not C.is_search_marker(v):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a = flat({"shared": old.get("shared"), "methods": {m: c for m, c in old.get("methods", {}).items()
                                                        if m in new.get("methods", {})}})
    b = flat({"shared": new.get("shared"), "methods": {m: c for m, c in new.get("methods", {}).items()
                                                        if m in old.get("methods", {})}})
    # a key that is missing on one side and null on the other is the same setting (a default added later as null)
    return [f"{k.removeprefix('shared.').removeprefix('budget.')}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


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


def _marker_range(marker: Dict[str, Any]) -> str:
    if marker["search"] == "categorical":
        return "{" + ", ".join(map(str, marker["choices"])) + "}"
    return f"[{marker['low']:g}, {marker['high']:g}]" + (" log" if marker.get("log") else "")


MAX_TRIALS, MAX_REPRODUCTIONS = 100_000, 10_000
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


class _NoInterruptTraceback(logging.Filter):
    """Drops Optuna's "Trial N failed ... KeyboardInterrupt" warning (with its traceback) and the line after it: Ctrl-C
    is not a failure, and the command line prints one "interrupted" line instead."""

    def __init__(self):
        super().__init__()
        self.drop_next = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        if (exc is not None and issubclass(exc, KeyboardInterrupt)) or "KeyboardInterrupt" in str(record.msg):
            self.drop_next = True
            return False
        if self.drop_next and "failed with value" in str(record.msg):
            self.drop_next = False
            return False
        return True


def quiet_interrupts() -> None:
    """Install :class:`_NoInterruptTraceback` on Optuna's log handlers (once)."""
    logger = optuna.logging._get_library_root_logger() if hasattr(optuna.logging, "_get_library_root_logger") \
        else logging.getLogger("optuna")
    for handler in logger.handlers or [logger]:
        if not any(isinstance(f, _NoInterruptTraceback) for f in handler.filters):
            handler.addFilter(_NoInterruptTraceback())


def _db_errors():
    from sqlalchemy.exc import DatabaseError
    return DatabaseError


def damaged_storage(url: str, exc: BaseException) -> C.ConfigError:
    """The input error for an Optuna storage that opens but cannot be read (a damaged or foreign ``optuna.db``)."""
    from sqlalchemy.engine import make_url
    parsed = make_url(url)
    where = parsed.database if parsed.get_backend_name() == "sqlite" else parsed.render_as_string(hide_password=True)
    reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:160]
    return C.ConfigError(f"the Optuna storage {where} cannot be read ({reason}): if it is damaged, move it away and "
                         f"rerun (finished folds are read back from runs/, so nothing is trained twice), or --restart "
                         f"to start the experiment over")


def _rename_studies(storage, old: str, new: str) -> None:
    """Rename experiment ``old``'s own studies (:func:`owns_study`) to experiment ``new``'s in ``storage``."""
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if owns_study(old, summary.study_name):
            optuna.copy_study(from_study_name=summary.study_name, from_storage=storage, to_storage=storage,
                              to_study_name=f"{new}{summary.study_name[len(old):]}")
            optuna.delete_study(study_name=summary.study_name, storage=storage)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on an experiment folder (flock on the directory itself: nothing is written to take it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Experiment:
    """One experiment folder: ``config.yaml``, ``splits.json``, ``optuna.db`` (default storage), ``runs/``, the report."""

    def __init__(self, cfg: Dict[str, Any], name: str, progress: bool = True,
                 overrides: Sequence[Tuple[str, Any]] = ()):
        """``cfg``: the merged config files; ``overrides``: the command line's ``(dotted path, value)`` pairs, applied
        over ``cfg`` and over every method's overlay (see :func:`method_config`)."""
        self.base_cfg, self.overrides = cfg, list(overrides)
        cfg, _ = apply_overrides(cfg, self.overrides)
        self.cfg, self.name, self.progress = cfg, name, progress
        C.check_keys(cfg)
        check_numbers(cfg)
        g = cfg["general"]
        self.folder = Path(g["experiment_folder"]) / check_name(name)
        self.study_prefix = name  # the studies' names start with it (a copied or renamed folder keeps its studies')
        self.storage_url = g.get("storage") or f"sqlite:///{(self.folder / 'optuna.db').resolve()}"
        self.methods: List[str] = [registry.canonical_name("method", m) for m in g["methods"]]
        for m in (cfg.get(METHOD_OVERRIDES) or {}):  # a data-set preset may set values for methods not compared
            try:
                registry.get("method", m)
            except registry.UnknownComponentError as exc:
                raise C.ConfigError(f"{METHOD_OVERRIDES}.{m}: {exc}") from None
        unused = set(path for path, _ in self.overrides)
        for m in self.methods:  # every method's config must be valid before anything runs
            mcfg = self.method_config(m)
            unused &= set(_method_config(self.base_cfg, m, self.overrides)[1])
            C.check_keys(mcfg)
            self._validate(mcfg, m)
        if unused:
            raise C.ConfigError(f"--{sorted(unused)[0]} applies to none of the compared methods {self.methods}: its "
                                f"section is null for all of them (compare a method that sets it, e.g. --methods "
                                f"baseline xml, or give the whole section with a name)")
        self.ctx: Optional[T.RunContext] = None
        self.pool: Optional[FoldPool] = None
        self._storage = None

    # ---------------------------------------------------------------- set-up
    @property
    def search_mode(self) -> str:
        """``none`` (every method runs once), ``shared`` (every method searches with the same budget) or ``own``
        (``search.mode: all``: each method searches what it marks, budgets may differ)."""
        mode = (self.cfg.get("search") or {}).get("mode", "auto")
        if mode == "all":
            return "own"
        shared = C.search_space({k: v for k, v in self.cfg.items() if k != METHOD_OVERRIDES})
        return "shared" if mode == "auto" and shared else "none"

    def method_config(self, method: str) -> Dict[str, Any]:
        """The method's config; its search markers resolved to their defaults when nothing is searched."""
        mcfg = method_config(self.base_cfg, method, self.overrides)
        return C.resolve(mcfg) if self.search_mode == "none" else mcfg

    def restart(self) -> Optional[Path]:
        """``--restart``: move the experiment folder to ``<name>.backup-<time>`` and rename its studies (in the storage
        in the folder, or in a shared one) to the backup's name, so that the backup stays a complete experiment that
        ``--evaluate`` opens. Only this experiment's own folder and studies (``<name>.<method>.<part>`` exactly) are
        touched. Returns the backup folder (None: nothing to keep)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = self.folder.with_name(f"{self.folder.name}.backup-{stamp}")
        if self.cfg["general"].get("storage"):
            _rename_studies(self.storage, self.name, backup.name)
        if not self.folder.exists():
            return None
        self.folder.rename(backup)
        info, recorded = backup / "experiment.json", None
        try:
            recorded = read_json(info) if info.is_file() else None
        except ValueError:  # a damaged experiment.json: the backup keeps it as it was
            pass
        db = backup / "optuna.db"
        if not self.cfg["general"].get("storage") and db.is_file():  # its studies carry the recorded name
            owner = recorded.get("name") if isinstance(recorded, dict) else None
            _rename_studies(open_storage(f"sqlite:///{db.resolve()}", 5), owner or self.name, backup.name)
        if isinstance(recorded, dict):
            atomic_write_json(info, {**recorded, "name": backup.name})
        return backup

    def _validate(self, mcfg: Dict[str, Any], method: str) -> None:
        C.search_space(mcfg)  # marker errors
        for kind in ("dataset", "trunk", "embedder", "pooling", "loss", "optimizer", "sampler", "miner",
                     "loss_wrapper", "lr_scheduler"):
            spec = mcfg.get(kind)
            if spec and not C.is_search_marker(spec):
                name = registry.split_spec(spec)[0]
                if isinstance(name, str):
                    registry.get(kind, name)
        check_components(C.resolve(mcfg), method)
        if mcfg.get("loss_wrapper"):
            wrapper = registry.get("loss_wrapper", registry.split_spec(mcfg["loss_wrapper"])[0])
            pooling = registry.get("pooling", registry.split_spec(mcfg["pooling"])[0])
            if getattr(wrapper, "needs_histograms", False) and not getattr(pooling, "gives_histogram", False):
                raise C.ConfigError(f"method {method!r}: loss wrapper {registry.split_spec(mcfg['loss_wrapper'])[0]!r} needs "
                                    f"histograms but pooling {registry.split_spec(mcfg['pooling'])[0]!r} gives none "
                                    f"(use pooling xml or gsp)")

    @property
    def storage(self):
        if self._storage is None:
            g = self.cfg["general"]
            self._storage = open_storage(self.storage_url, int(g.get("heartbeat_seconds", 5)))
        return self._storage

    def setup(self) -> T.RunContext:
        """Data set, class-disjoint splits, trunk and (on CPU by default) the frozen-trunk feature cache."""
        if self.ctx is not None:
            return self.ctx
        from ..data import embedded, eval_transform, get_dataset, protocol_splits, train_transform

        embedded.set_progress(self.progress)
        cfg = self.cfg
        if D.init_from_env() > 1 and not D.is_main():  # torchrun: rank 0 claims the folder and builds the cache first
            D.barrier()
        device = T.select_device(cfg["general"].get("device", "auto"))
        threads = cfg["general"].get("num_threads")
        if threads:  # torch and faiss (OpenMP) alike: several workers on one machine must not oversubscribe it
            import faiss
            torch.set_num_threads(int(threads))
            faiss.omp_set_num_threads(int(threads))
        elif device.type == "cpu":
            advice = oversubscription_advice(torch.get_num_threads(), busy_cores(), os.cpu_count() or 1)
            if advice:
                print(advice, file=sys.stderr)
        ds_cfg = cfg["dataset"]
        ds_options = {**(ds_cfg.get("options_for") or {}).get(ds_cfg["name"], {}), **(ds_cfg.get("options") or {})}
        dataset = get_dataset(ds_cfg["name"], root=ds_cfg.get("root"), **ds_options)
        labels = np.asarray(dataset.labels, dtype=np.int64)
        split = protocol_splits(dataset, test_fraction=ds_cfg.get("test_fraction", 0.5),
                                num_folds=ds_cfg.get("num_folds", 4), scheme=ds_cfg.get("split"))
        self.split = split
        trunk = build_trunk(cfg)
        k = frozen_blocks(cfg, trunk, device)
        tf_cfg = cfg.get("transforms", {})
        size = int(tf_cfg.get("image_size", 224))
        train_opts = dict(tf_cfg.get("train") or {})
        eval_opts = dict(tf_cfg.get("eval") or {})
        try:
            train_tf = train_transform(size, trunk.mean, trunk.std, **train_opts)
            eval_tf = eval_transform(size, trunk.mean, trunk.std, **eval_opts)
        except ValueError as exc:  # the messages name the transforms.* key at fault
            raise C.ConfigError(f"{exc} (see docs/data.md, 'Transforms')") from None
        eval_opts = {key: v for key, v in eval_opts.items() if v is not None}  # unset options: same cache key as before
        cache_cfg = cfg.get("cache", {})
        cached = k > 0 and cache_cfg.get("enabled", True)
        self.resolved = {"device_type": device.type, "frozen_blocks": k, "image_size": size,
                         "cache_views": int(cache_cfg.get("views", 5)) if cached else 0}
        method_cfgs = [self.method_config(m) for m in self.methods]
        if cached and pooled_choice(method_cfgs, k, trunk.num_blocks, cache_cfg.get("pooled", "auto")):
            # pooled before the projection: equal to the full maps up to float rounding, but not the same numbers;
            # recorded only when true so that the folders of full-cache experiments keep their names
            self.resolved["cache_pooled"] = True
        if self.cfg["general"].get("storage"):
            self.storage  # an unreachable server is reported before anything is written
        self._check_batches(labels, split, method_cfgs)
        if D.is_main():
            self._claim_folder(dataset, split)
        cache = None
        if k > 0 and cache_cfg.get("enabled", True):
            from ..data import cache_root
            folder = Path(cache_cfg.get("folder") or cache_root())
            views = int(cache_cfg.get("views", 5))
            info = {"dataset": dataset.fingerprint(), "trunk": trunk.name, "weights": trunk.weights_id, "frozen_blocks": k,
                    "image_size": size, "train_transform": train_opts, "eval_transform": eval_opts, "views": views, "seed": int(cache_cfg.get("seed", 0))}
            cache = FeatureCache.planned(folder, info, dataset, torch.nn.Sequential(*list(trunk.blocks)[:k]), train_tf,
                                         eval_tf, views, device, method_cfgs,
                                         trunk.num_blocks, cache_cfg, progress=self.progress)
        source = T.FeatureSource(dataset, cache, train_tf, eval_tf, int(cfg["trainer"].get("num_workers", 0)))
        self.ctx = T.RunContext(dataset, labels, source, trunk, k, device, self.progress)
        if D.is_main():
            D.barrier()
        return self.ctx

    def _check_batches(self, labels: np.ndarray, split, method_cfgs: List[Dict[str, Any]]) -> None:
        """Every method's sampler gives at least one batch on every fold's training classes (ConfigError naming the
        fold and the fix otherwise), before the folder is claimed."""
        seed = int(self.cfg["general"].get("seed", 0))
        for method, mcfg in zip(self.methods, method_cfgs):
            for f, (tr, _) in enumerate(split.folds):
                train_labels = np.unique(labels[np.asarray(tr)], return_inverse=True)[1]
                try:
                    T.make_batches(train_labels, C.resolve(mcfg), 1, seed)
                except (C.ConfigError, AssertionError, ValueError) as exc:  # PML's sampler asserts on its sizes
                    raise C.ConfigError(f"method {method!r}, fold {f} ({len(set(train_labels.tolist()))} training "
                                        f"classes): the sampler cannot make one batch of "
                                        f"{mcfg['trainer']['batch_size']} ({' '.join(str(exc).split())[:160]}); use "
                                        f"a smaller --trainer.batch_size or a data set with more classes") from None

    def fingerprint(self, dataset) -> Dict[str, Any]:
        """What decides this experiment's results: every method's config (overlays, overrides, search markers),
        the values ``auto`` resolved to here (device type, frozen blocks, cache views, image size), the budget and
        the data set's content."""
        return {"methods": {m: result_view(self.method_config(m)) for m in self.methods},
                "shared": {"resolved": self.resolved, "dataset": dataset.fingerprint(),
                           "budget": {"n_trials": self.cfg["general"]["n_trials"],
                                      "reproductions": self.cfg["general"]["reproductions"],
                                      "search_mode": self.search_mode, "seed": self.cfg["general"].get("seed", 0)}}}

    def _claim_folder(self, dataset, split) -> None:
        """Refuse a folder that holds another configuration's results (nothing is written then); else write
        ``config.yaml``, ``splits.json`` and ``experiment.json`` (fingerprint, versions). Atomic: a new folder is
        written under a temporary name and renamed into place, so of two workers starting one experiment with
        different configurations one owns the folder and the other is refused without writing anything; an existing
        folder is checked and updated under a lock."""
        fp = self.fingerprint(dataset)
        self.fingerprint_hash = stable_hash(fp["shared"])
        if not self.folder.exists():
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.claim-", dir=self.folder.parent))
            try:
                self._write_identity(tmp, fp, split, write_splits=True)
                os.rename(tmp, self.folder)  # fails when another worker's folder is there first
                return
            except OSError:
                if not self.folder.is_dir():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        with _folder_lock(self.folder):
            path = self.folder / "experiment.json"
            old = read_json_checked(path, "move it away, or --restart to start the experiment over") \
                if path.is_file() else None
            if old is not None:
                before = old.get("fingerprint")
                if before is None:
                    raise C.ConfigError(f"{self.folder} was made by an older version of this benchmark without a "
                                        f"fingerprint: use a new --experiment_name, or --restart to start it over "
                                        f"(the old folder is kept as a backup)")
                diffs = fingerprint_diff(before, fp)
                if diffs:
                    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
                    raise C.ConfigError(f"experiment {self.name!r} was run with another configuration ({shown}): use "
                                        f"a new --experiment_name, or add --restart to start it over (the old folder "
                                        f"is kept as a backup)")
                fp["methods"] = {**before["methods"], **fp["methods"]}
            split_path = self.folder / "splits.json"
            if split_path.is_file() and read_json_checked(split_path, "--restart to start the experiment over") \
                    != split.to_dict():
                raise C.ConfigError(f"{split_path} holds other splits than this config makes (another data set or "
                                    f"options?); use a new --experiment_name, or add --restart to start the "
                                    f"experiment over")
            self._write_identity(self.folder, fp, split, write_splits=not split_path.is_file())

    def _write_identity(self, folder: Path, fp: Dict[str, Any], split, write_splits: bool) -> None:
        import optuna as _optuna
        import pytorch_metric_learning
        C.dump(self.cfg, folder / "config.yaml")
        if write_splits:
            split.save(folder / "splits.json")
        atomic_write_json(folder / "experiment.json", {
            "name": self.name, "dataset": self.cfg["dataset"]["name"], "loss": registry.split_spec(self.cfg["loss"])[0],
            "methods": self.methods, "reference": self.reference,
            "storage": self.storage_url if not self.cfg["general"].get("storage") else "(given)",
            "versions": {"torch": torch.__version__, "pytorch_metric_learning": pytorch_metric_learning.__version__,
                         "optuna": _optuna.__version__},
            "fingerprint": fp})

    # ---------------------------------------------------------------- training units
    def run_dir(self, method: str, ccfg: Dict[str, Any], fold: int, seed: int) -> Path:
        """``runs/<method>/<hash>``: the hash covers the training config, the values ``auto`` resolved to, fold, seed."""
        return self.folder / "runs" / method / stable_hash({"cfg": training_key(ccfg), "resolved": self.resolved,
                                                            "fold": fold, "seed": seed})

    def _train_folds(self, method: str, ccfg: Dict[str, Any], seed: int, descs: Sequence[str]) -> Dict[int, Dict[str, Any]]:
        """Every fold of one configuration and seed trained; ``{fold: result}``. On the worker processes when there
        are some (``general.workers``), in the main process otherwise."""
        pool = getattr(self, "pool", None)
        if pool is None:
            return {f: self._train(method, ccfg, f, seed, desc=d) for f, d in enumerate(descs)}

        def done(i, result):
            if getattr(self, "bar", None) is not None:
                self.bar.update(1)
        results = pool.run([(method, ccfg, f, seed, d) for f, d in enumerate(descs)], on_done=done)
        return dict(enumerate(results))

    def _train(self, method: str, ccfg: Dict[str, Any], fold: int, seed: int, desc: str, on_epoch=None,
               count: bool = True) -> Dict[str, Any]:
        tr, va = self.split.folds[fold]
        D.lead([method, ccfg, fold, seed, desc])  # torchrun: the other ranks train this fold in lockstep
        try:
            return T.train_fold(ccfg, self.ctx, np.asarray(tr), np.asarray(va), self.run_dir(method, ccfg, fold, seed), seed,
                                desc=desc, on_epoch=on_epoch)
        except T.NonFiniteLossError as exc:
            raise TrialFailed(f"{slots.NONFINITE}: {exc}") from exc
        finally:
            if count and getattr(self, "bar", None) is not None:  # the whole experiment's ETA (see run)
                self.bar.update(1)

    def study(self, method: str, part: str) -> optuna.Study:
        g = self.cfg["general"]
        search = self.cfg.get("search", {})
        pruner = optuna.pruners.MedianPruner(n_startup_trials=int(search.get("pruner_startup_trials", 3))) \
            if g.get("pruner", "none") == "median" else optuna.pruners.NopPruner()
        try:
            study = optuna.create_study(study_name=study_name(self.study_prefix, method, part), storage=self.storage,
                                        direction="maximize", sampler=self.sampler(0), pruner=pruner,
                                        load_if_exists=True)
        except (optuna.exceptions.StorageInternalError, _db_errors()) as exc:
            raise damaged_storage(self.storage_url, exc) from None
        # workers sharing a storage must run the same configuration
        mine = stable_hash({"shared": self.fingerprint_hash, "method": self._method_fingerprint(method)})
        theirs = study.user_attrs.get("fingerprint")
        if theirs is None:
            study.set_user_attr("fingerprint", mine)
            study.set_user_attr("role", "search trials (one per slot; surplus/retried trials are bookkeeping)"
                                if part == "search" else "reproductions of the best search trial, tested")
        elif theirs != mine:
            raise C.ConfigError(f"the study {study.study_name} in {self.storage_url} was made with another "
                                f"configuration of {method!r} (another worker's or an earlier run's): use the same "
                                f"config on every worker, or a new --experiment_name")
        return study

    @property
    def recall_ks(self) -> Optional[List[int]]:
        """Recall@K's K values (``eval.recall_at``), or None."""
        ks = (self.cfg.get("eval") or {}).get("recall_at")
        return [int(k) for k in ks] if ks else None

    def _method_fingerprint(self, method: str) -> str:
        return stable_hash(_without_nulls(result_view(self.method_config(method))))

    @property
    def reference(self) -> str:
        """The method the others are compared with (``general.reference``, default the first method)."""
        ref = self.cfg["general"].get("reference")
        return registry.canonical_name("method", ref) if ref else self.methods[0]

    def sampler(self, slot: int) -> optuna.samplers.BaseSampler:
        """TPE, seeded by ``general.seed`` (the one seed, ``--seed``) and the slot."""
        search = self.cfg.get("search", {})
        seed = int(self.cfg["general"].get("seed", 0)) + 7919 * slot
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(search.get("n_startup_trials", 5)))

    def n_trials(self, method: str) -> int:
        return int(self.cfg["general"]["n_trials"]) if C.search_space(self.method_config(method)) else 1

    def search(self, method: str) -> Dict[str, Any]:
        """Step 1: the Optuna study; returns the best trial's parameters (empty for a method with nothing to search)."""
        self.setup()
        mcfg = self.method_config(method)
        space = C.search_space(mcfg)
        study = self.study(method, "search")
        seed = int(self.cfg["general"].get("seed", 0))
        n = self.n_trials(method)
        pruning = self.cfg["general"].get("pruner", "none") != "none"

        def work(trial: optuna.Trial, slot: int) -> float:
            # seeded per slot: a resumed search proposes what an uninterrupted one would have
            study.sampler = self.sampler(slot)
            params = {path: C.suggest(trial, path, marker) for path, marker in space.items()}
            ccfg = C.resolve(mcfg, params)
            values, t0 = [], time.perf_counter()
            folds = range(len(self.split.folds))
            for f in folds:
                record_run(self.folder, self.run_dir(method, ccfg, f, seed), method, "trial", slot, f, seed, params,
                           ccfg, self.resolved)
            descs = [f"{method} trial {slot + 1}/{n} fold {f + 1}" for f in folds]
            # in parallel unless a pruner must see the folds one by one
            done = self._train_folds(method, ccfg, seed, descs) if not pruning else {}
            for f in folds:
                res = done[f] if f in done else self._train(method, ccfg, f, seed, desc=descs[f])
                v = res["val"][T.OBJECTIVE]
                values.append(v)
                trial.set_user_attr(f"fold{f}", res["val"])
                trial.report(float(np.mean(values)), f)
                if trial.should_prune():
                    ExperimentLog(self.folder).trial(method, slot, n, params, float(np.mean(values)),
                                                     time.perf_counter() - t0, state=f"pruned after fold {f + 1}")
                    raise optuna.TrialPruned()
            ExperimentLog(self.folder).trial(method, slot, n, params, float(np.mean(values)), time.perf_counter() - t0)
            return float(np.mean(values))

        slots.run_slots(study, n, work, on_wait=lambda: log.info("%s: waiting for other workers' trials", method))
        done = [t for t in slots.finished_trials(study) if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise RuntimeError(f"method {method!r}: no search trial finished (all failed or pruned); see {self.storage_url}")
        best = max(done, key=lambda t: t.value)
        return dict(best.params)

    def reproduce(self, method: str, params: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Step 2: the best configuration trained again with new seeds and tested (separate and concatenated)."""
        self.setup()
        ccfg = C.resolve(self.method_config(method), params)
        study = self.study(method, "reproductions")
        n = int(self.cfg["general"]["reproductions"])
        base = int(self.cfg["general"].get("seed", 0))
        test = np.asarray(self.split.test)
        test_labels = torch.as_tensor(self.ctx.labels[test])
        is_q, is_g = query_gallery(self.ctx.dataset, test)
        eval_bs = int(self.cfg.get("eval", {}).get("batch_size", 128))

        def work(trial: optuna.Trial, slot: int) -> float:
            seed = base + 1000 * (slot + 1)
            trial.set_user_attr("seed", seed)
            trial.set_user_attr("params", params)
            embs, t0 = [], time.perf_counter()
            folds = range(len(self.split.folds))
            for f in folds:
                record_run(self.folder, self.run_dir(method, ccfg, f, seed), method, "reproduction", slot, f, seed,
                           params, ccfg, self.resolved)
            self._train_folds(method, ccfg, seed, [f"{method} reproduction {slot + 1}/{n} fold {f + 1}" for f in folds])
            for f in folds:
                desc = f"{method} reproduction {slot + 1}/{n} fold {f + 1}"
                self._train(method, ccfg, f, seed, desc=desc, count=False)  # finished: read back
                try:
                    model = T.load_best(ccfg, self.ctx, self.run_dir(method, ccfg, f, seed))
                except DamagedFileError as exc:  # the fold is trained again: deterministic, the same model
                    T.discard_run(self.run_dir(method, ccfg, f, seed), exc.reason)
                    self._train(method, ccfg, f, seed, desc=desc)
                    model = T.load_best(ccfg, self.ctx, self.run_dir(method, ccfg, f, seed))
                embs.append(T.embed(model, self.ctx, test, eval_bs))
            per_fold, separate, concatenated, cat = fold_ensemble_metrics(embs, test_labels, is_q, is_g,
                                                                          recall_ks=self.recall_ks)
            if slot == 0:
                np.save(self.folder / f"test_embeddings_{method}.npy", cat.numpy())
            trial.set_user_attr("separate", separate)
            trial.set_user_attr("concatenated", concatenated)
            trial.set_user_attr("folds", per_fold)
            ExperimentLog(self.folder).reproduction(method, slot, n, seed, separate[T.OBJECTIVE],
                                                    concatenated[T.OBJECTIVE], time.perf_counter() - t0)
            return concatenated[T.OBJECTIVE]

        slots.run_slots(study, n, work)
        finished = slots.finished_trials(study)
        failed = [t for t in finished if t.state != optuna.trial.TrialState.COMPLETE]
        for t in failed:  # a NaN/inf reproduction keeps its slot (it was a real attempt) but has no test metrics
            print(f"warning: {method} reproduction {t.user_attrs.get(slots.SLOT)} failed: "
                  f"{t.user_attrs.get(slots.REASON)}", file=sys.stderr)
        done = [t.user_attrs for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise RuntimeError(f"method {method!r}: every reproduction failed; see {self.storage_url}")
        return done

    # ---------------------------------------------------------------- all of it
    def run(self) -> str:
        quiet_interrupts()
        self.setup()
        if not D.is_main():  # torchrun: rank 0 runs the Optuna bookkeeping and the report, this rank follows it
            D.follow(self._train, expected=(TrialFailed,))
            return ""
        t0 = time.perf_counter()
        results: Dict[str, List[Dict[str, Any]]] = {}
        best_params: Dict[str, Dict[str, Any]] = {}
        folds, reps = len(self.split.folds), int(self.cfg["general"]["reproductions"])
        workers = resolve_workers(self.cfg["general"].get("workers", "auto"), self.ctx.device.type, D.world_size())
        self.pool = FoldPool(self, workers, int(self.cfg["general"].get("num_threads") or 1)) if workers > 1 else None
        self.bar = experiment_bar(sum((self.n_trials(m) + reps) * folds for m in self.methods), enabled=self.progress)
        interrupted = True
        try:
            for method in self.methods:
                best_params[method] = self.search(method)
                results[method] = self.reproduce(method, best_params[method])
            interrupted = False
        finally:
            self.bar.close()
            self.bar = None
            if self.pool is not None:
                self.pool.close(kill=interrupted)  # on Ctrl-C or an error: at once, the folds resume from checkpoints
                self.pool = None
        D.lead(None)  # torchrun: the other ranks are done
        md = self.write_report(results, best_params)
        print(f"wall time of this invocation: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return md

    def search_summary(self, method: str) -> Dict[str, Any]:
        """Completed / pruned / failed trials of the method's search, its searched keys and ranges, its best trial."""
        finished = slots.finished_trials(self.study(method, "search"))
        done = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
        best = max(done, key=lambda t: t.value) if done else None
        return {"completed": len(done), "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in finished),
                "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in finished),
                "space": C.search_space(self.method_config(method)),
                "best": dict(best.params) if best else {}, "best_value": best.value if best else None}

    def write_report(self, results, best_params) -> str:
        from . import plots, report

        dataset = self.cfg["dataset"]["name"]
        records, per_fold = [], []
        for method, reps in results.items():
            for rep in reps:
                slot, seed = rep.get(slots.SLOT), rep["seed"]
                for emb in report.EMBEDDINGS:
                    for metric, value in rep[emb].items():
                        records.append({"dataset": dataset, "method": method, "embedding": emb, "metric": metric,
                                        "value": value, "seed": seed, "reproduction": slot})
                for fold, metrics in enumerate(rep["folds"]):
                    for metric, value in metrics.items():
                        per_fold.append({"dataset": dataset, "method": method, "embedding": "fold", "metric": metric,
                                         "value": value, "seed": seed, "reproduction": slot, "fold": fold})
        rows = report.summarize(records)
        diffs = report.paired_differences(records, self.reference)
        loss = registry.split_spec(self.cfg["loss"])[0]
        summaries = {m: self.search_summary(m) for m in self.methods}
        preface = ""
        completed = {m: s["completed"] for m, s in summaries.items()}
        if len(set(completed.values())) > 1:
            preface = ("**Unequal budgets: the methods did not get the same number of completed search trials ("
                       + ", ".join(f"{m}: {n}" for m, n in completed.items())
                       + "). The comparison is not a fair one.**")
        mode = {"shared": "every method searched the same shared keys plus its own",
                "none": "nothing searched: every method ran once at its defaults",
                "own": "search.mode all: each method searched its own keys"}[self.search_mode]
        lines = [f"Loss: `{loss}`; data set: `{dataset}`; {len(self.split.folds)} folds; search: {mode}; "
                 f"budget: {self.cfg['general']['n_trials']} trials per searching method; "
                 f"reproductions: {self.cfg['general']['reproductions']}; reference: `{self.reference}`.", "",
                 "| Method | completed trials | searched keys (range) | best values | best validation MAP@R |",
                 "|---|---:|---|---|---:|"]
        for method, sm in summaries.items():
            keys = "; ".join(f"`{k}` {_marker_range(v)}" for k, v in sm["space"].items()) or "(none)"
            best = "; ".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}"
                             for k, v in sm["best"].items()) or "(defaults)"
            value = "–" if sm["best_value"] is None else f"{100 * sm['best_value']:.2f}"
            extra = "".join(f", {sm[k]} {k}" for k in ("pruned", "failed") if sm[k])
            lines.append(f"| {method} | {sm['completed']}{extra} | {keys} | {best} | {value} |")
        md = report.write_report(self.folder, rows, f"{self.name}: {loss} on {dataset}", notes="\n".join(lines),
                                 diffs=diffs, preface=preface, reproductions=per_fold + records)
        self._plots(plots, rows)
        return md

    def _plots(self, plots, rows) -> None:
        trials = []
        for method in self.methods:
            for t in self.study(method, "search").get_trials(deepcopy=False):
                if t.user_attrs.get(slots.REASON) == slots.SURPLUS:
                    continue
                trials.append({"number": t.number, "value": t.value if t.state.name == "COMPLETE" else
                               (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
                               "state": t.state.name, "method": method, "params": dict(t.params)})
        try:
            plots.plot_history(trials, self.folder / "optimization_history.png")
            names = sorted({p for t in trials for p in t["params"]})
            for p in names:
                plots.plot_param(trials, p, self.folder / f"objective_vs_{p.split('.')[-1]}.png")
            plots.plot_metrics(rows, self.folder / "final_metrics.png")
            self._retrieval_plot(plots)
        except Exception as exc:  # a plot must never cost the results
            print(f"warning: a plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _retrieval_plot(self, plots, n_queries: int = 6, k: int = 5) -> None:
        ds, test = self.ctx.dataset, np.asarray(self.split.test)
        labels = self.ctx.labels[test]
        rng = np.random.default_rng(0)
        queries = rng.choice(len(test), size=min(n_queries, len(test)), replace=False)
        for method in self.methods:
            path = self.folder / f"test_embeddings_{method}.npy"
            if not path.is_file():
                continue
            e = torch.nn.functional.normalize(torch.from_numpy(np.load(path)), dim=1)
            sims = e[queries] @ e.T  # [q, N]
            sims[torch.arange(len(queries)), torch.as_tensor(queries)] = -float("inf")
            nn_idx = sims.topk(k, dim=1).indices.numpy()
            plots.plot_retrieval([ds.image(int(test[q])) for q in queries], [int(labels[q]) for q in queries],
                                 [[ds.image(int(test[j])) for j in row] for row in nn_idx],
                                 [[int(labels[j]) for j in row] for row in nn_idx],
                                 self.folder / f"retrieval_{method}.png", k=k)
