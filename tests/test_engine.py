"""Training engine: feature cache, one fold's training, early stopping state, atomic checkpoints and resume, metrics."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import xml_plugin
from xml_plugin import config as C
from xml_plugin.engine import train as T
from xml_plugin.engine.cache import FeatureCache
from xml_plugin.engine import retrieval_metrics
from xml_plugin.engine.io import atomic_write_json, stable_hash
from xml_plugin.protocol.experiment import Experiment, method_config


def _experiment(cfg, name="e"):
    exp = Experiment(cfg, name, progress=False)
    exp.setup()
    return exp


def test_retrieval_metrics_hand_computed():
    # unit vectors at given angles; the last member of class 1 sits among class 0
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5, 1.6, 0.15])
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    m = retrieval_metrics(emb, labels)
    assert 0 < m["mean_average_precision_at_r"] < 1
    # independent brute-force check of all three metrics
    sims = emb @ emb.T
    p1, rp, ap = [], [], []
    for i in range(6):
        order = [j for j in torch.argsort(sims[i], descending=True).tolist() if j != i]
        rel = [int(labels[j] == labels[i]) for j in order]
        r = sum(rel)
        p1.append(rel[0])
        rp.append(sum(rel[:r]) / r)
        ap.append(sum(rel[k] * sum(rel[:k + 1]) / (k + 1) for k in range(r)) / r)
    assert m["precision_at_1"] == pytest.approx(np.mean(p1))
    assert m["r_precision"] == pytest.approx(np.mean(rp))
    assert m["mean_average_precision_at_r"] == pytest.approx(np.mean(ap))


def test_retrieval_metrics_query_vs_reference_and_errors():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=g) * 5
    labels = torch.arange(5).repeat_interleave(4)
    emb = centers[labels] + 0.01 * torch.randn(20, 8, generator=g)
    m = retrieval_metrics(emb[::2], labels[::2], emb[1::2], labels[1::2])
    assert m == {"precision_at_1": 1.0, "r_precision": 1.0, "mean_average_precision_at_r": 1.0}
    with pytest.raises(ValueError, match="no query label"):
        retrieval_metrics(emb[:4], labels[:4], emb[4:], labels[4:])
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(emb, labels[:3])


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert stable_hash({"b": 1, "a": 2}) == stable_hash({"a": 2, "b": 1}) != stable_hash({"a": 2, "b": 2})


def test_feature_cache_built_once_and_reused(tiny_cfg):
    exp = _experiment(tiny_cfg())
    cache = exp.ctx.source.cache
    assert cache is not None and cache.complete
    n = len(exp.ctx.dataset)
    assert cache._train.shape[:2] == (n, 2) and cache._eval.shape[0] == n
    assert cache._train.shape[2] == 8  # output of the frozen first block of tiny_cnn
    stamp = (cache.folder / "train.npy").stat().st_mtime_ns
    # a second experiment with the same data, trunk and transforms reuses the cache: no rebuild
    exp2 = _experiment(tiny_cfg(), "e2")
    assert exp2.ctx.source.cache.folder == cache.folder
    assert (cache.folder / "train.npy").stat().st_mtime_ns == stamp
    # the views differ from each other (augmented) and equal what a rebuild computes (seeded)
    views = exp.ctx.source.cache.train_features(np.arange(4), np.zeros(4, dtype=int))
    views1 = exp.ctx.source.cache.train_features(np.arange(4), np.ones(4, dtype=int))
    assert not torch.allclose(views, views1)
    other = tiny_cfg(**{"cache.views": 3})
    exp3 = _experiment(other, "e3")
    assert exp3.ctx.source.cache.folder != cache.folder
    assert torch.allclose(exp3.ctx.source.cache.train_features(np.arange(4), np.zeros(4, dtype=int)), views, atol=1e-3)


def test_killed_cache_build_is_not_used(tiny_cfg, tmp_path):
    exp = Experiment(tiny_cfg(), "k", progress=False)
    trunk = xml_plugin.build("trunk", {"name": "tiny_cnn"})

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt

    from xml_plugin.data import eval_transform, get_dataset
    ds = get_dataset("tiny_shapes")
    cache = FeatureCache(tmp_path / "c", {"x": 1})
    with pytest.raises(KeyboardInterrupt):
        cache.build(ds, Boom(), eval_transform(32), eval_transform(32), 2, torch.device("cpu"), progress=False)
    assert not cache.complete
    assert list((tmp_path / "c" / "features").iterdir()) == []  # no half-written folder left behind
    # the temporary folder of a build killed with -9 (dead pid) is removed by the next build
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "c" / "features" / f".{cache.key}.{dead.pid}.abc"
    stale.mkdir()
    cache.build(ds, torch.nn.Sequential(trunk.blocks[0]), eval_transform(32), eval_transform(32), 1,
                torch.device("cpu"), progress=False)
    assert cache.complete and not stale.exists()
    assert [p.name for p in (tmp_path / "c" / "features").iterdir()] == [cache.key]


@pytest.mark.parametrize("method", ["baseline", "xml"])
def test_train_fold_learns_and_writes_result(tiny_cfg, method):
    cfg = tiny_cfg(**{"trainer.max_epochs": 3, "trainer.iterations_per_epoch": 10, "trainer.logs": True})
    exp = _experiment(cfg)
    ccfg = C.resolve(method_config(cfg, method))
    tr, va = exp.split.folds[0]
    run_dir = exp.run_dir(method, ccfg, 0, 0)
    res = exp._train(method, ccfg, 0, 0, "t")
    assert len(res["history"]) == 3 and res["epochs_run"] == 3
    assert all(np.isfinite(h["train_loss"]) for h in res["history"])
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]
    assert res["val"]["mean_average_precision_at_r"] == max(h["mean_average_precision_at_r"] for h in res["history"])
    assert (run_dir / "result.json").is_file() and (run_dir / "best.pt").is_file()
    assert not (run_dir / "checkpoint.pt").exists()
    assert (run_dir / "logs" / "logs.db").is_file() and list((run_dir / "logs").glob("*.csv"))
    assert list((run_dir / "tensorboard").iterdir())
    # the best model reloads and embeds the validation set with the recorded metrics
    model = T.load_best(ccfg, exp.ctx, run_dir)
    again = T.evaluate_indices(model, exp.ctx, np.asarray(va))
    assert again["mean_average_precision_at_r"] == pytest.approx(res["val"]["mean_average_precision_at_r"], abs=1e-6)
    if method == "xml":
        state = torch.load(run_dir / "best.pt", weights_only=False)["model"]
        assert state["pooling.initialized"].item() and state["pooling.prototypes"].abs().sum() > 0
    # a finished run is not trained again
    stamp = (run_dir / "result.json").stat().st_mtime_ns
    assert exp._train(method, ccfg, 0, 0, "t") == res
    assert (run_dir / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("scheduler", [None, {"name": "StepLR", "options": {"step_size": 5, "gamma": 0.5},
                                                "step": "iteration"}])
def test_interrupted_training_resumes_to_the_same_result(tiny_cfg, tmp_path, scheduler):
    cfg = tiny_cfg(**{"trainer.max_epochs": 3, "lr_scheduler": scheduler})
    exp = _experiment(cfg)
    ccfg = C.resolve(method_config(cfg, "xml"))
    tr, va = (np.asarray(a) for a in exp.split.folds[1])
    full = T.train_fold(ccfg, exp.ctx, tr, va, tmp_path / "full", seed=3)

    def crash(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt  # after epoch 1's checkpoint: as if killed
    with pytest.raises(KeyboardInterrupt):
        T.train_fold(ccfg, exp.ctx, tr, va, tmp_path / "cut", seed=3, on_epoch=crash)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "result.json").exists()
    resumed = T.train_fold(ccfg, exp.ctx, tr, va, tmp_path / "cut", seed=3)
    strip = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]
    assert strip(resumed) == strip(full)
    assert resumed["val"] == full["val"]
    if scheduler:  # the scheduler's state came back from the checkpoint: epoch 2 starts at 1e-3 * 0.5 ** (12 // 5)
        base = C.resolve(method_config(cfg, "xml"))["optimizer"]["options"]["lr"]
        assert [h["lr"] for h in resumed["history"]] == pytest.approx([base, base * 0.5, base * 0.25], rel=1e-12)


@pytest.mark.parametrize("step", ["iteration", "epoch"])
def test_lr_scheduler_changes_the_lr_like_torch_stepping_the_same_way(tiny_cfg, tmp_path, step):
    size = 4 if step == "iteration" else 2
    spec = {"name": "StepLR", "options": {"step_size": size, "gamma": 0.3}, "step": step}
    iters, epochs = 6, 3
    cfg = tiny_cfg(**{"trainer.max_epochs": epochs, "trainer.iterations_per_epoch": iters, "lr_scheduler": spec})
    exp = _experiment(cfg)
    ccfg = C.resolve(method_config(cfg, "baseline"))
    tr, va = (np.asarray(a) for a in exp.split.folds[0])
    res = T.train_fold(ccfg, exp.ctx, tr, va, tmp_path / "s", seed=0)
    # torch's own StepLR on a throw-away optimizer, stepped once per iteration or once per epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=ccfg["optimizer"]["options"]["lr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=size, gamma=0.3)
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        for _ in range(iters if step == "iteration" else 1):
            opt.step()
            sched.step()
    assert [h["lr"] for h in res["history"]] == expected
    assert len(set(expected)) > 1  # the sequence does change
    with pytest.raises(C.ConfigError, match="iteration' or 'epoch"):
        T.build_scheduler({**spec, "step": "batch"}, opt)


def test_early_stopping_after_patience_epochs_without_improvement(tiny_cfg, tmp_path):
    """With lr 0 nothing changes: epoch 0 sets the best, then ``patience`` epochs without improvement stop the run."""
    cfg = tiny_cfg(**{"trainer.max_epochs": 8, "trainer.patience": 2, "trainer.iterations_per_epoch": 2,
                      "optimizer.options": {"lr": 0.0}})
    exp = _experiment(cfg)
    ccfg = C.resolve(method_config(cfg, "baseline"))
    assert ccfg["optimizer"]["options"]["lr"] == 0.0
    tr, va = (np.asarray(a) for a in exp.split.folds[0])
    res = T.train_fold(ccfg, exp.ctx, tr, va, tmp_path / "p", seed=0)
    assert res["epochs_run"] == 1 + 2 and res["best_epoch"] == 0
    assert len({h["mean_average_precision_at_r"] for h in res["history"]}) == 1


def test_nonfinite_loss_is_an_error(tiny_cfg):
    class NanLoss(torch.nn.Module):
        def forward(self, embeddings, labels, indices_tuple=None):
            return embeddings.sum() * float("nan")
    xml_plugin.register("loss", NanLoss, name="nan_loss")
    try:
        cfg = tiny_cfg(**{"loss": {"name": "nan_loss"}})
        exp = _experiment(cfg)
        ccfg = C.resolve(method_config(cfg, "baseline"))
        tr, va = (np.asarray(a) for a in exp.split.folds[0])
        with pytest.raises(T.NonFiniteLossError, match="nan"):
            T.train_fold(ccfg, exp.ctx, tr, va, exp.folder / "nan", seed=0)
    finally:
        xml_plugin.unregister("loss", "nan_loss")


def test_histogram_wrapper_without_histogram_pooling_fails_at_start(tiny_cfg):
    cfg = tiny_cfg(**{"general.methods": ["bad"]})
    xml_plugin.register("method", {"pooling": {"name": "gap"}, "loss_wrapper": {"name": "xml"}}, name="bad")
    try:
        with pytest.raises(C.ConfigError, match="needs histograms"):
            Experiment(cfg, "bad", progress=False)
    finally:
        xml_plugin.unregister("method", "bad")


def test_uncached_training_from_images(tiny_cfg):
    cfg = tiny_cfg(**{"cache.enabled": False, "trunk.frozen_blocks": 0, "trainer.max_epochs": 1})
    exp = _experiment(cfg)
    assert exp.ctx.source.cache is None and exp.ctx.frozen_blocks == 0
    ccfg = C.resolve(method_config(cfg, "xml"))
    res = exp._train("xml", ccfg, 0, 0, "img")
    assert np.isfinite(res["history"][0]["train_loss"])
    best = torch.load(exp.run_dir("xml", ccfg, 0, 0) / "best.pt", weights_only=False)["model"]
    assert any(k.startswith("tail.") for k in best)  # the whole trunk was trained and saved


def test_device_selection():
    assert T.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert T.select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(C.ConfigError, match="CUDA is not available"):
            T.select_device("cuda")


@pytest.mark.parametrize("query_vs_gallery", [False, True])
def test_recall_at_k_against_brute_force(query_vs_gallery):
    """Recall@K = share of queries with a same-label item among their K nearest (cosine), the query itself excluded;
    checked against a full sort written here, with the MAP@R etc. unchanged by the extra neighbours."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(12).repeat_interleave(5)[torch.randperm(60, generator=g)]
    emb = torch.randn(60, 6, generator=g) + 0.8 * torch.nn.functional.one_hot(labels % 6, 6).float()
    ks = (1, 2, 4, 8, 16, 500)  # 500 > the gallery: dropped
    if query_vs_gallery:
        q, ql, r, rl = emb[:20], labels[:20], emb[20:], labels[20:]
        m = retrieval_metrics(q, ql, r, rl, recall_ks=ks)
        plain = retrieval_metrics(q, ql, r, rl)
    else:
        q, ql, r, rl = emb, labels, emb, labels
        m = retrieval_metrics(emb, labels, recall_ks=ks)
        plain = retrieval_metrics(emb, labels)
    qn, rn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(r, dim=1)
    sims = qn @ rn.T
    if not query_vs_gallery:
        sims.fill_diagonal_(-float("inf"))
    order = sims.argsort(dim=1, descending=True)
    has_positive = (rl[None, :] == ql[:, None]).sum(1) > (0 if query_vs_gallery else 1)
    for k in ks[:-1]:
        hit = (rl[order[:, :k]] == ql[:, None]).any(dim=1)[has_positive]
        assert m[f"recall_at_{k}"] == pytest.approx(hit.float().mean().item(), abs=1e-9), k
    assert "recall_at_500" not in m
    assert m["recall_at_1"] == pytest.approx(m["precision_at_1"])
    for key, value in plain.items():  # searching more neighbours leaves the other metrics as they were
        assert m[key] == pytest.approx(value, abs=1e-9)


