"""``run.py --from_pb PB_CONFIG_ROOT``: a powerful-benchmarker (PB) config folder translated into configs here.

PB keeps one YAML folder per category (``config_general/``, ``config_models/`` ...), merges the chosen names of each
(``--config_general [default, with_x]``) with its own flags (``~OVERRIDE~``, ``~DELETE~``, ``~APPLY~N``, ``~SWAP~N``),
and names every component by its class, as the key of a one-key mapping::

    loss_funcs: {metric_loss: {MultiSimilarityLoss: {alpha: 0.1}}}
    optimizers: {trunk_optimizer: {RMSprop: {lr: 1.0e-6}}}
    models: {trunk: {bninception: {pretrained: imagenet}}, embedder: {MLP: {layer_sizes: [128]}}}

A key ``alpha~LOG_BAYESIAN~: [0.01, 100]`` (``~BAYESIAN~``, ``~INT_BAYESIAN~``) is a search range. :func:`load_pb`
merges a folder as PB does, :func:`translate` maps what has an equivalent here (losses, miners, sampler ``m``,
optimizers and their learning rates, trunk, embedder size, batch size, iterations, epochs, folds, the split scheme,
transforms, search ranges as search markers) and lists every other key with the reason, :func:`write` saves the
result as ``<out>/<category>/from_pb.yaml`` files that ``--config_<category> PATH`` reads.
"""
from __future__ import annotations

import copy
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from . import config as C

OUT_NAME = "from_pb"
REPORT = "translation.md"
SECTION_CATEGORY = {"general": "config_general", "trainer": "config_general", "sampler": "config_general",
                    "dataset": "config_dataset", "trunk": "config_models", "embedder": "config_models",
                    "loss": "config_loss_and_miners", "miner": "config_loss_and_miners",
                    "optimizer": "config_optimizers", "transforms": "config_transforms", "eval": "config_eval"}
_BAYES = re.compile(r"^(.*)~(BAYESIAN|LOG_BAYESIAN|INT_BAYESIAN)~$")
_PB_FLAG = re.compile(r"^(.*)~(OVERRIDE|DELETE|APPLY|SWAP)~(\d*)$")
SEARCHABLE = ("loss.", "miner.", "optimizer.options.", "embedder.size")  # where a marker may land here


# --------------------------------------------------------------------------------------------
# reading a PB folder

def pb_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """PB's merge of ``over`` into a copy of ``base``: mappings merge recursively; ``key~OVERRIDE~`` replaces,
    ``key~DELETE~`` deletes, ``key~APPLY~N: {...}`` merges the mapping into every mapping N levels down in ``key``'s
    value (its value is level 1), ``key~SWAP~N: {old: new}`` renames keys at level N (``{new: ...}``: the only key)."""
    out = copy.deepcopy(base)
    for raw, value in (over or {}).items():
        m = _PB_FLAG.match(raw) if isinstance(raw, str) else None
        key, flag, depth = (m.group(1), m.group(2), int(m.group(3) or 1)) if m else (raw, None, 0)
        if flag == "DELETE":
            out.pop(key, None)
        elif flag == "OVERRIDE":
            out[key] = pb_merge({}, value) if isinstance(value, dict) else copy.deepcopy(value)
        elif flag == "APPLY":
            out[key] = _at_depth(out.get(key), depth, lambda d: pb_merge(d, value))
        elif flag == "SWAP":
            out[key] = _at_depth(out.get(key), depth, lambda d: _swap(d, value or {}))
        elif isinstance(value, dict):  # also into nothing: the flags inside apply
            out[key] = pb_merge(out[key] if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _at_depth(node: Any, depth: int, fn) -> Any:
    if not isinstance(node, dict):
        return node
    if depth <= 1:
        return fn(node)
    return {k: _at_depth(v, depth - 1, fn) for k, v in node.items()}


def _swap(node: Dict[str, Any], mapping: Dict[str, Any]) -> Dict[str, Any]:
    renames = {k: v for k, v in mapping.items() if isinstance(v, str) and k in node}
    if not renames and len(mapping) == 1 and len(node) == 1:  # {NewClass: ...}: swap the only key
        renames = {next(iter(node)): next(iter(mapping))}
    return {renames.get(k, k): v for k, v in node.items()}


def pb_categories(root: Path) -> List[str]:
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and p.name.startswith("config_"))


