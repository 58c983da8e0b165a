"""Bad input, as a new user types it: exit code 2, one message on stderr that names the problem, no traceback, and
an existing experiment folder given the bad input is left byte-for-byte unchanged. A bug is not input: exit 1 with
its traceback."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import xml_plugin
from xml_plugin.cli import main

from conftest import as_cli_args, tiny_overrides

NAME = "existing"


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A finished tiny experiment, and the command-line words that made it."""
    tmp = tmp_path_factory.mktemp("bad_input")
    args = as_cli_args(tiny_overrides(tmp, **{"general.n_trials": 1, "general.reproductions": 1,
                                              "trainer.max_epochs": 1}))
    assert main(["--experiment_name", NAME, "--no_progress", *args]) == 0
    folder = tmp / "experiments" / NAME
    return tmp, args, folder, _snapshot(folder)


def _cub_missing_labels(tmp: Path) -> str:
    root = tmp / "cub_missing"
    (root / "CUB_200_2011" / "images").mkdir(parents=True, exist_ok=True)
    (root / "CUB_200_2011" / "images.txt").write_text("1 001.A/a.jpg\n")
    return str(root)


def _broken_yaml_root(tmp: Path) -> str:
    root = tmp / "configs"
    if not root.exists():
        shutil.copytree(xml_plugin.config.CONFIG_ROOT, root)
        (root / "config_general" / "broken.yaml").write_text("general:\n  n_trials: [1, 2\n")
    return str(root)


def _csv(tmp: Path, name: str, rows, encoding: str = "utf-8") -> str:
    """A CSV data set in ``tmp/name``: rows of (label, file name, bytes or None for a small PNG)."""
    from PIL import Image
    root = tmp / name
    if not root.exists():
        root.mkdir()
        lines = ["label,path"]
        for label, file, content in rows:
            if content is None:
                Image.new("RGB", (8, 8), (label * 20 % 255, 0, 0)).save(root / file)
            else:
                (root / file).write_bytes(content)
            lines.append(f"{label},{file}")
        (root / "data.csv").write_bytes("\n".join(lines).encode(encoding) + b"\n")
    return str(root / "data.csv")


def _csv_latin1(tmp: Path) -> str:
    return _csv(tmp, "csv_latin1", [(c, f"Äpfel_{c}_{i}.png", None) for c in range(8) for i in range(2)], "latin-1")


def _csv_not_image(tmp: Path) -> str:
    rows = [(c, f"{c}_{i}.png", None) for c in range(8) for i in range(2)] + [(0, "notes.png", b"just some text\n")]
    return _csv(tmp, "csv_not_image", rows)


def _csv_few_classes(tmp: Path) -> str:
    return _csv(tmp, "csv_few_classes", [(c, f"{c}_{i}.png", None) for c in range(10) for i in range(4)])


def _yaml_latin1_root(tmp: Path) -> str:
    root = tmp / "configs_latin1"
    if not root.exists():
        shutil.copytree(xml_plugin.config.CONFIG_ROOT, root)
        (root / "config_general" / "latin.yaml").write_bytes("general:\n  n_trials: 1  # r\xe9sum\xe9\n".encode("latin-1"))
    return str(root)


def _report_latin1(tmp: Path) -> str:
    folder = tmp / "latin_report"
    if not folder.exists():
        folder.mkdir()
        (folder / "report.csv").write_bytes("dataset,method\ncart\xe9s,baseline\n".encode("latin-1"))
        (folder / "experiment.json").write_text('{"loss": "multi_similarity"}')
    return str(folder)