def test_fold_ensemble_metrics_separate_is_the_mean_and_concatenated_is_the_normalised_concatenation():
    """Two "fold models" embedding the same 40 samples: separate = mean of per-fold Recall@1 brute-forced here;
    concatenated = Recall@1 of [e1/|e1|, e2/|e2|], brute-forced with a full sort (cosine = dot of the unit rows)."""
    from xml_plugin.engine.evaluate import fold_ensemble_metrics
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(8).repeat_interleave(5)
    embs = [scale * (torch.randn(40, 4, generator=g) * noise + torch.nn.functional.one_hot(labels % 4, 4).float())
            for noise, scale in ((0.3, 1.0), (3.0, 20.0))]  # a good model and a poor one of a far larger scale

    def recall_at_1(x):
        x = torch.nn.functional.normalize(x, dim=1)
        sims = x @ x.T
        sims.fill_diagonal_(-float("inf"))
        return (labels[sims.argmax(dim=1)] == labels).float().mean().item()

    per_fold, separate, concatenated, cat = fold_ensemble_metrics(embs, labels, recall_ks=[1])
    assert [r["recall_at_1"] for r in per_fold] == pytest.approx([recall_at_1(e) for e in embs], abs=1e-9)
    assert separate["recall_at_1"] == pytest.approx(np.mean([recall_at_1(e) for e in embs]), abs=1e-9)
    assert cat.shape == (40, 8)
    unit = torch.cat([e / e.norm(dim=1, keepdim=True) for e in embs], dim=1)
    assert concatenated["recall_at_1"] == pytest.approx(recall_at_1(unit), abs=1e-9)
    # unnormalised concatenation would let the large-scale poor model dominate: a different number here
    assert recall_at_1(torch.cat(embs, dim=1)) != pytest.approx(recall_at_1(unit), abs=1e-9)