def load_pb(root: Path, selection: Optional[Dict[str, Sequence[str]]] = None) -> Dict[str, Dict[str, Any]]:
    """Each category of the PB folder merged as PB merges it: the names chosen for it (default: ``default``) in order.
    Returns ``{category: merged mapping}``."""
    root = Path(root)
    if not root.is_dir() or not pb_categories(root):
        raise C.ConfigError(f"--from_pb {root}: not a powerful-benchmarker config folder (expected folders such as "
                            f"{root}/config_general/, config_models/ ... holding YAML files)")
    selection = dict(selection or {})
    out: Dict[str, Dict[str, Any]] = {}
    for category in pb_categories(root):
        names = list(selection.pop(category, None) or ["default"])
        merged: Dict[str, Any] = {}
        for name in names:
            path = root / category / f"{name}.yaml"
            if not path.is_file():
                if names == ["default"]:
                    break  # a category without a default is simply not used
                raise C.ConfigError(f"--from_pb: no {path}; {category} holds "
                                    f"{', '.join(sorted(p.stem for p in path.parent.glob('*.yaml'))) or 'nothing'}")
            merged = pb_merge(merged, C.load_yaml(path))
        out[category] = merged
    if selection:
        raise C.ConfigError(f"--from_pb {root}: no folder {', '.join(sorted(selection))} in it "
                            f"(it has {', '.join(pb_categories(root))})")
    return out


def search_ranges(node: Any, path: str, left: List[Tuple[str, str]]) -> Any:
    """``key~BAYESIAN~: [low, high]`` -> ``key: {search: float, low, high}`` everywhere in ``node`` (``~LOG_BAYESIAN~``:
    ``log: true``; ``~INT_BAYESIAN~``: ``search: int``); a malformed range is dropped into ``left``."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        m = _BAYES.match(key) if isinstance(key, str) else None
        if not m:
            out[key] = search_ranges(value, f"{path}{key}.", left)
            continue
        name, kind = m.group(1), m.group(2)
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] < value[1])
        if not ok or (kind == "LOG_BAYESIAN" and value[0] <= 0):
            left.append((f"{path}{key}", f"a search range is [low, high] with low < high (low > 0 on a log scale), "
                                         f"got {value!r}"))
            continue
        marker = {"search": "int" if kind == "INT_BAYESIAN" else "float", "low": value[0], "high": value[1]}
        if kind == "INT_BAYESIAN":
            marker.update(low=int(value[0]), high=int(value[1]))
        if kind == "LOG_BAYESIAN":
            marker["log"] = True
        out[name] = marker
    return out


# --------------------------------------------------------------------------------------------
# translation

@dataclass
class Translation:
    """``config``: this project's keys (nested); ``done``: (PB key, our key or "", note); ``left``: (PB key, reason)."""

    config: Dict[str, Any] = field(default_factory=dict)
    done: List[Tuple[str, str, str]] = field(default_factory=list)
    left: List[Tuple[str, str]] = field(default_factory=list)
    origin: Dict[str, str] = field(default_factory=dict)  # PB top-level key -> its category

    def put(self, pb_key: str, ours: str, value: Any, note: str = "") -> None:
        if C.is_search_marker(value) and not ours.startswith(SEARCHABLE):
            self.skip(pb_key, f"a search range on {ours} is not supported here (search markers go into the loss, "
                              f"miner and optimizer options and embedder.size)")
            return
        C.set_path(self.config, ours, value)
        self.done.append((pb_key, ours, note))

    def same(self, pb_key: str, note: str) -> None:
        """A PB setting that is what this project always does: translated, nothing to write."""
        self.done.append((pb_key, "", note))

    def skip(self, pb_key: str, reason: str) -> None:
        self.left.append((pb_key, reason))


