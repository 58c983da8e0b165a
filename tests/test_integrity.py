"""Fault injection: a planted pickle, a damaged feature cache, a truncated checkpoint or best model, an invalid
result.json, a damaged Optuna database. After each, a rerun either ends with the same report as an undamaged run or
refuses with exit 2 naming the damaged file; never a silently different number, and nothing read from disk runs code."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import as_cli_args, run_main, tiny_overrides
from xml_plugin import config as C
from xml_plugin.engine import io
from xml_plugin.engine import train as T
from xml_plugin.engine.cache import FeatureCache, verify_arrays
from xml_plugin.protocol.experiment import Experiment, method_config

OVERRIDES = {"general.n_trials": 1, "general.reproductions": 2, "trainer.max_epochs": 2, "search.mode": "none"}


class _Planted:
    """A pickle whose loading would create ``marker`` (the classic ``__reduce__`` payload, harmless here)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"model": _Planted(marker)}, path)


def _report_numbers(folder: Path):
    """report.csv without its text columns: the numbers a rerun must reproduce."""
    return (folder / "report.csv").read_text()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny experiment (baseline, nothing searched, 2 reproductions) and a pristine copy of it."""
    tmp = tmp_path_factory.mktemp("integrity")
    args = as_cli_args(tiny_overrides(tmp, **OVERRIDES))
    from xml_plugin.cli import main
    assert main(["--experiment_name", "done", "--no_progress", "--methods", "baseline", *args]) == 0
    folder = tmp / "experiments" / "done"
    pristine = tmp / "pristine"
    shutil.copytree(folder, pristine)
    return tmp, args, folder, pristine


def _fresh_copy(finished, name: str) -> Path:
    tmp, _, _, pristine = finished
    folder = tmp / "experiments" / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    return folder


def _reproduction_runs(folder: Path):
    """The run folders of the reproductions (runs/index.csv), the first reproduction's first."""
    from xml_plugin.protocol.run_index import read_index
    rows = sorted((int(r["number"]), int(r["fold"]), r["folder"]) for r in read_index(folder)
                  if r["kind"] == "reproduction")
    assert rows, "no reproductions"
    return [folder / f for _, _, f in rows]


def test_a_planted_best_pt_runs_nothing_on_evaluate_and_is_named(finished, capsys, tmp_path):
    folder = _fresh_copy(finished, "planted")
    marker = tmp_path / "pwned"
    victim = _reproduction_runs(folder)[0] / "best.pt"
    _plant(victim, marker)
    code, out, err = run_main(capsys, ["--evaluate", str(folder), "--no_progress"])
    assert not marker.exists(), "loading the planted best.pt ran its code"
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(victim) in errors[0] and "run code" in errors[0], err


def test_load_model_refuses_a_planted_best_pt(finished, tmp_path):
    import xml_plugin
    folder = _fresh_copy(finished, "planted_api")
    marker = tmp_path / "pwned"
    run = _reproduction_runs(folder)[0]
    _plant(run / "best.pt", marker)
    with pytest.raises(io.DamagedFileError) as exc:
        xml_plugin.load_model(run)
    assert not marker.exists() and str(run / "best.pt") in str(exc.value)


def test_safe_load_refuses_pickles_and_truncation_but_reads_plain_data(tmp_path):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "planted.pt", marker)
    with pytest.raises(io.DamagedFileError):
        io.safe_torch_load(tmp_path / "planted.pt")
    assert not marker.exists()
    plain = {"w": torch.arange(6.0).view(2, 3), "state": {"epoch": 3, "history": [{"a": 0.5}], "best": -float("inf")},
             "rng": torch.get_rng_state()}
    io.atomic_torch_save(tmp_path / "ok.pt", plain)
    back = io.safe_torch_load(tmp_path / "ok.pt")
    assert torch.equal(back["w"], plain["w"]) and back["state"] == plain["state"]
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(io.DamagedFileError, match="cut.pt"):
        io.safe_torch_load(tmp_path / "cut.pt")


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fold_faults")
    overrides = tiny_overrides(tmp, **{"trainer.max_epochs": 3})
    exp = Experiment(C.load({}, overrides, presets=C.presets_for({}, overrides)), "faults", progress=False)
    exp.setup()
    cfg = C.resolve(method_config(exp.base_cfg, "baseline"))
    tr, va = (np.asarray(a) for a in exp.split.folds[0])
    reference = T.train_fold(cfg, exp.ctx, tr, va, tmp / "reference", seed=3)
    return exp, cfg, tr, va, reference


