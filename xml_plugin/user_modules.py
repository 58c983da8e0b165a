"""``--import MODULE``: import a user's module (a name importable from the working folder, or a ``.py`` file) so that
its ``xml_plugin.register(...)`` calls run before the config is resolved."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Sequence

from .config import ConfigError


def import_module(spec: str) -> ModuleType:
    """Import ``spec``: a path to a ``.py`` file, or a dotted module name looked up from the working folder first."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--import {spec}: no such file {path}; give a .py file or a module name importable "
                              f"from the working folder")
        name = f"xml_plugin_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))  # the file's own sibling imports
        try:
            module_spec.loader.exec_module(module)  # an error inside the user's module is theirs to see: it raises
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # the console script's sys.path does not hold the working folder
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.split(".")[0] == exc.name.split(".")[0]:  # the module itself, not one it imports
            raise ConfigError(f"--import {spec}: no module {exc.name!r} found from {cwd} or on sys.path; give its "
                              f"file (--import path/to/{spec.split('.')[-1]}.py) or run from its folder") from None
        raise


def import_modules(specs: Sequence[str]) -> List[ModuleType]:
    """Import every ``--import`` in order."""
    return [import_module(s) for s in specs or ()]


__all__ = ["import_module", "import_modules"]
