"""How researchers use the benchmark: --evaluate/--export of a finished experiment, runs/index.csv, load_model, the
readable log, a CSV data set, --import of a user's module, and the config folders shipped inside the wheel."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import optuna
import pytest

import xml_plugin
from xml_plugin import config as C
from xml_plugin.cli import main
from xml_plugin.protocol.log import ExperimentLog
from xml_plugin.protocol.run_index import read_index, record_run

from conftest import as_cli_args, tiny_overrides, run_main
from tiny import TinyShapes

REPO = Path(__file__).resolve().parent.parent


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _brute_precision_at_1(emb: np.ndarray, labels: np.ndarray) -> float:
    """P@1 by brute force: each item's nearest other item (cosine) has its label."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[sims.argmax(axis=1)] == labels))


def test_evaluate_export_reproduces_the_report_and_writes_labelled_embeddings(tmp_path, capsys):
    name = "wf"
    argv = ["--experiment_name", name, "--no_progress"] + as_cli_args(
        tiny_overrides(tmp_path, **{"general.n_trials": 2, "general.reproductions": 2, "general.methods": ["baseline"],
                                "trainer.max_epochs": 1}))
    code, out, err = run_main(capsys, argv)
    assert code == 0, err[-3000:]
    folder = tmp_path / "experiments" / name
    # the readable log: one line per finished trial and reproduction, on stderr and in log.txt
    log_lines = (folder / "log.txt").read_text().splitlines()
    assert len([ln for ln in log_lines if " baseline trial " in ln]) == 2
    assert len([ln for ln in log_lines if " baseline reproduction " in ln]) == 2
    assert all(ln.split(" ", 2)[2] in err for ln in log_lines)
    study = optuna.load_study(study_name=f"{name}.baseline.search", storage=f"sqlite:///{folder / 'optuna.db'}")
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        line = next(ln for ln in log_lines if f"trial {t.user_attrs['slot'] + 1}/2 complete" in ln)
        assert f"{t.value:.4f}" in line and f"alpha={t.params['loss.options.alpha']:.4g}" in line
    reps = optuna.load_study(study_name=f"{name}.baseline.reproductions", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert "reproductions" in reps.user_attrs["role"]
    done = sorted((t for t in reps.get_trials() if t.state == optuna.trial.TrialState.COMPLETE),
                  key=lambda t: t.user_attrs["slot"])
    assert len(done) == 2

    # runs/index.csv: every run folder's hash with method, kind, number, fold, seed, parameters
    index = read_index(folder)
    assert len([r for r in index if r["kind"] == "trial"]) == 2 * 4
    assert len([r for r in index if r["kind"] == "reproduction"]) == 2 * 4
    on_disk = {p.name for p in (folder / "runs" / "baseline").iterdir()}
    assert {r["hash"] for r in index} == on_disk
    for r in index:
        assert (folder / r["folder"] / "best.pt").is_file()
        if r["kind"] == "reproduction":
            t = done[int(r["number"])]
            assert int(r["seed"]) == t.user_attrs["seed"] and json.loads(r["params"]) == t.user_attrs["params"]

    code, out, err = run_main(capsys, ["--evaluate", str(folder), "--export", "--no_progress"])
    assert code == 0, err[-3000:]
    assert "| baseline | 0 |" in out and "| baseline | 1 |" in out
    got = {(r["reproduction"], r["embedding"], r["metric"]): float(r["value"])
           for r in _rows(folder / "evaluate_test.csv")}
    # exactly the test numbers the reproductions recorded when they ran
    for t in done:
        slot = str(t.user_attrs["slot"])
        for emb in ("separate", "concatenated"):
            for metric, value in t.user_attrs[emb].items():
                assert got[(slot, emb, metric)] == value, (slot, emb, metric)
        for f, metrics in enumerate(t.user_attrs["folds"]):
            for metric, value in metrics.items():
                assert got[(slot, f"fold{f}", metric)] == value
    # the exported files: items.csv rows describe the embedding rows; labels are the test classes' images
    export = folder / "export" / "test"
    items = _rows(export / "items.csv")
    ds = TinyShapes()
    classes = np.arange(16)[8:]  # the sorted classes' second half is the test set (test_fraction 0.5)
    expect_idx = np.flatnonzero(np.isin(ds.labels, classes))
    assert [int(r["index"]) for r in items] == expect_idx.tolist()
    assert [int(r["label"]) for r in items] == ds.labels[expect_idx].tolist()
    assert all(r["path"] == str(ds.paths[int(r["index"])]) for r in items)
    labels = np.asarray([int(r["label"]) for r in items])
    for t in done:
        slot = t.user_attrs["slot"]
        cat = np.load(export / "baseline" / f"rep{slot}_concatenated.npy")
        assert cat.shape == (len(items), 4 * 16) and cat.dtype == np.float32
        assert np.allclose(np.linalg.norm(cat.reshape(len(items), 4, 16), axis=2), 1, atol=1e-5)
        assert _brute_precision_at_1(cat, labels) == pytest.approx(t.user_attrs["concatenated"]["precision_at_1"])
        for f in range(4):
            assert np.load(export / "baseline" / f"rep{slot}_fold{f}.npy").shape == (len(items), 16)

    # load_model: one call, embeds images like the experiment did (its features were cached in float16)
    row = next(r for r in index if r["kind"] == "reproduction" and r["number"] == "1" and r["fold"] == "2")
    model = xml_plugin.load_model(folder / row["folder"])
    sample = expect_idx[:10]
    e = model.embed([ds.image(int(i)) for i in sample])
    exported = np.load(export / "baseline" / "rep1_fold2.npy")[:10]
    assert e.shape == (10, 16) and model.method == "baseline"
    cos = np.sum(e * exported, axis=1) / np.linalg.norm(e, axis=1) / np.linalg.norm(exported, axis=1)
    assert cos.min() > 0.999

    # --split val: fold f's model on fold f's validation classes, items per fold
    code, out, err = run_main(capsys, ["--evaluate", str(folder), "--split", "val", "--export", "--no_progress"])
    assert code == 0, err[-3000:]
    splits = json.loads((folder / "splits.json").read_text())
    for f in range(4):
        assert [int(r["index"]) for r in _rows(folder / "export" / "val" / f"items_fold{f}.csv")] == \
            splits["folds"][f]["val"]
    assert not (folder / "export" / "val" / "baseline" / "rep0_concatenated.npy").exists()


def test_evaluate_input_errors(tmp_path, capsys):
    code, _, err = run_main(capsys, ["--evaluate", str(tmp_path / "nothing")])
    assert code == 2 and "not an experiment folder" in err and err.count("\n") == 1
    code, _, err = run_main(capsys, ["--experiment_name", "x", "--export"])
    assert code == 2 and "--export and --split go with --evaluate" in err


def _write_csv_dataset(tmp_path, split=True, query_gallery=True):
    """16 tiny classes as PNG files and an open-metric-learning CSV; classes 8..15 are validation."""
    ds = TinyShapes()
    (tmp_path / "imgs").mkdir(exist_ok=True)
    rows = []
    for i in range(len(ds)):
        rel = f"imgs/{i:03d}.png"
        ds.image(i).save(tmp_path / rel)
        label = int(ds.labels[i]) + 100  # not 0..C-1: renumbered by the loader
        val = label >= 108
        rank = i % 6
        row = {"label": label, "path": rel}
        if split:
            row["split"] = "validation" if val else "train"
        if query_gallery:
            row["is_query"] = (rank < 2) if val else ""
            row["is_gallery"] = (rank >= 2) if val else ""
        rows.append(row)
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path, ds


MY_LOSS = '''
from pathlib import Path
from pytorch_metric_learning.losses import ContrastiveLoss
import xml_plugin

MARK = Path(__file__).with_name("my_loss_calls.txt")


class MyLoss(ContrastiveLoss):
    """Contrastive loss that counts its calls in a file."""

    def forward(self, *args, **kwargs):
        with open(MARK, "a") as f:
            f.write("x")
        return super().forward(*args, **kwargs)


xml_plugin.register("loss", MyLoss, name="my_counted_loss")
'''


def test_csv_dataset_and_imported_loss_run_the_protocol_end_to_end(tmp_path, capsys):
    csv_path, ds = _write_csv_dataset(tmp_path)
    module = tmp_path / "my_losses.py"
    module.write_text(MY_LOSS)
    over = dict(tiny_overrides(tmp_path, **{"general.reproductions": 1, "general.methods": ["baseline"],
                                             "trainer.max_epochs": 1}))
    over.pop("dataset.name"), over.pop("dataset.options")
    argv = ["--experiment_name", "mine", "--no_progress", "--dataset", "csv", "--dataset_root", str(csv_path),
            "--import", str(module), "--loss", "my_counted_loss"] + as_cli_args(list(over.items()))
    try:
        code, out, err = run_main(capsys, argv)
        assert code == 0, err[-3000:]
        calls = (tmp_path / "my_loss_calls.txt").read_text()
        assert len(calls) >= 4 * 6  # at least every fold's 6 iterations of one training ran the imported loss
    finally:
        xml_plugin.unregister("loss", "my_counted_loss")
    folder = tmp_path / "experiments" / "mine"
    splits = json.loads((folder / "splits.json").read_text())
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert splits["test"] == [i for i, r in enumerate(rows) if r["split"] == "validation"]
    assert splits["query"] == [i for i, r in enumerate(rows) if r["is_query"] == "True"]
    assert splits["gallery"] == [i for i, r in enumerate(rows) if r["is_gallery"] == "True"]
    for f in range(4):  # the folds split the 8 train classes, two per fold
        val_labels = {int(rows[i]["label"]) for i in splits["folds"][f]["val"]}
        assert val_labels == {100 + 2 * f, 101 + 2 * f}
    assert "my_counted_loss" in (folder / "report.md").read_text()


def test_csv_dataset_errors(tmp_path):
    from xml_plugin.data import get_dataset
    with pytest.raises(C.ConfigError, match="does not exist"):
        get_dataset("csv", root=str(tmp_path / "none.csv"))
    (tmp_path / "a.csv").write_text("label,file\n1,x.png\n")
    with pytest.raises(C.ConfigError, match="no column 'path'"):
        get_dataset("csv", root=str(tmp_path / "a.csv"))
    csv_path, _ = _write_csv_dataset(tmp_path)
    lines = csv_path.read_text().splitlines()
    (tmp_path / "b.csv").write_text("\n".join(lines + ["999,imgs/000.png,train,,"]) + "\n")
    with pytest.raises(C.ConfigError, match="single image.*999"):
        get_dataset("csv", root=str(tmp_path / "b.csv"))
    (tmp_path / "c.csv").write_text("\n".join(lines + ["100,imgs/missing.png,train,,"]) + "\n")
    with pytest.raises(C.ConfigError, match="missing.png"):
        get_dataset("csv", root=str(tmp_path / "c.csv"))
    # a split column that is not class-disjoint is not used (a warning says so); the protocol splits by class
    (tmp_path / "d.csv").write_text("\n".join(lines + ["100,imgs/001.png,validation,True,False"]) + "\n")
    with pytest.warns(UserWarning, match="not a class-disjoint"):
        ds = get_dataset("csv", root=str(tmp_path / "d.csv"))
    assert getattr(ds, "test_mask", None) is None and ds.is_query is None
    # without the split column: labels renumbered in sorted order, no official test set
    (tmp_path / "plain").mkdir()
    plain, _ = _write_csv_dataset(tmp_path / "plain", split=False, query_gallery=False)
    ds = get_dataset("csv", root=str(plain))
    assert ds.labels.tolist() == TinyShapes().labels.tolist() and ds.class_names[0] == "100"


def test_import_errors_and_module_names_from_the_working_folder(tmp_path, capsys, monkeypatch):
    code, _, err = run_main(capsys, ["--import", "no_such_module_xyz", "--list"])
    assert code == 2 and "no_such_module_xyz" in err
    code, _, err = run_main(capsys, ["--import", str(tmp_path / "nope.py"), "--list"])
    assert code == 2 and "no such file" in err
    (tmp_path / "my_components_abc.py").write_text(MY_LOSS.replace("my_counted_loss", "my_listed_loss"))
    monkeypatch.chdir(tmp_path)
    try:
        code, out, err = run_main(capsys, ["--import", "my_components_abc", "--list"])
        assert code == 0, err
        assert "my_listed_loss" in out
    finally:
        xml_plugin.unregister("loss", "my_listed_loss")
        sys.modules.pop("my_components_abc", None)


def test_record_run_writes_each_row_once(tmp_path):
    run = tmp_path / "runs" / "xml" / "abc123"
    for _ in range(2):  # a resumed unit records again: one row
        record_run(tmp_path, run, "xml", "trial", 3, 1, 0, {"lam": 0.5}, {"loss": {"name": "x"}}, {"frozen_blocks": 1})
    record_run(tmp_path, run, "xml", "reproduction", 0, 1, 0, {"lam": 0.5}, {"loss": {"name": "x"}}, {"frozen_blocks": 1})
    rows = read_index(tmp_path)
    assert [(r["kind"], r["number"], r["fold"], r["folder"]) for r in rows] == [
        ("trial", "3", "1", "runs/xml/abc123"), ("reproduction", "0", "1", "runs/xml/abc123")]
    info = json.loads((run / "run.json").read_text())
    assert info["config"] == {"loss": {"name": "x"}} and len(info["runs"]) == 2


def test_log_line_format(tmp_path):
    stream = io.StringIO()
    line = ExperimentLog(tmp_path, stream).trial("xml", 0, 5, {"loss.options.alpha": 2.123456, "m": 3}, 0.41236, 12.34)
    assert line.endswith("xml trial 1/5 complete | alpha=2.123 m=3 | validation MAP@R (fold mean) 0.4124 | 12.3 s")
    assert stream.getvalue().strip() == line == (tmp_path / "log.txt").read_text().strip()


def test_wheel_ships_the_config_folders(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        (src / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(["cp", "-r", str(REPO / "xml_plugin"), str(REPO / "benchmark_configs"), str(src)], check=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("xml_plugin/benchmark_configs/", 1)[1] for n in names if "xml_plugin/benchmark_configs/" in n}
    expected = {p.relative_to(REPO / "benchmark_configs").as_posix() for p in (REPO / "benchmark_configs").rglob("*.yaml")}
    assert expected and expected <= shipped
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "xml_plugin").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))  # no subpackage left out of setup.cfg's list
    # unpacked outside a checkout, the package finds its configs
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from xml_plugin import config as C; cfg = C.load(); print(C.config_root()); "
            "print(cfg['general']['n_trials'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == str(site / "xml_plugin" / "benchmark_configs")
    assert int(r.stdout.splitlines()[1]) == C.load()["general"]["n_trials"]


def test_a_config_root_without_a_default_is_a_config_error(tmp_path):
    for category in C.CATEGORIES[1:]:
        (tmp_path / category).mkdir()
        (tmp_path / category / "default.yaml").write_text("{}\n")
    with pytest.raises(C.ConfigError, match="config_general/default.yaml"):
        C.load(root=tmp_path)
