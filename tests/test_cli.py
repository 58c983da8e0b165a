"""The command line: help, shorthands, overrides, --print_config, --list and its errors (exit code 2, stderr)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xml_plugin import config as C
from xml_plugin import registry as R
from xml_plugin.cli import main

from conftest import run_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_experiment(monkeypatch):
    """Fail instead of running an experiment: the commands tested here must stop before one starts."""
    import xml_plugin.protocol.experiment as E

    def refuse(*args, **kwargs):
        raise AssertionError("an Experiment was started")
    monkeypatch.setattr(E, "Experiment", refuse)


def test_help_lists_flags_and_override_syntax():
    r = subprocess.run([sys.executable, "run.py", "--help"], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--experiment_name", "--loss", "--dataset", "--dataset_root", "--trunk", "--pooling", "--device",
                 "--methods", "--n_trials", "--reproductions", "--storage", "--compare", "--list", "--print_config"):
        assert flag in r.stdout, flag
    for category in C.CATEGORIES:
        assert f"--{category}" in r.stdout
    assert "--section.key VALUE" in r.stdout and "~replace" in r.stdout and "~delete" in r.stdout
    assert "search:" in r.stdout  # how to mark a key as searched


def test_print_config_merges_shorthands_and_overrides(capsys):
    code, out, err = run_main(capsys, ["--print_config", "--loss", "contrastive", "--trainer.batch_size", "64",
                                       "--miner~delete", "--n_trials", "3", "--methods", "baseline", "gsp",
                                       "--dataset", "kanji", "--config_general", "smoke"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    default = C.load()
    assert cfg["loss"]["name"] == "contrastive"  # and contrastive's search space, picked for it
    assert set(C.search_space(cfg)) == {"loss.options.pos_margin", "loss.options.neg_margin"}
    assert cfg["trainer"]["batch_size"] == 64
    assert cfg["trainer"]["max_epochs"] == C.load({"config_general": ["smoke"]})["trainer"]["max_epochs"]
    assert "miner" in default and "miner" not in cfg
    assert cfg["general"]["n_trials"] == 3 and cfg["general"]["methods"] == ["baseline", "gsp"]
    assert cfg["dataset"]["name"] == "kanji"
    assert cfg["optimizer"] == default["optimizer"]  # untouched sections stay as in the YAML files


def test_override_beats_shorthand_and_flow_mappings(capsys):
    code, out, err = run_main(capsys, ["--print_config", "--loss", "contrastive", "--loss.name", "triplet_margin",
                                       "--optimizer.options", "{lr: 1e-2}", "--miner", "{name: multi_similarity}",
                                       "--loss_wrapper.options.lam", "{search: float, low: 0.1, high: 1, log: true}"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["loss"]["name"] == "triplet_margin"  # the explicit key comes after the shorthand
    assert cfg["optimizer"]["options"]["lr"] == pytest.approx(0.01)
    assert cfg["optimizer"]["options"]["weight_decay"] == C.load()["optimizer"]["options"]["weight_decay"]
    assert cfg["miner"] == {"name": "multi_similarity"}
    space = C.search_space(cfg)
    assert space["loss_wrapper.options.lam"] == {"search": "float", "low": 0.1, "high": 1, "log": True}
    assert set(space) == {"loss_wrapper.options.lam", "loss.options.margin"}  # triplet margin's own space


def test_shorthand_accepts_a_whole_spec(capsys):
    code, out, err = run_main(capsys, ["--print_config", "--loss", "{name: contrastive, options: {pos_margin: 0.1}}"])
    assert code == 0, err
    loss = yaml.safe_load(out)["loss"]
    assert loss["name"] == "contrastive" and loss["options"]["pos_margin"] == 0.1  # fixed, so not searched
    assert set(C.search_space(loss)) == {"options.neg_margin"}


def test_list_prints_every_kind(capsys):
    code, out, err = run_main(capsys, ["--list"])
    assert code == 0, err
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if line}
    assert set(R.KINDS) <= set(lines)
    assert "multi_similarity" in lines["loss"] and "m_per_class" in lines["sampler"]
    assert all(m in lines["method"] for m in ("baseline", "xml", "gsp", "xbm", "xbn", "axbn"))
    assert f"({len(R.names('pooling'))})" in lines["pooling"]


def test_unknown_loss_exits_2_on_stderr_without_making_the_folder(capsys, tmp_path):
    folder = tmp_path / "experiments"
    code, out, err = run_main(capsys, ["--experiment_name", "typo", "--loss", "multi_similarty",
                                       "--experiment_folder", str(folder)])
    assert code == 2
    assert out == ""
    assert "multi_similarty" in err and "multi_similarity" in err.split("Did you mean")[1]
    assert not (folder / "typo").exists()


@pytest.mark.parametrize("argv, word", [
    (["--methods", "baselin"], "baseline"),
    (["--general.methods", "xbnn"], "xbn"),  # a single value: still a list of one method
    (["--pooling", "gsq"], "gsp"),
    (["--dataset", "kanjii"], "kanji"),
    (["--optimizer.name", "adamm"], "Adam"),
])
def test_unknown_names_fail_early(capsys, tmp_path, argv, word):
    code, out, err = run_main(capsys, ["--experiment_name", "e", "--experiment_folder", str(tmp_path)] + argv)
    assert code == 2 and out == ""
    assert word in err
    assert not (tmp_path / "e").exists()


def test_bad_override_syntax_exits_2_with_usage(capsys):
    code, out, err = run_main(capsys, ["--print_config", "--trainer.batch_size"])
    assert code == 2 and out == ""
    assert "usage:" in err and "--trainer.batch_size needs a value" in err
    code, out, err = run_main(capsys, ["--print_config", "stray"])
    assert code == 2 and "usage:" in err and "stray" in err


def test_bad_config_name_exits_2(capsys):
    code, out, err = run_main(capsys, ["--print_config", "--config_general", "smok"])
    assert code == 2 and out == ""
    assert "smok.yaml" in err and "smoke" in err


def test_missing_experiment_name_exits_2(capsys, no_experiment):
    code, out, err = run_main(capsys, ["--loss", "contrastive"])
    assert code == 2 and out == ""
    assert "--experiment_name" in err and "usage:" in err


def test_compare_of_unfinished_folders_exits_2(capsys, tmp_path):
    code, out, err = run_main(capsys, ["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert code == 2 and out == "" and err.startswith("error:")


def test_run_py_exit_code_and_stderr():
    """The same through the real entry point: the exit code reaches the shell, the message goes to stderr."""
    r = subprocess.run([sys.executable, "run.py", "--print_config", "--a.b"], cwd=str(REPO), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "--a.b needs a value" in r.stderr


def test_compare_two_finished_experiments_with_row_names(capsys, tmp_path):
    from xml_plugin.protocol.report import summarize, write_report
    for name, value in (("a", 0.5), ("b", 0.25)):
        records = [{"dataset": "cards", "method": m, "embedding": e, "metric": k, "value": value + d}
                   for m in ("baseline", "xml") for e in ("separate", "concatenated")
                   for k in ("precision_at_1", "r_precision", "mean_average_precision_at_r") for d in (0.0, 0.01)]
        write_report(tmp_path / name, summarize(records), name)
    assert main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--compare_names", "MS", "Contr",
                 "--latex"]) == 0
    out = capsys.readouterr().out
    for row in ("| MS |", "| MS + xml |", "| Contr |", "| Contr + xml |"):
        assert row in out
    assert "50.50" in out and "25.50" in out and "\\begin{tabular}" in out
    # without names the two experiments' rows collide: exit 2 and the message says how to name them
    assert main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "--compare_names" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# powerful-benchmarker's command line; --print_config checks what a run checks

def test_pb_spellings_are_in_help_and_mean_the_same(capsys):
    from xml_plugin.cli import build_parser
    text = " ".join(build_parser().format_help().split())
    assert "--n_trials N_TRIALS, --bayes_opt_iters N_TRIALS" in text
    assert "--bayes_opt_iters is powerful-benchmarker's" in text
    for word in ("~OVERRIDE~", "~DELETE~", "--from_pb PB_CONFIG_ROOT", "[default, smoke]"):
        assert word in text
    ours = run_main(capsys, ["--print_config", "--config_general", "smoke", "--n_trials", "5",
                             "--optimizer.options~replace", "{lr: 0.1}", "--miner~delete"])
    pb = run_main(capsys, ["--print_config", "--config_general", "[default,", "smoke]", "--bayes_opt_iters", "5",
                           "--optimizer.options~OVERRIDE~", "{lr: 0.1}", "--miner~DELETE~"])
    assert ours[0] == pb[0] == 0, pb[2]
    assert pb[1] == ours[1]
    cfg = yaml.safe_load(pb[1])
    assert cfg["general"]["n_trials"] == 5 and cfg["optimizer"]["options"] == {"lr": 0.1} and "miner" not in cfg
    assert cfg["trainer"]["max_epochs"] == C.load({"config_general": ["smoke"]})["trainer"]["max_epochs"]
    folder = yaml.safe_load(run_main(capsys, ["--print_config", "--root_experiment_folder", "elsewhere"])[1])
    assert folder["general"]["experiment_folder"] == "elsewhere"


@pytest.mark.parametrize("argv, words", [
    (["--loss", "contrastive", "--loss.options.margn", "0.3"], ["takes no option 'margn'", "pos_margin"]),
    (["--loss_funcs", "{metric_loss: {ContrastiveLoss: {}}}"], ["powerful-benchmarker key", "--from_pb"]),
    (["--methods", "baseline", "--loss_wrapper.options.lam", "0.3"], ["applies to none of the compared methods"]),
    (["--trainer.batch_size", "30"], ["multiple of the sampler's m"]),
    (["--general.experiment_folder", "a", "b"], ["general.experiment_folder takes one value", "'a b'"]),
])
def test_print_config_makes_the_checks_of_a_run_and_writes_nothing(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, ["--print_config", "--experiment_name", "e",
                                       "--experiment_folder", str(tmp_path / "exps")] + argv)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert list(tmp_path.iterdir()) == []


def test_print_config_of_a_valid_config_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, ["--print_config", "--experiment_name", "e", "--methods", "baseline", "xml", "gsp",
                                       "--config_general", "smoke"])
    assert code == 0, err
    assert yaml.safe_load(out)["general"]["methods"] == ["baseline", "xml", "gsp"]
    assert list(tmp_path.iterdir()) == []  # not even experiments/


def test_multi_valued_path_override_of_a_run_exits_2_without_a_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, ["--experiment_name", "e", "--general.experiment_folder", "a", "b"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