def test_logs_buffered_per_epoch_keep_one_point_per_iteration(tiny_cfg):
    """record-keeper and TensorBoard get every iteration's loss, written at each epoch's end; an epoch interrupted
    after its checkpoint is not logged twice on resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    iters, epochs = 7, 3
    cfg = tiny_cfg(**{"trainer.max_epochs": epochs, "trainer.iterations_per_epoch": iters, "trainer.logs": True})
    exp = _experiment(cfg)
    ccfg = C.resolve(method_config(cfg, "baseline"))
    tr, va = exp.split.folds[0]
    run_dir = exp.run_dir("baseline", ccfg, 0, 0)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, metrics):
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        T.train_fold(ccfg, exp.ctx, np.asarray(tr), np.asarray(va), run_dir, 0, on_epoch=stop_after_first)
    res = T.train_fold(ccfg, exp.ctx, np.asarray(tr), np.asarray(va), run_dir, 0)
    rows = list(__import__("csv").DictReader(open(run_dir / "logs" / "train.csv")))
    its = [int(r["~iteration~"]) for r in rows]
    assert its == list(range(iters * epochs))  # every iteration once, in order
    losses = np.array([float(r["loss"]) for r in rows]).reshape(epochs, iters)
    assert losses.mean(1) == pytest.approx([h["train_loss"] for h in res["history"]], rel=1e-6)
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.endswith("loss") and "train" in t]
    assert len(tags) == 1
    steps = sorted(e.step for e in acc.Scalars(tags[0]))
    assert steps == list(range(iters * epochs))