def _cut_after_first_epoch(exp, cfg, tr, va, run: Path) -> None:
    def crash(epoch, metrics):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        T.train_fold(cfg, exp.ctx, tr, va, run, seed=3, on_epoch=crash)
    assert (run / "checkpoint.pt").is_file()


@pytest.mark.parametrize("damage", ["truncated", "planted", "garbage"])
def test_a_damaged_checkpoint_is_moved_aside_and_the_fold_recomputed(tiny_experiment, tmp_path, damage, capsys):
    exp, cfg, tr, va, reference = tiny_experiment
    run = tmp_path / "run"
    _cut_after_first_epoch(exp, cfg, tr, va, run)
    ckpt = run / "checkpoint.pt"
    marker = tmp_path / "pwned"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == "planted":
        _plant(ckpt, marker)
    else:
        ckpt.write_bytes(b"\0" * 4096)
    result = T.train_fold(cfg, exp.ctx, tr, va, run, seed=3)
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "checkpoint.pt" in err and "kept as" in err
    assert list(run.glob("checkpoint.pt.damaged-*")), "the damaged checkpoint is kept aside"
    assert result["val"] == reference["val"] and result["history"][-1]["train_loss"] == \
        reference["history"][-1]["train_loss"]


def test_an_invalid_result_json_is_recomputed_to_the_same_numbers(tiny_experiment, tmp_path, capsys):
    exp, cfg, tr, va, reference = tiny_experiment
    run = tmp_path / "run"
    T.train_fold(cfg, exp.ctx, tr, va, run, seed=3)
    (run / "result.json").write_text('{"val": {"mean_average_pre')
    again = T.train_fold(cfg, exp.ctx, tr, va, run, seed=3)
    assert "result.json" in capsys.readouterr().err
    assert again["val"] == reference["val"]
    assert json.loads((run / "result.json").read_text())["val"] == reference["val"]


def test_a_truncated_best_pt_in_a_reproduction_is_trained_again(finished, capsys):
    """A finished reproduction's folds are recomputed when their best.pt is damaged: the rerun's report (made from the
    study) is unchanged, and the fold's model is again the undamaged one."""
    tmp, args, _, pristine = finished
    folder = _fresh_copy(finished, "truncated_best")
    run = _reproduction_runs(folder)[0]
    good = torch.load(run / "best.pt", weights_only=True)
    (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:500])
    (folder / "optuna.db").unlink()  # forget the study: the reproductions are recomputed from runs/
    code, out, err = run_main(capsys, ["--experiment_name", "truncated_best", "--no_progress", "--methods", "baseline",
                                       *args])
    assert code == 0, err[-2000:]
    assert "best.pt" in err and "kept as" in err
    again = torch.load(run / "best.pt", weights_only=True)
    assert all(torch.equal(good["model"][k], again["model"][k]) for k in good["model"])
    assert _report_numbers(folder) == _report_numbers(pristine)


