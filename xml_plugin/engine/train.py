"""Training of one model on one fold: sampler -> model -> (wrapped) PML loss -> optimizer, validation MAP@R,
early stopping, atomic checkpoints every epoch, resume, record-keeper/TensorBoard logs."""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import registry
from ..config import ConfigError
from . import diagnostics
from . import distributed as D
from .evaluate import split_metrics
from .io import DamagedFileError, atomic_torch_save, atomic_write_json, move_aside, read_json_checked, safe_torch_load
from .model import EmbeddingModel, build_head

OBJECTIVE = "mean_average_precision_at_r"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    return dev


class FeatureSource:
    """Where the model's inputs come from: the frozen-trunk cache (``cache`` given) or decoded images."""

    def __init__(self, dataset, cache=None, train_tf=None, eval_tf=None, num_workers: int = 0, pooled: bool = False):
        self.dataset, self.cache = dataset, cache
        self.train_tf, self.eval_tf, self.num_workers = train_tf, eval_tf, num_workers
        self.pooled = pooled  # read the cache's pooled copy (a GAP method over a full cache): see :meth:`for_config`

    def for_config(self, cfg: Dict[str, Any], whole_trunk_frozen: bool) -> "FeatureSource":
        """This source as the method of ``cfg`` reads it: the full cache's pooled copy when the method trains only a
        linear embedder and GAP over a wholly frozen trunk (equal to the maps up to float rounding), else itself."""
        from .cache import can_use_pooled
        if self.from_cache and whole_trunk_frozen and getattr(self.cache, "has_pooled_copy", False) \
                and can_use_pooled(cfg):
            return FeatureSource(self.dataset, self.cache, self.train_tf, self.eval_tf, self.num_workers, pooled=True)
        return self

    @property
    def from_cache(self) -> bool:
        return self.cache is not None

    def _images(self, indices: Sequence[int], tf) -> torch.Tensor:
        return torch.stack([tf(self.dataset.image(int(i))) for i in indices])

    def train_batches(self, batches: List[np.ndarray], rng: np.random.Generator,
                      part: Callable[[np.ndarray], np.ndarray] = lambda b: b) -> Iterator[torch.Tensor]:
        """The inputs of ``part(b)`` for each global batch ``b`` (this process's share; cached views are drawn for
        the whole global batch first, so that they do not depend on the number of processes)."""
        if self.from_cache:
            for b in batches:
                views = rng.integers(0, self.cache.views, size=len(b))
                yield self.cache.train_features(part(b), part(views), pooled=self.pooled)
        else:
            loader = torch.utils.data.DataLoader(_TransformView(self.dataset, self.train_tf),
                                                 batch_sampler=[part(b) for b in batches], num_workers=self.num_workers)
            yield from loader

    def eval_batches(self, indices: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            yield self.cache.eval_features(chunk, pooled=self.pooled) if self.from_cache else self._images(chunk, self.eval_tf)


class _TransformView(torch.utils.data.Dataset):
    def __init__(self, dataset, tf):
        self.dataset, self.tf = dataset, tf

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.tf(self.dataset.image(int(i)))


@dataclass
class RunContext:
    """What every fold of every trial shares: the data, its feature source and the pristine trunk."""

    dataset: Any
    labels: np.ndarray
    source: FeatureSource
    trunk: nn.Module
    frozen_blocks: int
    device: torch.device
    progress: bool = True

    def for_config(self, cfg: Dict[str, Any]) -> "RunContext":
        """The context a method of ``cfg`` trains in: GAP methods over a wholly frozen trunk read the full cache's
        pooled copy (:meth:`FeatureSource.for_config`)."""
        import dataclasses
        source = self.source.for_config(cfg, self.frozen_blocks == self.trunk.num_blocks)
        return self if source is self.source else dataclasses.replace(self, source=source)


build_with = registry.build_with  # build a component with those of num_classes, embedding_size ... that it takes


def build_loss(cfg: Dict[str, Any], num_classes: int, emb_size: int, histogram_size: Optional[int],
               train_size: Optional[int] = None) -> nn.Module:
    """Base PML loss, optional miner, optional wrapper (XML, ZSR, XBM, XBN ...) from the config. ``train_size`` (the
    number of training images of the fold) reaches the components that take it (a memory sized as a fraction of it)."""
    avail = {"num_classes": num_classes, "embedding_size": emb_size}
    if train_size is not None:
        avail["train_size"] = int(train_size)
    loss = build_with("loss", cfg["loss"], avail)
    miner = build_with("miner", cfg["miner"], avail) if cfg.get("miner") else None
    wrapper_spec = cfg.get("loss_wrapper")
    if not wrapper_spec:
        return _PlainLoss(loss, miner)
    avail.update({"loss": loss, "miner": miner, "histogram_size": histogram_size})
    return build_with("loss_wrapper", wrapper_spec, avail)


class _PlainLoss(nn.Module):
    """A PML loss with an optional miner, called like the wrappers."""

    needs_histograms = False

    def __init__(self, loss: nn.Module, miner: Optional[nn.Module]):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings, labels):
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, indices)


