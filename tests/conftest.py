"""Shared test fixtures: a tiny synthetic data set and a tiny trunk, registered the way a user registers their own."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402  (registers tiny_shapes and tiny_cnn)

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_overrides(tmp_path, **extra):
    """Overrides that make a whole experiment run in seconds on the tiny data."""
    base = {
        "general.experiment_folder": str(tmp_path / "experiments"),
        "general.n_trials": 2, "general.reproductions": 2, "general.device": "cpu", "general.heartbeat_seconds": 2,
        "dataset.name": "tiny_shapes", "dataset.options": {},
        "trunk": {"name": "tiny_cnn", "pretrained": False, "frozen_blocks": 1},
        "embedder.size": 16, "transforms.image_size": 32, "transforms.train": {"scale": [0.6, 1.0], "flip": True},
        "trainer.batch_size": 16, "trainer.iterations_per_epoch": 6, "trainer.max_epochs": 2, "trainer.patience": None,
        "trainer.logs": False, "cache.views": 2, "cache.folder": str(tmp_path / "cache"),
        "search.n_startup_trials": 1,
    }
    base.update(extra)
    return list(base.items())


@pytest.fixture
def tiny_cfg(tmp_path):
    from xml_plugin import config as C

    def make(**extra):
        overrides = tiny_overrides(tmp_path, **extra)
        return C.load({}, overrides, presets=C.presets_for({}, overrides))  # the data set's and the loss's presets, as the CLI
    return make


def as_cli_args(overrides):
    """Overrides -> command-line words (``--key yaml-value``)."""
    out = []
    for key, value in overrides:
        if isinstance(value, dict) and value:  # --trunk is a shorthand for trunk.name: spell dicts out key by key
            out += as_cli_args([(f"{key}.{k}", v) for k, v in value.items()])
        else:
            out += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()]
    return out


def run_main(capsys, argv):
    """``xml_plugin.cli.main(argv)`` -> (exit code, stdout, stderr); argparse's own exits count as exit codes."""
    from xml_plugin.cli import main
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