def test_a_damaged_optuna_db_is_an_input_error_naming_it(finished, capsys):
    tmp, args, _, _ = finished
    folder = _fresh_copy(finished, "bad_db")
    db = folder / "optuna.db"
    db.write_bytes(b"not a database" * 100)
    code, out, err = run_main(capsys, ["--experiment_name", "bad_db", "--no_progress", "--methods", "baseline", *args])
    assert code == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and str(db.resolve()) in line[0] and "move it away" in line[0]
    db.unlink()  # the way out the message names: the rerun reads the finished folds back
    code, out, err = run_main(capsys, ["--experiment_name", "bad_db", "--no_progress", "--methods", "baseline", *args])
    assert code == 0, err[-2000:]
    assert _report_numbers(folder) == _report_numbers(finished[3])


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "meta", "pooled copy"])
def test_a_damaged_feature_cache_is_rebuilt_and_gives_the_same_report(finished, capsys, damage):
    tmp, args, _, pristine = finished
    (cache_dir,) = [p.parent for p in (tmp / "cache" / "features").glob("*/meta.json")]
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert set(meta["arrays"]) == {"eval.npy", "train.npy", "eval_pooled.npy", "train_pooled.npy"}
    train = cache_dir / "train.npy"
    data = bytearray(train.read_bytes())
    if damage == "zeroed":  # same size, a block of values overwritten with zeros
        start = len(data) // 3
        data[start:start + len(data) // 4] = bytes(len(data) // 4)
        train.write_bytes(bytes(data))
    elif damage == "truncated":
        train.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "meta":
        (cache_dir / "meta.json").write_text("{not json")
    else:  # the GAP methods' pooled copy, one byte
        pooled = bytearray((cache_dir / "train_pooled.npy").read_bytes())
        pooled[-5] ^= 0x40
        (cache_dir / "train_pooled.npy").write_bytes(bytes(pooled))
    name = f"cache_{damage}".replace(" ", "_")
    code, out, err = run_main(capsys, ["--experiment_name", name, "--no_progress", "--methods", "baseline", *args])
    assert code == 0, err[-2000:]
    if damage != "meta":
        assert "damaged" in err and str(cache_dir) in err
    assert (tmp / "experiments" / name / "report.csv").read_text() == _report_numbers(pristine)
    verify_arrays(cache_dir, json.loads((cache_dir / "meta.json").read_text())["arrays"])  # intact again


def test_verify_arrays_finds_a_single_changed_byte(tmp_path):
    arr = np.arange(1000, dtype=np.float16).reshape(10, 100)
    np.save(tmp_path / "eval.npy", arr)
    np.save(tmp_path / "train.npy", arr[:, None])
    from xml_plugin.engine.cache import array_record
    records = {n: array_record(tmp_path / n) for n in ("eval.npy", "train.npy")}
    verify_arrays(tmp_path, records)
    raw = bytearray((tmp_path / "eval.npy").read_bytes())
    raw[-7] ^= 1
    (tmp_path / "eval.npy").write_bytes(bytes(raw))
    with pytest.raises(io.DamagedFileError, match="checksum"):
        verify_arrays(tmp_path, records)


def test_cache_verification_runs_once_per_process(tmp_path, monkeypatch):
    from xml_plugin.engine import cache as K
    arr = np.zeros((4, 3), np.float16)
    folder = tmp_path / "features" / "k"
    folder.mkdir(parents=True)
    np.save(folder / "eval.npy", arr)
    np.save(folder / "train.npy", arr[:, None])
    io.atomic_write_json(folder / "meta.json", {"views": 1, "pooled": True,
                                                "arrays": {n: K.array_record(folder / n) for n in K.ARRAYS}})
    cache = FeatureCache(tmp_path, {})
    cache.folder = folder
    calls = []
    monkeypatch.setattr(K, "file_checksum", lambda p: calls.append(p) or io.file_checksum(p))
    cache.load()
    cache.load()
    assert len(calls) == 2  # two files, hashed once


def test_restart_touches_only_its_own_studies_and_the_backup_stays_evaluable(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    args = as_cli_args(tiny_overrides(tmp_path, **{**OVERRIDES, "general.reproductions": 1, "general.storage": url}))
    for name in ("x", "x.y"):
        code, out, err = run_main(capsys, ["--experiment_name", name, "--no_progress", "--methods", "baseline", *args])
        assert code == 0, err[-2000:]
    import optuna
    before = {s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False)}
    assert {"x.baseline.search", "x.y.baseline.search"} <= before
    code, out, err = run_main(capsys, ["--experiment_name", "x", "--no_progress", "--methods", "baseline", "--restart",
                                       *args, "--loss", "contrastive"])
    assert code == 0, err[-2000:]
    after = {s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False)}
    assert {"x.y.baseline.search", "x.y.baseline.reproductions"} <= after  # the other experiment's studies are intact
    (backup,) = [p for p in (tmp_path / "experiments").iterdir() if p.name.startswith("x.backup-")]
    assert {f"{backup.name}.baseline.search", f"{backup.name}.baseline.reproductions"} <= after
    assert (tmp_path / "experiments" / "x.y" / "report.csv").is_file()
    code, out, err = run_main(capsys, ["--evaluate", str(backup), "--no_progress"])
    assert code == 0, err[-2000:]