SCHEDULER_STEPS = ("iteration", "epoch")


def build_scheduler(spec: Any, optimizer: torch.optim.Optimizer):
    """The ``lr_scheduler`` config (``{name, options, step: iteration|epoch}``, null: none) -> (scheduler, step)."""
    if not spec:
        return None, None
    name, opts = registry.split_spec(spec)
    step = opts.pop("step", "epoch")
    if step not in SCHEDULER_STEPS:
        raise ConfigError(f"lr_scheduler.step must be 'iteration' or 'epoch', got {step!r}")
    scheduler = registry.build("lr_scheduler", {"name": name, "options": opts}, optimizer)
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and step != "epoch":
        raise ConfigError(f"lr_scheduler {name!r} steps on the validation MAP@R: set lr_scheduler.step to epoch")
    return scheduler, step


def check_compatible(model: EmbeddingModel, loss_module: nn.Module, cfg: Dict[str, Any]) -> None:
    if getattr(loss_module, "needs_histograms", False) and not getattr(model.pooling, "gives_histogram", False):
        wrapper = registry.split_spec(cfg["loss_wrapper"])[0]
        pooling = registry.split_spec(cfg["pooling"])[0]
        raise ConfigError(f"loss wrapper {wrapper!r} needs histograms, but pooling {pooling!r} gives none; "
                          f"use pooling 'xml' or 'gsp' (e.g. --pooling xml)")


def _freeze_bn(module: nn.Module) -> None:
    """``trainer.freeze_bn``: BatchNorm layers in eval mode (running statistics fixed); their affine weights still train
    (unlike ``models.trunks.freeze_batchnorm``, which also stops their gradients)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def embed(model: EmbeddingModel, ctx: RunContext, indices: np.ndarray, batch_size: int = 128,
          with_histograms: bool = False):
    """Embeddings [len(indices), d] (evaluation mode, float32, on CPU); with ``with_histograms`` also the pooling's
    histograms [len(indices), m] (None for a pooling without them)."""
    model.eval()
    out, hists = [], []
    indices = np.asarray(indices)
    with torch.no_grad(), tqdm(total=len(indices), desc="embedding", unit="img", leave=False,
                               disable=not ctx.progress or len(indices) < 2000) as bar:
        for x in ctx.source.eval_batches(indices, batch_size):
            res = model(x.to(ctx.device), from_cache=ctx.source.from_cache)
            out.append(res.embedding.float().cpu())
            if with_histograms and res.histogram is not None:
                hists.append(res.histogram.float().cpu())
            bar.update(len(x))
    emb = torch.cat(out) if out else torch.empty(0, model.pooling.dim)
    if not with_histograms:
        return emb
    return emb, (torch.cat(hists) if hists else None)


def evaluate_indices(model: EmbeddingModel, ctx: RunContext, indices: np.ndarray, batch_size: int = 128,
                     health: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Validation metrics of ``indices``; ``health`` (a dict) receives the pooling's diagnostics on them (``val_*``:
    GAP reconstruction error, prototype usage) when the pooling gives histograms."""
    if health is None:
        emb, hist = embed(model, ctx, indices, batch_size), None
    else:
        emb, hist = embed(model, ctx, indices, batch_size, with_histograms=True)
    labels = torch.as_tensor(ctx.labels[indices])
    if health is not None and hist is not None:
        measures = diagnostics.xml_health(model.pooling, emb, hist)
        health.update({f"val_{k}": v for k, v in measures.items() if k in VAL_HEALTH and math.isfinite(v)})
    return split_metrics(emb, labels)


VAL_HEALTH = ("gap_error", "unused_prototypes", "effective_prototypes")


