"""A readable experiment log: one line per finished search trial and reproduction, on stderr and in
``<experiment>/log.txt``; and one progress bar with the ETA of the whole experiment."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

from tqdm.auto import tqdm

LOG_FILE = "log.txt"


def format_params(params: Dict[str, Any]) -> str:
    """``alpha=2.13 lam=0.3``: the last part of each dotted key, floats with 4 significant digits."""
    if not params:
        return "(defaults)"
    return " ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in sorted(params.items()))


class ExperimentLog:
    """Appends ``time method kind number/total | params | metric | seconds`` lines to ``log.txt`` and ``stream``."""

    def __init__(self, folder: Path, stream: Optional[TextIO] = None):
        self.path = Path(folder) / LOG_FILE
        self.stream = sys.stderr if stream is None else stream

    def line(self, text: str) -> str:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(stamped + "\n")
        tqdm.write(stamped, file=self.stream)  # above any progress bar
        return stamped

    def trial(self, method: str, number: int, total: int, params: Dict[str, Any], value: Optional[float],
              seconds: float, state: str = "complete") -> str:
        """A finished search trial (``number`` counted from 0): its parameters and fold-mean validation MAP@R."""
        shown = "–" if value is None else f"{value:.4f}"
        return self.line(f"{method} trial {number + 1}/{total} {state} | {format_params(params)} | "
                         f"validation MAP@R (fold mean) {shown} | {seconds:.1f} s")

    def reproduction(self, method: str, number: int, total: int, seed: int, separate: float, concatenated: float,
                     seconds: float) -> str:
        """A finished reproduction: its seed and test MAP@R (the folds' mean, and the concatenated embedding)."""
        return self.line(f"{method} reproduction {number + 1}/{total} seed {seed} | test MAP@R separate "
                         f"{separate:.4f} concatenated {concatenated:.4f} | {seconds:.1f} s")


def experiment_bar(total: int, done: int = 0, enabled: bool = True) -> tqdm:
    """One bar over every fold training of the experiment (methods x (trials + reproductions) x folds), whose ETA is
    the whole experiment's; ``done`` trainings are already finished (a resumed experiment)."""
    return tqdm(total=total, initial=min(done, total), desc="experiment", unit="fold", position=0, leave=True,
                disable=not enabled, dynamic_ncols=True)


__all__ = ["ExperimentLog", "experiment_bar", "format_params", "LOG_FILE"]