# (id, extra words, a phrase the message must contain). The tiny experiment's words set general.*, dataset.* and
# trunk.* with dotted keys, which win over the shorthands (--dataset ...): the cases use dotted keys too.
CASES = [
    ("typo in a key", ["--trainer.batchsize", "64"], "trainer.batch_size"),
    ("typo in a section", ["--trainr.batch_size", "64"], "trainer"),
    ("unknown top-level key", ["--foo.bar", "1"], "unknown config key 'foo'"),
    ("zero trials", ["--general.n_trials", "0"], "general.n_trials must be"),
    ("zero reproductions", ["--general.reproductions", "0"], "general.reproductions must be"),
    ("one fold", ["--dataset.num_folds", "1"], "dataset.num_folds"),
    ("zero epochs", ["--trainer.max_epochs", "0"], "trainer.max_epochs"),
    ("zero cache views", ["--cache.views", "0"], "cache.views"),
    ("batch size not a number", ["--trainer.batch_size", "abc"], "trainer.batch_size must be"),
    ("batch size vs sampler", ["--trainer.batch_size", "30"], "multiple of the sampler"),
    ("empty method list", ["--general.methods", "[]"], "general.methods"),
    ("unknown option of the loss", ["--loss.options", "{alfa: 2}"], "alfa"),
    ("options not a mapping", ["--loss.options", "{alpha: 2"], "loss.options must be a mapping"),
    ("PML refuses a miner's value", ["--miner", "{name: batch_easy_hard, options: {pos_strategy: bad}}"],
     "pos_strategy must be one of"),
    ("PML refuses a nested reducer", ["--loss.options", "{reducer: {name: threshold}}"], "low or high"),
    ("unknown nested reducer", ["--loss.options", "{reducer: {name: meen}}"], "unknown reducer"),
    ("XML pooling refuses a value", ["--method_overrides.xml.pooling.options.num_prototypes", "0"], "num_prototypes"),
    ("unknown option of the optimizer", ["--optimizer.options", "{lr: 0.1, momentun: 0.9}"], "takes no option 'momentun'"),
    ("unknown loss", ["--loss", "multi_similarty"], "multi_similarity"),
    ("unknown data set", ["--dataset.name", "cardz"], "unknown dataset"),
    ("unknown card framing", ["--dataset.name", "cards", "--dataset.options", "{framing: stretch}"], "framing must be"),
    ("kanji with no class", ["--dataset.name", "kanji", "--dataset.options", "{num_classes: 0}"], "num_classes"),
    ("train pad not a boolean", ["--transforms.train.pad", "3"], "transforms.train.pad"),
    ("unknown trunk", ["--trunk.name", "resnet9000"], "unknown trunk"),
    ("unknown pooling", ["--pooling", "gapp"], "unknown pooling"),
    ("unknown embedder", ["--embedder.name", "conv2x2"], "unknown embedder"),
    ("unknown method", ["--methods", "baseline", "xmll"], "unknown method"),
    ("unknown miner", ["--miner", "{name: multi_similarty}"], "unknown miner"),
    ("unknown loss wrapper", ["--loss_wrapper.name", "xbmm"], "unknown loss_wrapper"),
    ("unknown optimizer", ["--optimizer.name", "Adamm"], "unknown optimizer"),
    ("unknown sampler", ["--sampler.name", "m_per_klass"], "unknown sampler"),
    ("unknown config file", ["--config_general", "smok"], "smoke"),
    ("reference not compared", ["--reference", "gsp"], "general.reference"),
    ("method option for no method", ["--methods", "baseline", "--loss_wrapper.options.lam", "0.3"], "applies to none"),
    ("override for an unknown method", ["--method_overrides.gspp.trainer.batch_size", "8"], "unknown method"),
    ("search marker low >= high", ["--loss.options.alpha", "{search: float, low: 5, high: 1}"], "low must be < high"),
    ("unknown search type", ["--loss.options.alpha", "{search: floaty, low: 1, high: 2}"], "unknown search type"),
    ("CUDA asked for without CUDA", ["--general.device", "cuda"], "CUDA is not available"),
    ("postgresql unreachable", ["--storage", "postgresql://user@127.0.0.1:9/db"], "127.0.0.1"),
    ("sqlite in a missing folder", ["--storage", "sqlite:////nonexistent_dir_xml/optuna.db"], "cannot open the Optuna storage"),
    ("mysql without a driver", ["--storage", "mysql://user@127.0.0.1:9/db"], "driver"),
    ("storage not a URL", ["--storage", "not a url"], "not a database URL"),
    ("real data set without root", ["--dataset.name", "cub200", "--dataset.root", "/nonexistent_xml"], "nonexistent_xml"),
    ("real-format tree missing a file", ["--dataset.name", "cub200", "--dataset.root", _cub_missing_labels], "image_class_labels.txt"),
    ("malformed YAML file", ["--config_general", "broken"], "not valid YAML"),
    ("bad --search value", ["--search", "maybe"], "invalid choice"),
    ("--n_trials not an integer", ["--n_trials", "many"], "invalid int value"),
    # names are names, not paths
    ("name with a parent step", ["--experiment_name", "../elsewhere"], "not a valid name"),
    ("name that is an absolute path", ["--experiment_name", "/tmp/xml_absolute_name"], "not a valid name"),
    ("name '.'", ["--experiment_name", "."], "not a valid name"),
    ("name '..'", ["--experiment_name", ".."], "not a valid name"),
    ("name with a separator", ["--experiment_name", "a/b"], "not a valid name"),
    ("name with a newline", ["--experiment_name", "a\nb"], "not a valid name"),
    ("empty name", ["--experiment_name", ""], "not a valid name"),
    ("compare name with a separator", ["--compare", "experiments/x", "--compare_names", "a/b"], "not a valid name"),
    # values of the wrong type that used to fail inside the first trial
    ("a list where a number is expected", ["--loss.options.alpha", "[1, 2]"], "must be a number"),
    ("a string where a number is expected", ["--loss.options.alpha", "abc"], "must be a number"),
    ("a string where a flag is expected", ["--trainer.amp", "maybe"], "trainer.amp"),
    ("negative seed", ["--general.seed", "-1"], "general.seed must be"),
    ("seed out of range", ["--general.seed", "99999999999"], "general.seed must be"),
    ("cache seed out of range", ["--cache.seed", "-5"], "cache.seed must be"),
    ("zero threads", ["--general.num_threads", "0"], "general.num_threads must be"),
    ("negative threads", ["--general.num_threads", "-2"], "general.num_threads must be"),
    ("unknown device kind", ["--general.device", "tpu"], "general.device must be"),
    ("storage of an unknown dialect", ["--storage", "foo://user@host/db"], "unknown database kind"),
    ("absurd --n_trials", ["--general.n_trials", "1000000000"], "general.n_trials must be"),
    ("absurd reproductions", ["--general.reproductions", "1000000000"], "general.reproductions must be"),
    # files that are not what they claim
    ("CSV data set not UTF-8", ["--dataset.name", "csv", "--dataset.root", _csv_latin1], "not UTF-8"),
    ("CSV row that is not an image", ["--dataset.name", "csv", "--dataset.root", _csv_not_image], "not images"),
    ("CSV data set with too few classes for a batch", ["--dataset.name", "csv", "--dataset.root", _csv_few_classes],
     "batch"),
    ("YAML config not UTF-8", ["--config_general", "latin"], "UTF-8"),
    ("report.csv not UTF-8", ["--compare", _report_latin1], "UTF-8"),
]