def _one_class(t: Translation, path: str, value: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``{ClassName: {options}}`` -> (ClassName, options); anything else is listed as untranslated."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value)), str):
        name, opts = next(iter(value.items()))
        if opts is None or isinstance(opts, dict):
            return name, dict(opts or {})
    t.skip(path, f"expected one class with its options ({{ClassName: {{...}}}}), got {value!r}")
    return None


def _resolve(kind: str, name: str) -> Optional[str]:
    from . import registry
    try:
        return registry.canonical_name(kind, name)
    except registry.UnknownComponentError:
        return None


def _component_options(t: Translation, path: str, opts: Dict[str, Any]) -> Dict[str, Any]:
    """A PB class's options: nested ``distance: {CosineSimilarity: {}}`` / ``reducer: {...}`` become
    ``{name: ..., options: ...}``; another nested class is listed as untranslated and left out."""
    out = {}
    for key, value in opts.items():
        nested = (isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value)), str)
                  and next(iter(value))[:1].isupper() and not C.is_search_marker(value))
        if not nested:
            out[key] = value
            continue
        cls, sub = next(iter(value.items()))
        name = _resolve(key, cls) if key in ("distance", "reducer") else None
        if name is None:
            t.skip(f"{path}.{key}", f"nested component {cls!r}: only a distance or reducer registered here translates")
            continue
        out[key] = {"name": name, "options": dict(sub or {})}
    return out


def _kind_component(t: Translation, path: str, value: Any, kind: str, ours: str, note: str = "") -> None:
    one = _one_class(t, path, value)
    if one is None:
        return
    cls, opts = one
    name = _resolve(kind, cls)
    if name is None:
        t.skip(path, f"no {kind} {cls!r} here (run.py --list shows them; register your own with "
                     f"xml_plugin.register({kind!r}, YourClass))")
        return
    t.put(f"{path}.{cls}", ours, {"name": name, "options~replace": _component_options(t, f"{path}.{cls}", opts)}, note)


def _loss_funcs(t: Translation, value: Any) -> None:
    for role, spec in (value or {}).items():
        if role == "metric_loss":
            _kind_component(t, "loss_funcs.metric_loss", spec, "loss", "loss")
        else:
            t.skip(f"loss_funcs.{role}", "this project trains with one metric loss (loss_funcs.metric_loss)")


def _mining_funcs(t: Translation, value: Any) -> None:
    taken = False
    for role, spec in (value or {}).items():
        if role in ("tuple_miner", "post_gradient_miner") and not taken:
            _kind_component(t, f"mining_funcs.{role}", spec, "miner", "miner",
                            "its pairs or triplets go to the loss, as PML's tuple miner")
            taken = True
        else:
            t.skip(f"mining_funcs.{role}", "one tuple miner here (mining_funcs.tuple_miner); no subset-batch miner")


def _sampler(t: Translation, value: Any) -> None:
    if not value:
        t.skip("sampler", "random sampling has no equivalent here: batches hold m images per class (sampler.options.m)")
        return
    one = _one_class(t, "sampler", value)
    if one is None:
        return
    cls, opts = one
    name = _resolve("sampler", cls)
    if name != "m_per_class":
        t.skip(f"sampler.{cls}", "only MPerClassSampler translates (its m); other samplers are registered but take "
                                 "the engine's labels and batch size")
        return
    for key, v in opts.items():
        if key == "m":
            t.put(f"sampler.{cls}.m", "sampler.options.m", v)
        elif key not in ("labels", "batch_size", "length_before_new_iter"):
            t.skip(f"sampler.{cls}.{key}", "MPerClassSampler takes only m here (the batch size is trainer.batch_size)")
    t.put(f"sampler.{cls}", "sampler.name", "m_per_class")


