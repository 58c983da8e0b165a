"""Layered YAML configs, command-line overrides and search-space markers.

A config is one nested dict. ``benchmark_configs/<category>/<name>.yaml`` files are merged in order
(all categories' ``default.yaml`` first, then the names chosen with ``--config_<category> NAME ...``),
then the command-line overrides:

* ``--a.b.c VALUE``          set a key (VALUE is parsed as YAML; a dict VALUE is merged into a dict)
* ``--a.b~replace VALUE``    replace the key's value wholesale instead of merging (``~OVERRIDE~``, powerful-benchmarker's
                             spelling, is the same flag)
* ``--a.b~delete``           delete the key (also ``~DELETE~``)

``--config_<category>`` takes names (``default with_x``, or powerful-benchmarker's list form ``[default, with_x]``) or
paths of YAML files.

A value of the form ``{search: float|int|categorical, low:, high:, log:, step:, choices:, default:}`` is a
*search marker*: the protocol's Optuna study tunes it, with the dotted path as the parameter name.
"""
from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "benchmark_configs"
CATEGORIES = (
    "config_general",
    "config_dataset",
    "config_models",
    "config_loss_and_miners",
    "config_optimizers",
    "config_transforms",
    "config_eval",
    "config_search",
)  # config_methods/ holds the methods' overlays: see xml_plugin.methods
REPLACE, DELETE = "~replace", "~delete"
FLAGS = {REPLACE: "replace", "~OVERRIDE~": "replace", DELETE: "delete", "~DELETE~": "delete"}  # key suffix -> mode
SEARCH_TYPES = ("float", "int", "categorical")


