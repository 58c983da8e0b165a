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


def study_name(experiment: str, method: str, part: str) -> str:
    """The Optuna study of one method's search or reproductions: ``<experiment>.<method>.<part>``."""
    return f"{experiment}.{method}.{part}"


def owns_study(experiment: str, study: str) -> bool:
    """Whether ``study`` is one of ``experiment``'s studies: exactly ``<experiment>.<method>.<part>`` with a method
    name without dots, so that experiment ``x`` never claims experiment ``x.y``'s ``x.y.baseline.search``."""
    if not study.startswith(f"{experiment}."):
        return False
    rest = study[len(experiment) + 1:].split(".")
    return len(rest) == 2 and bool(rest[0]) and rest[1] in STUDY_PARTS