def batch_health(model: EmbeddingModel, loss_module: nn.Module, emb: torch.Tensor, hist: Optional[torch.Tensor],
                 labels: torch.Tensor) -> Dict[str, float]:
    """XML's health diagnostics at one training batch (docs/xml.md, "Diagnostics"): finite values only. Runs under a
    forked RNG so that it never changes the training's random draws."""
    if hist is None:
        return {}
    with torch.random.fork_rng(devices=[]):
        measures = diagnostics.xml_health(model.pooling, emb.detach(), hist.detach(), labels,
                                          loss_module if hasattr(loss_module, "terms") else None)
    return {k: v for k, v in measures.items() if math.isfinite(v)}


def make_batches(labels: np.ndarray, cfg: Dict[str, Any], iterations: int, seed: int) -> List[np.ndarray]:
    """Index batches (positions into ``labels``) from the configured sampler (PML's MPerClassSampler by default)."""
    tr = cfg["trainer"]
    bs = int(tr["batch_size"])
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)
    spec = cfg.get("sampler") or {"name": "m_per_class", "options": {"m": 4}}
    sampler = build_with("sampler", spec, {"labels": labels, "batch_size": bs, "length_before_new_iter": bs * iterations})
    order = np.fromiter(iter(sampler), dtype=np.int64)
    n_batches = len(order) // bs
    if n_batches == 0:
        raise ConfigError(f"the sampler gave {len(order)} indices, fewer than one batch of {bs}: "
                          f"too few classes/images in the training fold for batch_size {bs} and m_per_class")
    return [order[i * bs:(i + 1) * bs] for i in range(n_batches)]