def _optimizers(t: Translation, value: Any) -> None:
    """One optimizer here: its class and options from the embedder's (else the trunk's); the trunk's and the loss's
    learning rates become ``trunk_lr`` and ``loss_lr``."""
    parts = {}
    for role, spec in (value or {}).items():
        if role not in ("trunk_optimizer", "embedder_optimizer", "metric_loss_optimizer"):
            t.skip(f"optimizers.{role}", "optimizers here: trunk, embedder and the metric loss's parameters")
            continue
        one = _one_class(t, f"optimizers.{role}", spec)
        if one is not None:
            parts[role] = one
    lead = "embedder_optimizer" if "embedder_optimizer" in parts else "trunk_optimizer"
    if lead not in parts:
        for role in parts:
            t.skip(f"optimizers.{role}", "needs an embedder_optimizer or trunk_optimizer to set the optimizer's class")
        return
    cls, opts = parts[lead]
    name = _resolve("optimizer", cls)
    if name is None:
        t.skip(f"optimizers.{lead}.{cls}", f"no optimizer {cls!r} here (torch.optim's classes are registered)")
        return
    t.put(f"optimizers.{lead}.{cls}", "optimizer.name", name)
    options = {k: v for k, v in opts.items()}
    for k in options:
        t.done.append((f"optimizers.{lead}.{cls}.{k}", f"optimizer.options.{k}", ""))
    if lead == "trunk_optimizer" and "lr" in options:
        options["trunk_lr"] = options["lr"]
    for role, ours in (("trunk_optimizer", "trunk_lr"), ("metric_loss_optimizer", "loss_lr")):
        if role == lead or role not in parts:
            continue
        other_cls, other = parts[role]
        if "lr" in other:
            options[ours] = other["lr"]
            t.done.append((f"optimizers.{role}.{other_cls}.lr", f"optimizer.options.{ours}", ""))
        for k, v in other.items():
            if k != "lr" and (other_cls != cls or options.get(k) != v):
                t.skip(f"optimizers.{role}.{other_cls}.{k}", f"one optimizer ({cls}) and its options are shared here; "
                                                             f"only the learning rate is per part ({ours})")
        if _resolve("optimizer", other_cls) != name:
            t.skip(f"optimizers.{role}.{other_cls}", f"one optimizer class here: {cls} (from {lead}) is used for it")
    C.set_path(t.config, "optimizer.options~replace", options)  # PB's options alone, not this project's defaults


def _models(t: Translation, value: Any) -> None:
    for role, spec in (value or {}).items():
        path = f"models.{role}"
        if role == "trunk":
            one = _one_class(t, path, spec)
            if one is None:
                continue
            cls, opts = one
            name = _resolve("trunk", cls)
            if name is None:
                t.skip(f"{path}.{cls}", f"no trunk {cls!r} here (trunks: run.py --list; docs/trunks.md)")
                continue
            t.put(f"{path}.{cls}", "trunk.name", name)
            for k, v in opts.items():
                if k == "pretrained":
                    t.put(f"{path}.{cls}.pretrained", "trunk.pretrained", bool(v) and v not in ("false", "False"),
                          "ImageNet weights, loaded offline (docs/trunks.md)")
                else:
                    t.skip(f"{path}.{cls}.{k}", "the trunk takes only pretrained here")
        elif role == "embedder":
            _embedder(t, path, spec)
        else:
            t.skip(path, "models here: a trunk and an embedder (classifier heads and other models have no equivalent)")


def _embedder(t: Translation, path: str, spec: Any) -> None:
    one = _one_class(t, path, spec)
    if one is None:
        return
    cls, opts = one
    if cls == "Identity":
        t.put(f"{path}.Identity", "embedder", {"name": "none", "size": None}, "the trunk's channels are the embedding")
        return
    sizes = opts.get("layer_sizes")
    if cls != "MLP" or not isinstance(sizes, list) or len(sizes) != 1:
        t.skip(f"{path}.{cls}", "only MLP with one layer (layer_sizes: [N]) translates: the embedder here is one "
                                "linear map (a 1x1 projection of the trunk's features, before the pooling)")
        return
    t.put(f"{path}.MLP.layer_sizes", "embedder.size", sizes[0], "a linear 1x1 projection before pooling")
    t.put(f"{path}.MLP", "embedder.name", "conv1x1")
    for k, v in opts.items():
        if k != "layer_sizes" and not (k == "final_relu_layer" and not v):
            t.skip(f"{path}.MLP.{k}", "the embedder here is one linear map")


