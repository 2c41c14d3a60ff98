"""Load a user's application: a file path (examples/echo.py) or a module (examples.echo)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

from ._errors import ConfigError


def load_app(target: str) -> ModuleType:
    """Import the file or module that defines the actors (and optionally `app`)."""
    if target.endswith(".py") or os.sep in target or os.path.isfile(target):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ConfigError(f"app file {target!r} does not exist")
        directory, filename = os.path.split(path)
        name = os.path.splitext(filename)[0]
        if directory not in sys.path:
            sys.path.insert(0, directory)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {target!r} as Python source")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            raise ConfigError(
                f"cannot import app module {target!r}: pass a file path (examples/echo.py) "
                "or a module importable from the current directory"
            ) from None
        raise