def train_fold(cfg: Dict[str, Any], ctx: RunContext, train_idx: np.ndarray, val_idx: np.ndarray, run_dir: Path,
               seed: int, desc: str = "", on_epoch: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, Any]:
    """Train on ``train_idx``, early-stop on ``val_idx`` MAP@R; resumable from ``run_dir``. Returns the result dict.

    ``run_dir/result.json`` marks a finished run (returned as is), ``checkpoint.pt`` an unfinished one (resumed),
    ``best.pt`` holds the best model's trainable weights.
    """
    run_dir = Path(run_dir)
    main, world = D.is_main(), D.world_size()  # several processes: rank 0 reads and writes run_dir, tells the others
    done = D.broadcast_object(_read_result(run_dir) if main else None)
    if done is not None:
        return done
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    tr = cfg["trainer"]
    ctx = ctx.for_config(cfg)
    device = ctx.device
    seed_everything(seed)
    train_labels_global = ctx.labels[train_idx]
    classes, train_labels = np.unique(train_labels_global, return_inverse=True)  # labels 0..C-1
    model = build_head(cfg, ctx.trunk, ctx.frozen_blocks).to(device)
    hist_size = getattr(model.pooling, "num_prototypes", None)
    loss_module = build_loss(cfg, len(classes), model.pooling.dim, hist_size, len(train_idx)).to(device)
    check_compatible(model, loss_module, cfg)
    if hasattr(loss_module, "bind_pooling"):  # cross_fit: recursive reads the pooling's recursion state
        try:
            loss_module.bind_pooling(model.pooling)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    opt_name, opt_opts = registry.split_spec(cfg["optimizer"])
    loss_lr = opt_opts.pop("loss_lr", None)
    trunk_lr = opt_opts.pop("trunk_lr", None)  # the trained trunk blocks' own learning rate (the tail regime)
    if trunk_lr is not None and (isinstance(trunk_lr, bool) or not isinstance(trunk_lr, (int, float)) or trunk_lr < 0):
        raise ConfigError(f"optimizer.options.trunk_lr must be a number >= 0 (or null: the optimizer's lr), "
                          f"got {trunk_lr!r}")
    tail = [p for p in model.tail.parameters() if p.requires_grad]
    tail_ids = {id(p) for p in tail} if trunk_lr is not None else set()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in tail_ids]}]
    if trunk_lr is not None and tail:
        groups.append({"params": tail, "lr": float(trunk_lr)})
    loss_params = [p for p in loss_module.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, **({"lr": float(loss_lr)} if loss_lr else {})})
    optimizer = registry.build("optimizer", {"name": opt_name, "options": opt_opts}, groups)
    use_amp = bool(tr.get("amp", True)) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    scheduler, sched_step = build_scheduler(cfg.get("lr_scheduler"), optimizer)

    state = {"epoch": 0, "best_value": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [], "best_metrics": None}
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = D.broadcast_object(_read_checkpoint(ckpt_path, device if world == 1 else "cpu") if main else None)
    if ckpt is not None:
        try:
            model.load_trainable_state_dict(ckpt["model"])
            loss_module.load_state_dict(ckpt["loss"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["lr_scheduler"])
            state = ckpt["state"]
            torch.set_rng_state(ckpt["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # loads, but is not this run's checkpoint
            raise DamagedFileError(ckpt_path, f"it does not fit this run ({type(exc).__name__}: {exc})",
                                   "move it away to train the fold from its start") from None

    net = D.wrap_model(model)  # DistributedDataParallel with several processes, else the model itself
    recorder = _Recorder(run_dir, enabled=main and bool(tr.get("logs", True)))
    iters = int(tr["iterations_per_epoch"])
    max_epochs = int(tr["max_epochs"])
    patience = tr.get("patience")
    clip = tr.get("grad_clip")
    bar = tqdm(total=max_epochs * iters, initial=state["epoch"] * iters, desc=desc or "training", unit="it",
               disable=not ctx.progress or not main, leave=False)
    try:
        while state["epoch"] < max_epochs and not (patience is not None and state["bad_epochs"] >= int(patience)):
            epoch = state["epoch"]
            rng = np.random.default_rng([seed, epoch])
            batches = make_batches(train_labels, cfg, iters, seed * 1000 + epoch)
            model.train()
            loss_module.train()
            if tr.get("freeze_bn", True):
                _freeze_bn(model)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # at the epoch's start
            losses = []
            for it, x in enumerate(ctx.source.train_batches([train_idx[b] for b in batches], rng, D.local_part)):
                y = torch.as_tensor(train_labels[batches[it]], device=device)  # the global batch's labels
                with torch.autocast(device_type="cuda", enabled=use_amp):
                    out = net(x.to(device, non_blocking=True), from_cache=ctx.source.from_cache)
                # several processes: the loss (XML's halves, the XBM/XBN memory ...) sees the global batch on every rank
                emb, hist = D.gather_batch(out.embedding.float(), out.histogram)
                if getattr(loss_module, "needs_histograms", False):
                    loss = loss_module(emb, y, histograms=hist)
                else:
                    loss = loss_module(emb, y)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"training loss is {loss.item()} at epoch {epoch}, iteration {it}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss * world if world > 1 else loss).backward()  # DDP averages: x world -> the sum
                D.unscale_replicated_grads(loss_params)
                if clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], float(clip))
                scaler.step(optimizer)
                scaler.update()
                if sched_step == "iteration":
                    scheduler.step()
                losses.append(loss.item())
                recorder.add("train", "loss", losses[-1], epoch * iters + it)
                bar.update(1)
                last = (emb, hist, y)
            health = batch_health(model, loss_module, *last) if main and out.histogram is not None else {}
            metrics = D.broadcast_object(evaluate_indices(model, ctx, val_idx, int(cfg.get("eval", {}).get("batch_size", 128)),
                                                          health=health if out.histogram is not None else None)
                                         if main else None)
            value = metrics[OBJECTIVE]
            if sched_step == "epoch":
                plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
                scheduler.step(value) if plateau else scheduler.step()
            entry = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": lr, "seconds": time.perf_counter() - t0,
                     **metrics}
            if health:
                entry["health"] = health
            state["history"].append(entry)
            for k, v in metrics.items():
                recorder.add("validation", k, v, epoch)
            for k, v in health.items():
                recorder.add("health", k, v, epoch)
            if value > state["best_value"]:
                state.update(best_value=value, best_epoch=epoch, bad_epochs=0, best_metrics=metrics)
                if main:
                    atomic_torch_save(run_dir / "best.pt", {"model": model.trainable_state_dict(),
                                                            "loss": loss_module.state_dict()})
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            recorder.save()
            if main:
                atomic_torch_save(ckpt_path, {"model": model.trainable_state_dict(), "loss": loss_module.state_dict(),
                                              "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                              "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
                                              "state": plain(state), "torch_rng": torch.get_rng_state()})
            D.barrier()  # the epoch's checkpoint is on disk before any process goes on (a killed group resumes from it)
            bar.set_postfix(loss=f"{entry['train_loss']:.3f}", map_r=f"{value:.3f}")
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    finally:
        bar.close()
        recorder.close()
    result = {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "val": state["best_metrics"],
              "history": state["history"], "seed": seed, "num_train_classes": int(len(classes)),
              "provenance": provenance(device)}
    if main:
        atomic_write_json(run_dir / "result.json", result)
        ckpt_path.unlink(missing_ok=True)  # the result and best.pt are all that is kept
    D.barrier()
    return result