_TRAINER = {"iterations_per_epoch": "trainer.iterations_per_epoch", "batch_size": "trainer.batch_size",
            "dataloader_num_workers": "trainer.num_workers", "freeze_trunk_batchnorm": "trainer.freeze_bn"}
_NO_OPS = {"label_hierarchy_level": 0, "set_min_label_to_zero": True, "loss_weights": None}  # what happens here anyway


def _trainer(t: Translation, value: Any) -> None:
    one = _one_class(t, "trainer", value)
    if one is None:
        return
    cls, opts = one
    if cls != "MetricLossOnly":
        t.skip(f"trainer.{cls}", "the training here is PML's MetricLossOnly's (one metric loss, a miner); other "
                                 "trainers have no equivalent")
        return
    t.same("trainer.MetricLossOnly", "a metric loss on the embeddings, as here")
    for k, v in opts.items():
        if k in _TRAINER:
            t.put(f"trainer.MetricLossOnly.{k}", _TRAINER[k], v)
        elif k in _NO_OPS and (v == _NO_OPS[k] or (k == "loss_weights" and v in ({"metric_loss": 1}, {}))):
            t.same(f"trainer.MetricLossOnly.{k}", "what this project does")
        else:
            t.skip(f"trainer.MetricLossOnly.{k}", "no equivalent here")


def _dataset(t: Translation, value: Any) -> None:
    one = _one_class(t, "dataset", value)
    if one is None:
        return
    cls, opts = one
    name = _resolve("dataset", cls)
    if name is None:
        t.skip(f"dataset.{cls}", f"no data set {cls!r} here (cub200, cars196, sop, inshop, csv ...: run.py --list)")
        return
    t.put(f"dataset.{cls}", "dataset.name", name)
    for k, v in opts.items():
        if k == "root":
            t.put(f"dataset.{cls}.root", "dataset.root", v)
        else:
            t.skip(f"dataset.{cls}.{k}", "no downloads or data set options here: give --dataset_root with the files "
                                         "(docs/data.md)" if k == "download" else "no equivalent here")


def _split(t: Translation, path: str, opts: Dict[str, Any], scheme: Optional[str]) -> None:
    """ClassDisjointSplitManager / MLRCSplitManager options (or PB's older top-level split keys)."""
    if scheme == "mlrc":
        t.put(path, "dataset.split", scheme, "the Reality Check's folds (docs/data.md, 'Splits')")
    elif scheme is not None:
        t.same(path, "class-disjoint folds of the sorted classes, as here")
    size, start = opts.get("test_size"), opts.get("test_start_idx")
    for k, v in opts.items():
        key = f"{path}.{k}" if path else k
        if k == "test_size":
            t.put(key, "dataset.test_fraction", v)
        elif k == "num_training_partitions":
            t.put(key, "dataset.num_folds", v)
        elif k == "test_start_idx":
            if start == (size if size is not None else 0.5):
                t.same(key, "the test set is the last classes, as here")
            else:
                t.skip(key, "the test set here is always the last classes (test_start_idx = test_size)")
        elif k == "num_training_sets":
            if v == opts.get("num_training_partitions", v):
                t.same(key, "every fold is trained, as here")
            else:
                t.skip(key, "every fold is trained here (num_training_sets = num_training_partitions)")
        elif k in ("hierarchy_level", "data_and_label_getter_keys") or (k == "shuffle" and not v):
            t.same(key, "what this project does")
        else:
            t.skip(key, "no equivalent here (the classes are split in sorted order)")


def _split_manager(t: Translation, value: Any) -> None:
    one = _one_class(t, "split_manager", value)
    if one is None:
        return
    cls, opts = one
    schemes = {"ClassDisjointSplitManager": "default", "MLRCSplitManager": "mlrc"}
    if cls not in schemes:
        t.skip(f"split_manager.{cls}", "split managers here: ClassDisjointSplitManager (dataset.split default) and "
                                       "MLRCSplitManager (dataset.split mlrc)")
        return
    _split(t, f"split_manager.{cls}", opts, schemes[cls])


def _scale(value: Any) -> Optional[List[float]]:
    """PB writes ranges as ``"0.16 1"`` or ``[0.16, 1]``."""
    parts = value.split() if isinstance(value, str) else value
    try:
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        return None
    return [lo, hi]