@pytest.mark.parametrize("words,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_line_folder_unchanged(existing, words, phrase, capsys, monkeypatch):
    tmp, args, folder, before = existing
    words = [w(tmp) if callable(w) else w for w in words]
    if "broken" in words:
        monkeypatch.setenv("XML_PLUGIN_CONFIG_ROOT", _broken_yaml_root(tmp))
    if "latin" in words:
        monkeypatch.setenv("XML_PLUGIN_CONFIG_ROOT", _yaml_latin1_root(tmp))
    experiments = tmp / "experiments"
    everything, outside = _snapshot(experiments), sorted(p.name for p in tmp.iterdir())
    try:
        code = main(["--experiment_name", NAME, "--no_progress", *args, *words])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert phrase in errors[0], errors[0]
    assert _snapshot(folder) == before
    assert _snapshot(experiments) == everything, "a refused run wrote into the experiments folder"
    assert sorted(p.name for p in tmp.iterdir()) == outside, "a refused run wrote outside the experiments folder"
    assert not Path("/tmp/xml_absolute_name").exists()


def test_a_changed_config_is_refused_and_restart_keeps_a_backup(existing, capsys):
    tmp, args, folder, before = existing
    code = main(["--experiment_name", NAME, "--no_progress", *args, "--loss", "contrastive"])
    err = capsys.readouterr().err
    assert code == 2 and "another configuration" in err and "loss" in err and "--restart" in err
    assert _snapshot(folder) == before
    # a key that does not change results (threads) is not a different experiment
    assert main(["--experiment_name", NAME, "--no_progress", *args, "--general.num_threads", "1"]) == 0
    capsys.readouterr()


def test_a_bug_in_a_users_component_is_exit_1_with_traceback(tmp_path):
    """A TypeError inside a user's loss is a bug, not input: Python's traceback and exit code 1."""
    import subprocess
    import sys
    module = tmp_path / "buggy_loss.py"
    module.write_text(
        "import torch, xml_plugin\n"
        "class BuggyLoss(torch.nn.Module):\n"
        "    def forward(self, embeddings, labels, indices_tuple=None):\n"
        "        return embeddings.sum() + None\n"
        "xml_plugin.register('loss', BuggyLoss, name='buggy')\n")
    tiny = Path(__file__).resolve().parent / "tiny.py"
    args = as_cli_args(tiny_overrides(tmp_path, **{"general.n_trials": 1, "general.reproductions": 1}))
    code = ("import sys, runpy; sys.path[:0] = [%r, %r]; import buggy_loss; sys.argv = ['tiny.py'] + sys.argv[1:]; "
            "runpy.run_path(%r, run_name='__main__')" % (str(tmp_path), str(tiny.parent), str(tiny)))
    r = subprocess.run([sys.executable, "-c", code, "--experiment_name", "bug", "--no_progress", "--loss", "buggy",
                        "--methods", "baseline", *args], capture_output=True, text=True, timeout=300,
                       cwd=str(Path(__file__).resolve().parent.parent))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" in r.stderr and "TypeError" in r.stderr and "buggy_loss.py" in r.stderr


def test_a_method_that_changes_the_cache_from_pooled_to_full_is_a_different_experiment(tmp_path, capsys):
    """With the whole trunk frozen, baseline alone gets the pooled cache (cache.pooled auto); adding XML (prototype
    pooling) needs the full maps, so the baseline's stored runs would no longer be the same computation: refused."""
    args = as_cli_args(tiny_overrides(tmp_path, **{"general.n_trials": 1, "general.reproductions": 1,
                                                   "trainer.max_epochs": 1, "trunk.frozen_blocks": "auto",
                                                   "search.mode": "none"}))
    assert main(["--experiment_name", "pooled", "--no_progress", "--methods", "baseline", *args]) == 0
    folder = tmp_path / "experiments" / "pooled"
    info = json.loads((folder / "experiment.json").read_text())
    assert info["fingerprint"]["shared"]["resolved"]["cache_pooled"] is True
    capsys.readouterr()
    before = _snapshot(folder)
    code = main(["--experiment_name", "pooled", "--no_progress", "--methods", "baseline", "xml", *args])
    err = capsys.readouterr().err
    assert code == 2 and "cache_pooled" in err and "--restart" in err, err[-2000:]
    assert _snapshot(folder) == before