def load_best(cfg: Dict[str, Any], ctx: RunContext, run_dir: Path) -> EmbeddingModel:
    """The run's best model; :class:`DamagedFileError` when ``best.pt`` does not load as plain tensors or does not fit
    the model the config builds."""
    model = build_head(cfg, ctx.trunk, ctx.frozen_blocks).to(ctx.device)
    load_trainable(model, Path(run_dir) / "best.pt", ctx.device)
    return model.eval()


def load_trainable(model: EmbeddingModel, path: Path, device: Any) -> None:
    """``model``'s trainable weights from a ``best.pt`` (loaded with ``weights_only=True``: nothing in it can run)."""
    fix = "rerun the experiment to train that fold again, or take the folder from where it came intact"
    ckpt = safe_torch_load(path, map_location=device, fix=fix)
    try:
        model.load_trainable_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DamagedFileError(path, f"it does not fit this run's model ({type(exc).__name__})", fix) from None


def discard_run(run_dir: Path, why: str) -> None:
    """Move a finished run's result and best model aside (kept, never read again) so that the fold trains again."""
    for name in ("result.json", "best.pt", "checkpoint.pt"):
        move_aside(Path(run_dir) / name, why)


def _read_result(run_dir: Path) -> Optional[Dict[str, Any]]:
    """``result.json`` of a finished run, or None; one that is not valid JSON (or lacks the result's keys) is moved
    aside and the fold is trained again (deterministic: the same numbers)."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        result = read_json_checked(path)
        if not isinstance(result, dict) or "val" not in result or "history" not in result:
            raise DamagedFileError(path, "not a run's result")
        return result
    except DamagedFileError as exc:
        move_aside(path, exc.reason)
        move_aside(run_dir / "best.pt", "its result.json was damaged")
        return None


def _read_checkpoint(path: Path, map_location: Any) -> Optional[Dict[str, Any]]:
    """The epoch checkpoint, or None (no checkpoint, or a damaged one, which is moved aside: the fold restarts from
    its first epoch and reaches the same numbers)."""
    if not path.is_file():
        return None
    try:
        ckpt = safe_torch_load(path, map_location=map_location)
        if not isinstance(ckpt, dict) or not {"model", "state", "optimizer"} <= set(ckpt):
            raise DamagedFileError(path, "not a training checkpoint")
        return ckpt
    except DamagedFileError as exc:
        move_aside(path, exc.reason)
        return None


def plain(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and tuples as lists: data that ``weights_only`` loading accepts."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def provenance(device: torch.device) -> Dict[str, Any]:
    """Where a run was computed: processes (a DDP group's world size), torch threads, device, package versions."""
    import faiss
    import pytorch_metric_learning
    return {"world_size": D.world_size(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "pytorch_metric_learning": pytorch_metric_learning.__version__,
            "faiss": getattr(faiss, "__version__", "unknown"), "faiss_index": faiss_index()}


def faiss_index() -> str:
    """Where the evaluation's exact k-NN search runs: PML's FaissKNN uses a GPU index only for CUDA tensors when faiss
    sees GPUs, and the embeddings are always moved to the CPU before the metrics (``embed``), so it is the CPU flat
    index; the faiss GPU count is shown for the record."""
    import faiss
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return f"cpu (exact flat index; faiss sees {gpus} GPU{'s' if gpus != 1 else ''})"


class _Recorder:
    """record-keeper (CSV + SQLite under ``logs/``) and TensorBoard (``tensorboard/``) for one run.

    Values are buffered in memory and handed to record-keeper (which writes TensorBoard's scalars) at ``save``, once per
    epoch: the series keep one point per iteration, but no logging work happens inside the training step.
    """

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.keeper = None
        self.writer = None
        self.pending: List[tuple] = []
        if not enabled:
            return
        try:
            import record_keeper
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - both are declared dependencies
            raise ImportError(f"logging needs record-keeper and tensorboard ({exc}); pip install record-keeper tensorboard")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.keeper = record_keeper.RecordKeeper(tensorboard_writer=self.writer,
                                                 record_writer=record_keeper.RecordWriter(str(run_dir / "logs")))

    def add(self, group: str, series: str, value: float, iteration: int) -> None:
        if self.keeper is not None:
            self.pending.append((group, series, value, iteration))

    def save(self) -> None:
        if self.keeper is not None:
            for group, series, value, iteration in self.pending:
                self.keeper.append_data(group, series, value, iteration)
            self.pending.clear()
            self.keeper.save_records()
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.pending.clear()  # an interrupted epoch is trained again on resume: its values are logged then, once
            self.writer.close()