def _transforms(t: Translation, value: Any) -> None:
    value = value or {}
    sizes = {}
    for split, steps in value.items():
        if split not in ("train", "eval") or not isinstance(steps, dict):
            t.skip(f"transforms.{split}", "transforms here: train and eval")
            continue
        for cls, opts in steps.items():
            opts, key = dict(opts or {}), f"transforms.{split}.{cls}"
            if cls in ("ToTensor", "Normalize", "ConvertToBGR", "Multiplier"):
                t.same(key, "added here from the trunk's own input format")
            elif split == "train" and cls == "Resize":
                t.same(key, "a random resized crop of the original image is the same crop (up to resampling)")
            elif split == "train" and cls == "RandomResizedCrop":
                scale, ratio = _scale(opts.get("scale", [0.08, 1.0])), _scale(opts.get("ratio", [0.75, 4 / 3]))
                if scale is None or ratio is None or abs(ratio[0] - 0.75) > 0.01 or abs(ratio[1] - 4 / 3) > 0.01:
                    t.skip(key, "random resized crops here use torchvision's aspect ratios [3/4, 4/3] and a "
                                "[low, high] scale")
                    continue
                sizes["train"] = opts.get("size")
                t.put(f"{key}.scale", "transforms.train.scale", scale)
            elif split == "train" and cls == "RandomHorizontalFlip":
                if opts.get("p", 0.5) == 0.5:
                    t.put(key, "transforms.train.flip", True)
                else:
                    t.skip(key, "the flip here has p = 0.5")
            elif split == "eval" and cls == "Resize" and isinstance(opts.get("size"), int):
                t.put(f"{key}.size", "transforms.eval.short_side", opts["size"])
                C.set_path(t.config, "transforms.eval.mode", "center_crop")
            elif split == "eval" and cls == "CenterCrop":
                sizes["eval"] = opts.get("size")
                t.same(key, "transforms.eval.mode center_crop")
            else:
                t.skip(key, "no equivalent transform here (docs/data.md, 'Transforms')")
        if split == "train" and "RandomHorizontalFlip" not in steps and "train" in sizes:  # a crop, not flipped
            C.set_path(t.config, "transforms.train.flip", False)
    size = sizes.get("train") or sizes.get("eval")
    if size is not None:
        if sizes.get("eval") not in (None, size):
            t.skip("transforms.eval.CenterCrop.size", f"one image size here for training and evaluation ({size})")
        t.put("transforms.*.size", "transforms.image_size", size)


_EVAL = {"eval_batch_size": ("eval.batch_size", None)}
_EVAL_SAME = {"eval_normalize_embeddings": (True,), "eval_metric_for_best_epoch": ("mean_average_precision_at_r",
                                                                                   "mean_average_r_precision"),
              "eval_use_trunk_output": (False,), "splits_to_eval": (["val"],),
              "split_names": (["train", "val", "test"],),
              "testing_method": ("GlobalEmbeddingSpaceTester",), "training_method": ("MetricLossOnly",),
              "label_hierarchy_level": (0,)}
_GENERAL = {"num_epochs_train": "trainer.max_epochs", "iterations_per_epoch": "trainer.iterations_per_epoch",
            "patience": "trainer.patience", "batch_size": "trainer.batch_size", "dataset_root": "dataset.root",
            "freeze_batchnorm": "trainer.freeze_bn", "dataloader_num_workers": "trainer.num_workers",
            "eval_batch_size": "eval.batch_size"}
_HANDLERS = {"loss_funcs": _loss_funcs, "mining_funcs": _mining_funcs, "sampler": _sampler, "optimizers": _optimizers,
             "models": _models, "trainer": _trainer, "dataset": _dataset, "split_manager": _split_manager,
             "transforms": _transforms}
_REASONS = {"save_interval": "validation runs after every epoch here",
            "pytorch_home": "trunk weights load offline from the package here (docs/trunks.md)",
            "lr_schedulers": "not translated: set lr_scheduler: {name: StepLR, options: {...}, step: epoch} "
                             "(config_optimizers/default.yaml)",
            "num_variants_per_split_scheme": "one split here",
            "split": "PB's older split schemes: set dataset.num_folds and dataset.split"}


