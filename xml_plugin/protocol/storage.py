"""The Optuna storage of an experiment: opened with its failures as input errors (host, port, driver, a damaged
database), and Optuna's log quieted on Ctrl-C."""
from __future__ import annotations

import logging

import optuna

from .. import config as C
from . import slots


def open_storage(url: str, heartbeat_seconds: int):
    """The Optuna storage at ``url``; a URL that cannot be opened is input (ConfigError naming host, port and fix)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise C.ConfigError(f"--storage {url!r} is not a database URL ({exc}); use e.g. "
                            f"sqlite:///path/optuna.db or postgresql://user:password@host:5432/dbname") from None
    try:
        return slots.make_storage(url, heartbeat_seconds)
    except OperationalError as exc:
        where = parsed.database if parsed.get_backend_name() == "sqlite" else \
            f"host {parsed.host or 'localhost'}, port {parsed.port or 'default'}, database {parsed.database}"
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise C.ConfigError(f"cannot open the Optuna storage {parsed.render_as_string(hide_password=True)} ({where}): "
                            f"{reason}. Is the server running and reachable, and do the user and database exist?") from None
    except (ModuleNotFoundError, ImportError) as exc:
        raise C.ConfigError(f"--storage {parsed.render_as_string(hide_password=True)} needs a database driver that is "
                            f"not installed ({exc}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except ArgumentError as exc:  # NoSuchModuleError: a dialect SQLAlchemy does not know
        raise C.ConfigError(f"--storage {parsed.render_as_string(hide_password=True)}: unknown database kind "
                            f"{parsed.drivername!r} ({' '.join(str(exc).split())[:120]}); use sqlite:///path/optuna.db "
                            f"or postgresql://user:password@host:5432/dbname") from None
    except (DatabaseError, optuna.exceptions.StorageInternalError) as exc:  # opens, but is not a readable database
        raise damaged_storage(url, exc) from None


class _NoInterruptTraceback(logging.Filter):
    """Drops Optuna's "Trial N failed ... KeyboardInterrupt" warning (with its traceback) and the line after it: Ctrl-C
    is not a failure, and the command line prints one "interrupted" line instead."""

    def __init__(self):
        super().__init__()
        self.drop_next = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        if (exc is not None and issubclass(exc, KeyboardInterrupt)) or "KeyboardInterrupt" in str(record.msg):
            self.drop_next = True
            return False
        if self.drop_next and "failed with value" in str(record.msg):
            self.drop_next = False
            return False
        return True


def quiet_interrupts() -> None:
    """Install :class:`_NoInterruptTraceback` on Optuna's log handlers (once)."""
    logger = optuna.logging._get_library_root_logger() if hasattr(optuna.logging, "_get_library_root_logger") \
        else logging.getLogger("optuna")
    for handler in logger.handlers or [logger]:
        if not any(isinstance(f, _NoInterruptTraceback) for f in handler.filters):
            handler.addFilter(_NoInterruptTraceback())


def db_errors():
    from sqlalchemy.exc import DatabaseError
    return DatabaseError


def damaged_storage(url: str, exc: BaseException) -> C.ConfigError:
    """The input error for an Optuna storage that opens but cannot be read (a damaged or foreign ``optuna.db``)."""
    from sqlalchemy.engine import make_url
    parsed = make_url(url)
    where = parsed.database if parsed.get_backend_name() == "sqlite" else parsed.render_as_string(hide_password=True)
    reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:160]
    return C.ConfigError(f"the Optuna storage {where} cannot be read ({reason}): if it is damaged, move it away and "
                         f"rerun (finished folds are read back from runs/, so nothing is trained twice), or --restart "
                         f"to start the experiment over")
