"""Experiment names are names, not paths: one path component of safe characters, so that an experiment's folder
always lands inside the experiments folder and its studies in a shared storage are its own."""
from __future__ import annotations

import re
from typing import Iterable, List

from ..config import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # room for a ".backup-<time>" suffix
STUDY_PARTS = ("search", "reproductions")


def check_name(name: object, flag: str = "--experiment_name") -> str:
    """``name`` if it is a valid experiment name, else ConfigError: letters, digits and ``. _ + -``, starting with a
    letter or digit, at most 100 characters (so never ``.``/``..``, a separator, a control character or a path)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{flag} {name!r} is not a valid name: use 1-100 letters, digits and . _ + -, starting with a "
                          f"letter or digit (no path separators, no spaces or control characters); the folder is "
                          f"always made inside the experiments folder (--experiment_folder sets where that is)")
    return name


def check_names(names: Iterable[object], flag: str) -> List[str]:
    return [check_name(n, flag) for n in names]


def study_name(experiment: str, method: str, part: str, search: int = 0) -> str:
    """The Optuna study of one method's search or reproductions: ``<experiment>.<method>.<part>`` for search 0 (the
    name every experiment had before several searches existed), ``<experiment>.<method>.<part>-s<search>`` for search
    ``search`` >= 1. ``method`` may be an attribution label (:func:`attribution_label`)."""
    return f"{experiment}.{method}.{part}" + (f"-s{int(search)}" if search else "")


def attribution_label(reference: str, method: str) -> str:
    """``<reference>@<method>``: the reference reproduced at ``method``'s best values of the keys they share; names its
    studies (``<experiment>.<reference>@<method>.reproductions``), run folders (``runs/<reference>@<method>/``) and rows
    in reproductions.csv."""
    return f"{reference}@{method}"


PART_RE = re.compile(rf"(?:{'|'.join(STUDY_PARTS)})(?:-s[1-9][0-9]*)?")


def owns_study(experiment: str, study: str) -> bool:
    """Whether ``study`` is one of ``experiment``'s studies: exactly ``<experiment>.<method>.<part>`` with a method
    name (or attribution label) without dots and a part of STUDY_PARTS, optionally ``-s<search>``, so that experiment
    ``x`` never claims experiment ``x.y``'s ``x.y.baseline.search``."""
    if not study.startswith(f"{experiment}."):
        return False
    rest = study[len(experiment) + 1:].split(".")
    return len(rest) == 2 and bool(rest[0]) and PART_RE.fullmatch(rest[1]) is not None
