"""What the machine is doing: how many cores other processes keep busy, and the warning that a multi-thread CPU job
next to others should run one thread."""
from __future__ import annotations

import os
import time
from typing import Optional


def busy_cores(seconds: float = 0.1) -> Optional[float]:
    """How many cores other processes keep busy right now: /proc/stat sampled over ``seconds`` while this process sleeps
    (the load average would count this process's own past work and jobs that just ended); None where it cannot tell."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    span = total1 - total0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / span) if span > 0 else None


def oversubscription_advice(threads: int, busy: Optional[float], cores: int) -> Optional[str]:
    """A warning when other work already keeps every core busy and this job would add several threads: a multi-thread
    CPU job next to others slows down far more than its share (docs/benchmarks.md, docs/trunks.md)."""
    if threads <= 1 or busy is None or busy < cores - 0.5:
        return None
    return (f"warning: other processes keep {busy:.1f} of the {cores} cores busy and this job would run {threads} "
            f"threads; with other jobs running, --general.num_threads 1 each is much faster")
