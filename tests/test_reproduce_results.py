"""``run.py --reproduce_results``: a finished tiny experiment run again from its folder gives every stored number
exactly (one thread, one worker), a doctored stored number is reported, a folder that is not a finished experiment is
exit 2; the runs' provenance in --evaluate and in the check."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil

import faiss
import pytest
import pytorch_metric_learning
import torch

import xml_plugin
from xml_plugin import config as C
from xml_plugin.protocol.evaluate_saved import provenance_summary
from xml_plugin.protocol.names import NAME_RE
from xml_plugin.protocol.reproduce_results import CHECK, classify, default_name, method_fixes

from conftest import as_cli_args, run_main, tiny_overrides

METHOD = "two_epochs"  # its overlay trains 2 epochs; the original's --trainer.max_epochs 1 wins over it
VERSIONS = (f"torch {torch.__version__}, pytorch-metric-learning {pytorch_metric_learning.__version__}, "
            f"faiss {faiss.__version__}")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _check_rows(text):
    """The number rows of reproduction_check.md: {(method, reproduction, seed, embedding, metric): (stored, check)}."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] == METHOD:
            out[tuple(cells[:5])] = (cells[5], cells[7], cells[8])
    return out


def _key(r):
    emb = f"fold {r['fold']}" if r["embedding"] == "fold" else r["embedding"]
    return (r["method"], r["reproduction"], r["seed"], emb, r["metric"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny experiment (one method, 2 trials, 2 reproductions, 4 folds) run through the CLI with one
    thread and one worker; the folder of the reproductions' experiments beside it."""
    tmp = tmp_path_factory.mktemp("repro")
    xml_plugin.register("method", {"trainer": {"max_epochs": 2}}, name=METHOD)
    argv = ["--experiment_name", "orig", "--no_progress"] + as_cli_args(tiny_overrides(
        tmp, **{"general.methods": [METHOD], "trainer.max_epochs": 1, "general.num_threads": 1, "general.workers": 1}))
    from xml_plugin.cli import main
    assert main(argv) == 0
    yield tmp / "experiments" / "orig", tmp / "local"
    xml_plugin.registry.unregister("method", METHOD)


def test_reproduction_gives_every_number_exactly(finished, capsys):
    stored, local = finished
    before = _snapshot(stored)
    code, out, err = run_main(capsys, ["--reproduce_results", str(stored), "--experiment_name", "rep",
                                       "--experiment_folder", str(local), "--no_progress"])
    assert code == 0, err[-3000:]
    new = local / "rep"
    assert out.strip() == (new / CHECK).read_text().strip()
    stored_rows = _rows(stored / "reproductions.csv")
    expected = {_key(r): r["value"] for r in stored_rows}
    assert len(expected) == len(stored_rows)  # one number per key
    embeddings = ("fold 0", "fold 1", "fold 2", "fold 3", "separate", "concatenated")
    assert {k[1:4] for k in expected} == {(str(r), str(1000 * (r + 1)), emb) for r in range(2) for emb in embeddings}
    got = _check_rows(out)
    assert set(got) == set(expected)
    assert all(check == "exact" for _, _, check in got.values())
    assert all(float(s) == pytest.approx(float(expected[k]), rel=1e-8) for k, (s, _, _) in got.items())
    assert f"**{len(expected)} test numbers (reproductions.csv): every number reproduced exactly.**" in out
    # the same numbers, read from both folders independently of the check
    assert _rows(new / "reproductions.csv") == _rows(stored / "reproductions.csv")
    # every method's config as recorded: the override that beat the overlay (1 epoch, not the overlay's 2)
    assert json.loads((new / "experiment.json").read_text())["fingerprint"] == \
        json.loads((stored / "experiment.json").read_text())["fingerprint"]
    assert {json.loads(p.read_text())["epochs_run"] for p in new.glob("runs/*/*/result.json")} == {1}
    assert C.load_yaml(new / "config.yaml")["general"]["experiment_folder"] == str(local)
    where = f"computed by 1 process, 1 torch thread, cpu; {VERSIONS} (all 16 runs)"  # (2 trials + 2 reps) x 4 folds
    assert f"- stored runs: {where}" in out and f"- reproduced runs: {where}" in out
    assert "| torch_threads | 1 | 1 | same |" in out and "**differs**" not in out
    assert _snapshot(stored) == before  # the stored folder is only read


def test_doctored_number_and_older_runs_are_reported(finished, capsys, tmp_path):
    stored, local = finished
    downloaded = tmp_path / "downloaded"
    shutil.copytree(stored, downloaded)
    rows = _rows(downloaded / "reproductions.csv")
    far, near = rows[3], rows[10]
    far_value = float(far["value"])
    far["value"] = repr(far_value + 0.01)
    near["value"] = repr(float(near["value"]) * (1 + 1e-9))
    with open(downloaded / "reproductions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    for p in downloaded.glob("runs/*/*/result.json"):  # as an older version wrote them: no provenance
        record = json.loads(p.read_text())
        record.pop("provenance")
        p.write_text(json.dumps(record))
    # the same reproduction name: its finished folder is read back (resumed), the check made against this folder
    code, out, err = run_main(capsys, ["--reproduce_results", str(downloaded), "--experiment_name", "rep",
                                       "--experiment_folder", str(local), "--no_progress"])
    assert code == 0, err[-3000:]
    got = _check_rows(out)
    assert got[_key(far)][2] == "differs"
    assert float(got[_key(far)][1]) == pytest.approx(-0.01, rel=1e-2)  # reproduced - stored
    assert got[_key(near)][2] == "differs by float rounding (<1e-06 relative)"
    others = [check for k, (_, _, check) in got.items() if k not in (_key(far), _key(near))]
    assert len(others) == len(rows) - 2 and set(others) == {"exact"}
    assert f"{len(rows) - 2} exact, 1 differs" in out
    assert "- stored runs: 16 runs record no provenance (written by an older version)" in out
    assert "| torch_threads | (not recorded) | 1 | **differs** |" in out
    assert f"| torch | {torch.__version__} (experiment.json) | {torch.__version__} | **differs** |" in out


def test_not_a_finished_experiment_is_exit_2(finished, capsys, tmp_path):
    stored, _ = finished
    local = tmp_path / "local"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(stored, unfinished, ignore=shutil.ignore_patterns("runs"))
    (unfinished / "reproductions.csv").unlink()
    old = tmp_path / "old"
    shutil.copytree(stored, old, ignore=shutil.ignore_patterns("runs"))
    info = json.loads((old / "experiment.json").read_text())
    info.pop("fingerprint")
    (old / "experiment.json").write_text(json.dumps(info))
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "nothing", "no such folder"),
             (tmp_path / "empty", "not a finished experiment (no config.yaml"),
             (unfinished, "not a finished experiment (no reproductions.csv"), (old, "holds no fingerprint")]
    for folder, message in cases:
        code, _, err = run_main(capsys, ["--reproduce_results", str(folder), "--experiment_folder", str(local)])
        assert code == 2 and message in err and err.count("\n") == 1, (folder, err)
    for extra, message in ((["--trainer.max_epochs", "3"], "--trainer.max_epochs: --reproduce_results reruns"),
                           (["--methods", "baseline"], "--general.methods: --reproduce_results reruns"),
                           (["--experiment_name", "a/b"], "is not a valid name"),
                           (["--config_general", "smoke"], "leave out --config_<category>")):
        code, _, err = run_main(capsys, ["--reproduce_results", str(stored), "--experiment_folder", str(local)] + extra)
        assert code == 2 and message in err, err
    # the stored folder's own name in its own experiments folder is not a reproduction
    code, _, err = run_main(capsys, ["--reproduce_results", str(stored), "--experiment_name", "orig",
                                     "--experiment_folder", str(stored.parent)])
    assert code == 2 and "the stored experiment's own folder" in err
    assert not local.exists()


def test_evaluate_shows_where_the_runs_were_computed(finished, capsys, tmp_path):
    stored, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(stored, copy)
    code, out, err = run_main(capsys, ["--evaluate", str(copy), "--no_progress"])
    assert code == 0, err[-3000:]
    # the evaluated runs: 2 reproductions x 4 folds
    assert f"Stored runs: computed by 1 process, 1 torch thread, cpu; {VERSIONS} (all 8 runs)." in out


def test_provenance_summary_notes_runs_that_differ():
    one = {"world_size": 1, "torch_threads": 1, "device": "cpu", "device_name": "cpu", "torch": "2.1",
           "pytorch_metric_learning": "2.9.0", "faiss": "1.15.1"}
    ddp = {**one, "world_size": 4, "torch_threads": 2, "device": "cuda:0", "device_name": "NVIDIA H200"}
    text = provenance_summary([one, one, ddp, None])
    assert text.startswith("the runs differ in device, device_name, torch_threads, world_size: ")
    assert ("2 runs computed by 1 process, 1 torch thread, cpu; torch 2.1, pytorch-metric-learning 2.9.0, faiss "
            "1.15.1; 1 run computed by 4 processes (a DDP group), 2 torch threads, cuda:0 (NVIDIA H200); torch 2.1, "
            "pytorch-metric-learning 2.9.0, faiss 1.15.1; 1 run record no provenance") in text
    assert provenance_summary([one]).endswith("(all 1 runs)")


def test_method_fixes_rebuild_the_recorded_config():
    # (a marker without ``default`` that replaces a value in its range inherits that value as its default, as in any
    # merge: such a record is rebuilt up to that default, which only a run without a search reads)
    marker = {"search": "float", "low": 0.01, "high": 10.0, "log": True, "default": 1.0}
    recorded = {"general": {"device": "cpu"}, "trainer": {"max_epochs": 1, "batch_size": 16},
                "loss_wrapper": {"name": "xml", "options": {"lam": 0.3}},
                "loss": {"name": "ms", "options": {"alpha": marker}},
                "transforms": {"train": {}}}
    now = {"general": {"device": "cuda"}, "trainer": {"max_epochs": 2, "batch_size": 16, "grad_clip": 1.0},
           "loss_wrapper": {"name": "xml", "options": {"lam": marker}},
           "loss": {"name": "ms", "options": {"alpha": 2.0}},
           "transforms": {"train": {}}}
    fixes = method_fixes(recorded, now)
    # general stays as it is here; the changed leaves take the recorded values, a leaf the record lacks is null
    assert fixes == {"trainer": {"max_epochs": 1, "grad_clip": None}, "loss_wrapper": {"options": {"lam": 0.3}},
                     "loss": {"options": {"alpha": marker}}}
    assert C.merge(now, fixes) == {**recorded, "general": {"device": "cuda"},
                                   "trainer": {"max_epochs": 1, "batch_size": 16, "grad_clip": None}}
    # a section null here (a method without a loss wrapper) that the record has
    assert method_fixes({"loss_wrapper": {"name": "xml", "options": {"lam": 0.3}}}, {"loss_wrapper": None}) == \
        {"loss_wrapper": {"name": "xml", "options": {"lam": 0.3}}}
    assert method_fixes(recorded, recorded) == {}


def test_classify_and_default_name():
    assert classify(0.5, 0.5) == "exact" and classify(math.nan, math.nan) == "exact"
    assert classify(0.5, 0.5 * (1 + 5e-7)) == "differs by float rounding (<1e-06 relative)"
    assert classify(0.5, 0.5 * (1 + 2e-6)) == "differs"
    assert classify(0.5, None) == "not reproduced" and classify(None, 0.5) == "not stored"
    for recorded in ("xml_ms", "x" * 100):
        name = default_name(recorded, "20261201-120000")
        assert NAME_RE.fullmatch(name) and len(name) <= 100
        assert name.endswith(".reproduced-20261201-120000") and recorded.startswith(name.split(".reproduced-")[0])
    assert re.fullmatch(r"xml_ms\.reproduced-\d{8}-\d{6}", default_name("xml_ms"))