def test_restart_backup_with_its_own_sqlite_is_evaluable(finished, capsys):
    tmp, args, _, _ = finished
    folder = _fresh_copy(finished, "own_db")
    code, out, err = run_main(capsys, ["--experiment_name", "own_db", "--no_progress", "--methods", "baseline",
                                       "--restart", *args, "--general.reproductions", "3"])
    assert code == 0, err[-2000:]
    (backup,) = [p for p in folder.parent.iterdir() if p.name.startswith("own_db.backup-")]
    assert json.loads((backup / "experiment.json").read_text())["name"] == backup.name
    code, out, err = run_main(capsys, ["--evaluate", str(backup), "--no_progress"])
    assert code == 0, err[-2000:]


def test_two_workers_with_different_configs_one_owns_the_folder(tmp_path):
    """Started at the same instant on one new name: exactly one claims the folder; the refused one exits 2 and the
    folder's experiment.json and config.yaml are the winner's, consistently."""
    import subprocess
    import sys
    import time
    repo = Path(__file__).resolve().parent.parent
    tiny_py = Path(__file__).resolve().parent / "tiny.py"
    start = time.time() + 4
    procs = []
    for loss in ("multi_similarity", "contrastive"):
        args = as_cli_args(tiny_overrides(tmp_path, **{**OVERRIDES, "general.reproductions": 1,
                                                       "trainer.max_epochs": 1}))
        code = ("import sys, time, runpy; sys.path.insert(0, %r); time.sleep(max(0, %f - time.time())); "
                "sys.argv = ['tiny.py'] + sys.argv[1:]; runpy.run_path(%r, run_name='__main__')"
                % (str(tiny_py.parent), start, str(tiny_py)))
        procs.append(subprocess.Popen([sys.executable, "-c", code, "--experiment_name", "race", "--no_progress",
                                       "--methods", "baseline", "--loss", loss, *args], cwd=str(repo),
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    codes = [p.wait(timeout=600) for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert sorted(codes) == [0, 2], (codes, [e[-1500:] for e in errs])
    winner = ("multi_similarity", "contrastive")[codes.index(0)]
    folder = tmp_path / "experiments" / "race"
    info = json.loads((folder / "experiment.json").read_text())
    assert info["loss"] == winner and C.load_yaml(folder / "config.yaml")["loss"]["name"] == winner
    assert "another configuration" in errs[codes.index(2)]
    assert not [p for p in (tmp_path / "experiments").iterdir() if p.name != "race"]  # no claim left behind


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """Reports and results written atomically are readable like any file the user writes (mkstemp alone makes 0600)."""
    import stat
    umask = os.umask(0)
    os.umask(umask)
    io.atomic_write_text(tmp_path / "report.md", "x\n")
    with open(tmp_path / "plain.md", "w") as f:
        f.write("x\n")
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.md").stat().st_mode)
