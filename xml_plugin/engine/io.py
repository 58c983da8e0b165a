"""Atomic file writes: a killed process never leaves a half-written checkpoint, result or report."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError


class DamagedFileError(ConfigError):
    """A file read back from an experiment folder or a cache that does not load: truncated, overwritten, not what
    this benchmark writes, or a pickle that would run code. Input (exit 2, the file named) unless the caller can
    recompute what it held (then the file is moved aside, see :func:`move_aside`)."""

    def __init__(self, path: Path, reason: str, fix: str = ""):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged or not a file this benchmark wrote ({reason})"
                         + (f"; {fix}" if fix else ""))


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """Save tensors, plain containers and numbers only: what :func:`safe_torch_load` reads back."""
    import torch
    _atomic(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: Path, map_location: Any = None, fix: str = "") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, plain containers and numbers only, so that a planted pickle
    cannot run code. Anything that does not load that way (a pickle of other objects, a truncated or overwritten file)
    raises :class:`DamagedFileError` naming the file."""
    import torch
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler or the zip reader says, the file is not usable
        reason = " ".join(str(exc).split())
        if "Weights only load failed" in reason or "weights_only" in reason:
            reason = "it holds objects other than tensors and plain data; loading it could run code, so it is refused"
        raise DamagedFileError(path, f"{type(exc).__name__}: {reason[:200]}", fix) from None


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_checked(path: Path, fix: str = "") -> Any:
    """:func:`read_json`, a file that is not valid UTF-8 JSON raising :class:`DamagedFileError` naming it."""
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DamagedFileError(path, f"not valid JSON: {' '.join(str(exc).split())[:200]}", fix) from None


def move_aside(path: Path, why: str = "") -> Optional[Path]:
    """Rename a damaged file to ``<name>.damaged-<time>-<pid>`` (kept for inspection, never read again) and say so on
    stderr. Returns the new path (None when the file is gone already)."""
    path = Path(path)
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    print(f"warning: {path} could not be read{f' ({why})' if why else ''}; kept as {target.name}, and what it held "
          f"is computed again", file=sys.stderr)
    return target


def file_checksum(path: Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's content, read in chunks of 4 MiB (about 1.2 GB/s here: SHA-256 has CPU instructions,
    BLAKE2b ran at 0.55 GB/s on the same data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    import numpy as np
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hash of a JSON-able object that is the same on every machine and run."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
