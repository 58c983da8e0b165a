"""The install lines end with exactly one faiss: the package's requirements (setup.cfg, read with setuptools' own
parser) name no faiss distribution outside the extras, and each of [cpu] and [gpu] names exactly one; the two wheels
ship the same faiss/ package, so installing both would let one overwrite the other's files."""
from __future__ import annotations

import re
from pathlib import Path

from setuptools.config.setupcfg import read_configuration

REPO = Path(__file__).resolve().parent.parent
FAISS_DISTS = re.compile(r"^faiss(-cpu|-gpu|-cuda)[\w.-]*$")


def _names(requirements):
    return [re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower() for r in requirements if r.strip()]


def test_one_faiss_per_install_line():
    cfg = read_configuration(str(REPO / "setup.cfg"))["options"]
    base = _names(cfg["install_requires"])
    extras = {k: _names(v) for k, v in cfg["extras_require"].items()}
    assert not [n for n in base if FAISS_DISTS.match(n)], base
    for line in (["cpu", "test"], ["gpu", "test"], ["cpu"], ["gpu"], ["cpu", "test", "weights"]):
        names = base + [n for e in line for n in extras[e]]
        faiss = [n for n in names if FAISS_DISTS.match(n)]
        assert len(faiss) == 1, (line, faiss)
    assert _names(cfg["extras_require"]["gpu"]) == ["faiss-gpu-cu13-cuvs"]  # CUDA 13, as torch 2.14.1's wheels


def test_ci_installs_the_cpu_line():
    setup = (REPO / ".ci" / "setup").read_text()
    assert '-e ".[cpu,test]"' in setup