def translate(pb: Dict[str, Dict[str, Any]]) -> Translation:
    """Map the merged PB categories (:func:`load_pb`) to this project's keys."""
    t = Translation()
    flat: Dict[str, Any] = {}
    for category, tree in pb.items():
        tree = search_ranges(tree, "", t.left)
        for key, value in tree.items():
            flat[key] = value
            t.origin[key] = category
    split_opts = {k: flat.pop(k) for k in ("test_size", "test_start_idx", "num_training_partitions",
                                           "num_training_sets") if k in flat}
    if split_opts:
        _split(t, "", split_opts, None)
    for key, value in flat.items():
        if key in _HANDLERS:
            _HANDLERS[key](t, value)
        elif key in _GENERAL:
            t.put(key, _GENERAL[key], value)
        elif key in _EVAL_SAME and value in _EVAL_SAME[key]:
            t.same(key, "what this project does")
        else:
            t.skip(key, _REASONS.get(key, "no equivalent here"))
    return t


# --------------------------------------------------------------------------------------------
# output

def _files(t: Translation) -> Dict[str, Dict[str, Any]]:
    files: Dict[str, Dict[str, Any]] = {}
    for section, value in t.config.items():
        base = C.split_flag(section)[0]
        files.setdefault(SECTION_CATEGORY[base], {})[section] = value
    return files


def write(t: Translation, out: Path, source: Path) -> Dict[str, Path]:
    """``<out>/<category>/from_pb.yaml`` for each category that got keys, and ``<out>/translation.md`` (the table of
    translated and untranslated keys). ``out`` must be new, empty or an earlier translation (it holds the report)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / REPORT).is_file():
        raise C.ConfigError(f"--from_pb_out {out} exists and is not an earlier translation: give a new folder")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    paths = {}
    for category, cfg in _files(t).items():
        path = out / category / f"{OUT_NAME}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# translated by run.py --from_pb {source} ({stamp}); see ../{REPORT} for what was left out\n"
        path.write_text(header + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))
        paths[category] = path
    (out / REPORT).write_text(report(t, source))
    return paths


def report(t: Translation, source: Path) -> str:
    lines = [f"# {source} translated", "", "| powerful-benchmarker key | here | note |", "|---|---|---|"]
    lines += [f"| `{a}` | {f'`{b}`' if b else '(as here)'} | {n} |" for a, b, n in t.done]
    lines += ["", f"Not translated ({len(t.left)}):", ""]
    lines += [f"- `{k}` ({t.origin.get(k.split('.')[0], '?')}): {r}" for k, r in t.left]
    return "\n".join(lines) + "\n"


def command(paths: Dict[str, Path], forward: Sequence[str], name: str) -> str:
    """The command that runs the translation here: ``forward`` (the user's other words) and the files."""
    words = ["python", "run.py"]
    if "--experiment_name" not in forward:
        words += ["--experiment_name", name]
    words += list(forward)
    for category in C.CATEGORIES:
        if category in paths:
            words += [f"--{category}", str(paths[category])]
    return " ".join(shlex.quote(w) for w in words)


def from_pb(source: Path, selection: Dict[str, Sequence[str]], out: Optional[Path],
            forward: Sequence[str]) -> Tuple[str, str]:
    """Translate, write and return (the report, the command). Nothing translated: ConfigError (exit 2)."""
    source = Path(source)
    t = translate(load_pb(source, selection))
    if not any(ours for _, ours, _ in t.done):
        listed = "; ".join(f"{k}: {r}" for k, r in t.left) or "the folder holds no keys"
        raise C.ConfigError(f"--from_pb {source}: nothing translates ({listed})")
    out = Path(out) if out else Path(f"{source.resolve().name}_from_pb")
    paths = write(t, out, source)
    return report(t, source), command(paths, forward, re.sub(r"\W+", "_", source.resolve().name))


__all__ = ["pb_merge", "load_pb", "search_ranges", "translate", "Translation", "write", "report", "command", "from_pb"]