class ConfigError(ValueError):
    """A config that cannot work, caught at start-up."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.2; PyYAML's 1.1 rules need ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def config_root() -> Path:
    """``$XML_PLUGIN_CONFIG_ROOT``, else the configs shipped inside the installed package, else the checkout's
    top-level ``benchmark_configs/``."""
    if os.environ.get("XML_PLUGIN_CONFIG_ROOT"):
        return Path(os.environ["XML_PLUGIN_CONFIG_ROOT"])
    shipped = Path(__file__).resolve().parent / "benchmark_configs"  # package data of a wheel (setup.cfg)
    return shipped if shipped.is_dir() else CONFIG_ROOT


def available(category: str, root: Optional[Path] = None) -> List[str]:
    folder = (root or config_root()) / category
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_yaml(path: Path) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level, got {type(data).__name__}")
    return data


def split_flag(key: Any) -> Tuple[Any, str]:
    """``'a~replace'`` / ``'a~OVERRIDE~'`` -> ``('a', 'replace')``, ``'a~delete'`` / ``'a~DELETE~'`` -> ``('a',
    'delete')``, ``'a'`` -> ``('a', 'merge')``. Another ``~`` flag is a ConfigError (powerful-benchmarker's ``~APPLY~``
    and ``~SWAP~`` have no equivalent here)."""
    if not isinstance(key, str) or "~" not in key:
        return key, "merge"
    base, flag = key[: key.index("~")], key[key.index("~"):]
    if flag in FLAGS:
        return base, FLAGS[flag]
    if flag.startswith(("~APPLY~", "~SWAP~")):
        raise ConfigError(f"{key!r}: powerful-benchmarker's {flag.rstrip('0123456789')} has no equivalent here; set the "
                          f"keys themselves (--trainer.batch_size 256), or translate the config folder with "
                          f"run.py --from_pb FOLDER")
    raise ConfigError(f"{key!r}: unknown flag {flag!r}; the flags are ~replace (or ~OVERRIDE~) and ~delete (or ~DELETE~)")


def merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive merge of ``over`` into a copy of ``base``. Keys ending in ``~replace`` (``~OVERRIDE~``) replace,
    ``~delete`` (``~DELETE~``) delete.

    A search marker is a leaf: it replaces whatever was there (and is replaced by a plain value).
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        key, mode = split_flag(key)
        if mode == "delete":
            out.pop(key, None)
        elif mode == "replace":
            out[key] = _fresh(value)
        elif (isinstance(value, dict) and isinstance(out.get(key), dict)
              and not is_search_marker(value) and not is_search_marker(out[key])):
            out[key] = merge(out[key], value)
        else:
            out[key] = _inherit_default(_fresh(value), out.get(key))
    return out


def _inherit_default(value: Any, replaced: Any) -> Any:
    """A search marker without ``default`` that replaces a plain value in range keeps that value as its default, so that
    a file adding a search (``config_search/xml_full.yaml``) does not reset what an earlier file set when the key is not
    searched (SOP's 128 prototypes)."""
    if not is_search_marker(value) or "default" in value or replaced is None or isinstance(replaced, (dict, list)):
        return value
    if value["search"] == "categorical":
        ok = replaced in (value.get("choices") or [])
    else:
        ok = (isinstance(replaced, (int, float)) and not isinstance(replaced, bool)
              and "low" in value and "high" in value and value["low"] <= replaced <= value["high"])
    return {**value, "default": replaced} if ok else value


def _fresh(value: Any) -> Any:
    """A copy of ``value`` in which nested ``~replace``/``~delete`` keys are applied (not kept as literal keys)."""
    if isinstance(value, dict) and not is_search_marker(value):
        return merge({}, value)
    return copy.deepcopy(value)


def is_config_path(name: str) -> bool:
    """Is a ``--config_<category>`` word a YAML file's path (``my/ms.yaml``) rather than a config name?"""
    return name.endswith((".yaml", ".yml")) or "/" in name or os.sep in name


def config_names(words: Optional[Sequence[str]]) -> Optional[List[str]]:
    """The names given to ``--config_<category>``: ``['default', 'with_x']`` from ``default with_x`` or from
    powerful-benchmarker's list form ``[default, with_x]`` (one word or split by the shell at its spaces)."""
    if not words:
        return None if words is None else []
    text = " ".join(str(w) for w in words).strip()
    if not text.startswith("["):
        return [str(w) for w in words]
    if not text.endswith("]"):
        raise ConfigError(f"config list {text!r} is not closed: write [default, with_x] (or the names without brackets)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"config list {text!r} must list config names: [default, with_x]")
    return value


def load_category(category: str, names: Sequence[str], root: Optional[Path] = None) -> Dict[str, Any]:
    """The files ``<root>/<category>/<name>.yaml`` merged in order; a name that is a path (``is_config_path``) is read
    as it is."""
    root = root or config_root()
    cfg: Dict[str, Any] = {}
    for name in names:
        if is_config_path(name):
            path = Path(name).expanduser()
            if not path.is_file():
                raise ConfigError(f"--{category} {name}: no such file {path.resolve()} (a name without '/' or '.yaml' "
                                  f"is looked up in {root / category})")
            cfg = merge(cfg, load_yaml(path))
            continue
        path = root / category / f"{name}.yaml"
        if not path.is_file():
            import difflib
            choices = available(category, root)
            close = difflib.get_close_matches(name, choices, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"no config {name!r} in {category}: expected the file {path}.{hint} "
                              f"Available: {', '.join(choices) or '(none)'}")
        cfg = merge(cfg, load_yaml(path))
    return cfg


def load(selection: Optional[Dict[str, Sequence[str]]] = None, overrides: Iterable[Tuple[str, Any]] = (),
         root: Optional[Path] = None, presets: Sequence[Tuple[str, str]] = ()) -> Dict[str, Any]:
    """Merge every category's ``default``, then the ``presets`` (``(category, name)`` files picked for the data set
    and the loss, see :func:`presets_for`), then the selected names (category by category, in order), then the
    overrides."""
    root = root or config_root()
    selection = dict(selection or {})
    cfg: Dict[str, Any] = {}
    # every category's default first, then the chosen files: a chosen file (say config_dataset/kanji.yaml, which
    # also sets transforms and cache keys) is never undone by a later category's default
    if not (root / CATEGORIES[0] / "default.yaml").is_file():  # the general section every run needs
        raise ConfigError(f"the config folder {root} has no {CATEGORIES[0]}/default.yaml: point XML_PLUGIN_CONFIG_ROOT "
                          f"at a complete benchmark_configs/ folder, or reinstall the package with its data")
    for category in CATEGORIES:
        if (root / category / "default.yaml").is_file():
            cfg = merge(cfg, load_category(category, ["default"], root))
    for category, name in presets:
        cfg = merge(cfg, load_category(category, [name], root))
    for category in CATEGORIES:
        names = [n for n in (selection.pop(category, None) or []) if n != "default"]
        cfg = merge(cfg, load_category(category, names, root))
    if selection:
        raise ConfigError(f"unknown config categories {sorted(selection)}; categories are {', '.join(CATEGORIES)}")
    for path, value in overrides:
        cfg = apply_override(cfg, path, value)
    return cfg


PRESETS = (("config_dataset", "dataset", "dataset"), ("config_loss_and_miners", "loss", "loss"))  # category, section, kind


def preset_name(cfg: Dict[str, Any], section: str, kind: str, category: str, root: Optional[Path] = None) -> Optional[str]:
    """The canonical name of the component in ``cfg[section]`` if ``<category>/<name>.yaml`` ships, else None."""
    from . import registry
    spec = cfg.get(section)
    name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        return None
    try:
        name = registry.canonical_name(kind, name)
    except registry.UnknownComponentError:
        return None  # reported with close matches when the experiment checks its names
    return name if (Path(root or config_root()) / category / f"{name}.yaml").is_file() else None


def presets_for(selection: Optional[Dict[str, Sequence[str]]] = None, overrides: Iterable[Tuple[str, Any]] = (),
                root: Optional[Path] = None) -> List[Tuple[str, str]]:
    """The files merged automatically after the defaults and before the user's own files and overrides, for the data
    set and loss the config ends up with: ``config_dataset/<dataset>.yaml`` (an embedded data set's transforms) and
    ``config_loss_and_miners/<loss>.yaml`` (the loss's search space, so that every method searches it unless the user
    fixes a value). ``search.loss_space: false`` leaves the loss's space out."""
    overrides = list(overrides)
    cfg = load(selection, overrides, root)
    out = []
    for category, section, kind in PRESETS:
        if section == "loss" and not (cfg.get("search") or {}).get("loss_space", True):
            continue
        name = preset_name(cfg, section, kind, category, root)
        if name is not None:
            out.append((category, name))
    return out


def apply_override(cfg: Dict[str, Any], dotted: str, value: Any = None) -> Dict[str, Any]:
    """Set ``a.b.c`` (merge), ``a.b.c~replace`` (``~OVERRIDE~``) or delete ``a.b.c~delete`` (``~DELETE~``) in a copy
    of ``cfg``."""
    dotted, mode = split_flag(dotted)
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"bad config path {dotted!r}")
    out = copy.deepcopy(cfg)
    node = out
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            if mode == "delete":
                return out
            node[k] = {}
        node = node[k]
    last = keys[-1]
    if mode == "delete":
        node.pop(last, None)
    elif (mode == "merge" and isinstance(value, dict) and isinstance(node.get(last), dict)
          and not is_search_marker(value)):
        node[last] = merge(node[last], value)
    else:
        node[last] = _fresh(value)
    return out


def parse_value(text: str) -> Any:
    """Command-line value -> Python: YAML scalars, lists and flow mappings (``'{name: contrastive}'``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def parse_overrides(argv: Sequence[str]) -> List[Tuple[str, Any]]:
    """``["--a.b", "1", "--c~delete"]`` -> ``[("a.b", 1), ("c~delete", None)]``.

    Several values after one key make a list (``--general.methods baseline xml``).
    """
    out: List[Tuple[str, Any]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.key VALUE")
        key = tok[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            out.append((key, parse_value(text)))
            i += 1
            continue
        values = []
        i += 1
        while i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2 and not _is_number(argv[i])):
            values.append(parse_value(argv[i]))
            i += 1
        if split_flag(key)[1] == "delete":
            if values and values not in ([None], [{}]):  # PB writes {embedder_optimizer~DELETE~: {}}
                raise ConfigError(f"--{key} takes no value")
            out.append((key, None))
        elif not values:
            raise ConfigError(f"--{key} needs a value")
        else:
            out.append((key, values[0] if len(values) == 1 else values))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def leaf_paths(cfg: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted paths of the leaves of a (nested) mapping; search markers and ``~replace`` values are leaves."""
    out: List[str] = []
    for key, value in cfg.items():
        name, mode = split_flag(key)
        path = f"{prefix}{name}"
        if isinstance(value, dict) and value and not is_search_marker(value) and mode != "replace":
            out.extend(leaf_paths(value, path + "."))
        else:
            out.append(path)
    return out


def get_path(cfg: Dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def set_path(cfg: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


# --------------------------------------------------------------------------------------------
# search markers

def is_search_marker(value: Any) -> bool:
    return isinstance(value, dict) and "search" in value and value.get("search") in SEARCH_TYPES


def validate_marker(path: str, marker: Dict[str, Any]) -> None:
    kind = marker["search"]
    if kind in ("float", "int"):
        for k in ("low", "high"):
            if k not in marker:
                raise ConfigError(f"search marker {path}: a {kind} search needs '{k}' (got {marker})")
        if not marker["low"] < marker["high"]:
            raise ConfigError(f"search marker {path}: low must be < high (got {marker['low']}, {marker['high']})")
        if marker.get("log") and marker["low"] <= 0:
            raise ConfigError(f"search marker {path}: a log-scale search needs low > 0 (got {marker['low']})")
    elif not marker.get("choices"):
        raise ConfigError(f"search marker {path}: a categorical search needs a non-empty 'choices' list")


def search_space(cfg: Dict[str, Any], prefix: str = "") -> Dict[str, Dict[str, Any]]:
    """Every search marker in ``cfg`` by dotted path (the Optuna parameter names), in a stable order."""
    out: Dict[str, Dict[str, Any]] = {}
    for key in cfg:
        value = cfg[key]
        path = f"{prefix}{key}"
        if is_search_marker(value):
            validate_marker(path, value)
            out[path] = value
        elif isinstance(value, dict) and isinstance(value.get("search"), str):
            raise ConfigError(f"search marker {path}: unknown search type {value['search']!r}; "
                              f"types are {', '.join(SEARCH_TYPES)}")
        elif isinstance(value, dict):
            out.update(search_space(value, path + "."))
    return out


def marker_default(marker: Dict[str, Any]) -> Any:
    """The value used when a marked key is not searched: ``default``, else the (geometric) middle / first choice."""
    if "default" in marker:
        return marker["default"]
    if marker["search"] == "categorical":
        return marker["choices"][0]
    low, high = marker["low"], marker["high"]
    mid = math.sqrt(low * high) if marker.get("log") else (low + high) / 2
    return int(round(mid)) if marker["search"] == "int" else mid


def suggest(trial: Any, path: str, marker: Dict[str, Any]) -> Any:
    """Ask an Optuna trial for a value of a marked key."""
    kind = marker["search"]
    if kind == "float":
        return trial.suggest_float(path, float(marker["low"]), float(marker["high"]), log=bool(marker.get("log", False)),
                                   step=marker.get("step"))
    if kind == "int":
        return trial.suggest_int(path, int(marker["low"]), int(marker["high"]), log=bool(marker.get("log", False)),
                                 step=int(marker.get("step", 1)))
    return trial.suggest_categorical(path, list(marker["choices"]))


def resolve(cfg: Dict[str, Any], params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A concrete config: each marker replaced by ``params[path]`` when given, else by its default."""
    params = params or {}
    out = copy.deepcopy(cfg)
    for path, marker in search_space(cfg).items():
        set_path(out, path, params[path] if path in params else marker_default(marker))
    unknown = set(params) - set(search_space(cfg))
    if unknown:
        raise ConfigError(f"parameters {sorted(unknown)} match no search marker in the config")
    return out


def dump(cfg: Dict[str, Any], path: Path) -> None:
    """Write ``cfg`` as YAML atomically."""
    from .engine.io import atomic_write_text
    atomic_write_text(Path(path), yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))


# --------------------------------------------------------------------------------------------
# strict keys

METHOD_OVERRIDES = "method_overrides"


def schema(root: Optional[Path] = None) -> Dict[str, Any]:
    """The known keys: every category's ``default.yaml`` merged, plus the sections the method overlays set."""
    root = root or config_root()
    known: Dict[str, Any] = {}
    for category in CATEGORIES:
        if (root / category / "default.yaml").is_file():
            known = merge(known, load_yaml(root / category / "default.yaml"))
    for path in sorted((root / "config_methods").glob("*.yaml")):
        for key, value in load_yaml(path).items():
            known.setdefault(key, None if isinstance(value, dict) and "name" in value else value)
    return known


# top-level keys of powerful-benchmarker's config folders (xml_plugin.pb_compat translates them)
PB_KEYS = frozenset({"loss_funcs", "mining_funcs", "optimizers", "lr_schedulers", "models", "num_epochs_train",
                     "save_interval", "split_manager", "splits_to_eval", "eval_batch_size", "factories", "tester",
                     "aggregator", "ensemble", "hook_container", "check_untrained_accuracy", "bayes_opt_iters"})
PATH_KEYS = ("general.experiment_folder", "general.storage", "dataset.root", "cache.folder")  # one string or null


def _check_one_value(path: str, spec: Any, value: Any) -> None:
    """A key whose default is one value (a number, a word) or a path takes one value: several words after
    ``--general.experiment_folder`` (a list) are an error, not a traceback later."""
    one = path in PATH_KEYS or (spec is not None and not isinstance(spec, (list, dict)))
    if one and isinstance(value, (list, dict)) and not is_search_marker(value):
        kind = "a list" if isinstance(value, list) else "a mapping"
        raise ConfigError(f"{path} takes one value, got {kind} {value!r} (several words after --{path} make a list; "
                          f"quote a value with spaces: --{path} 'a b')")


def _is_component(value: Any) -> bool:
    """A component section (``{name: ..., options: ...}`` or null until a method sets it): its options are checked
    against the component's constructor, not here."""
    return value is None or (isinstance(value, dict) and "name" in value)


def check_keys(cfg: Dict[str, Any], known: Optional[Dict[str, Any]] = None, prefix: str = "") -> None:
    """Raise ConfigError for a key that no default config has (a typo such as ``trainer.batchsize``), with close matches.

    Mappings that are empty in the defaults (``dataset.options``) and component sections are free-form here.
    """
    import difflib
    top = known is None
    known = schema() if known is None else known
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if top and key == METHOD_OVERRIDES:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{METHOD_OVERRIDES} must map method names to config sections, got {value!r}")
            for method, sub in (value or {}).items():
                if not isinstance(sub, dict):
                    raise ConfigError(f"{METHOD_OVERRIDES}.{method} must be a mapping of config sections, got {sub!r}")
                check_keys(sub, known, f"{METHOD_OVERRIDES}.{method}.")
            continue
        if key not in known:
            close = difflib.get_close_matches(key, [str(k) for k in known], n=3)
            hint = f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""
            if not prefix and key in PB_KEYS:
                hint = (f"{key!r} is a powerful-benchmarker key: translate your config folder with run.py --from_pb "
                        f"FOLDER (README, 'Coming from powerful-benchmarker'); ")
            raise ConfigError(f"unknown config key {path!r}: {hint}known keys here: {', '.join(map(str, known))} "
                              f"(run.py --print_config shows the whole config)")
        spec = known[key]
        _check_one_value(path, spec, value)
        if _is_component(spec) and prefix.count(".") == (2 if prefix.startswith(METHOD_OVERRIDES) else 0):
            if isinstance(value, dict) and not is_search_marker(value):
                if "name" not in value and not prefix.startswith(METHOD_OVERRIDES):  # there: merged into the overlay
                    raise ConfigError(f"{path} has no 'name': give the component, e.g. --{path}.name NAME, "
                                      f"or set it as '{{name: NAME, options: {{...}}}}'")
                if value.get("options") is not None and not isinstance(value["options"], dict):
                    raise ConfigError(f"{path}.options must be a mapping such as '{{margin: 0.2}}', got "
                                      f"{value['options']!r} (is the YAML value complete?)")
            elif value is not None and not isinstance(value, str):
                raise ConfigError(f"{path} must be a component name or '{{name: NAME, options: {{...}}}}', got {value!r}")
            for sub, v in (value.items() if isinstance(value, dict) else ()):  # dataset.root
                _check_one_value(f"{path}.{sub}", None, v)
            continue
        if isinstance(spec, dict) and spec and isinstance(value, dict) and not is_search_marker(value):
            check_keys(value, spec, path + ".")
