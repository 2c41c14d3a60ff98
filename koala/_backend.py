"""The one place that knows about event-loop backends: KOALA_BACKEND -> anyio.run()."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from ._errors import ConfigError

T = TypeVar("T")

BACKENDS = ("asyncio", "uvloop", "trio")
ENV_VAR = "KOALA_BACKEND"


@dataclass(frozen=True, slots=True)
class Backend:
    """A validated backend choice: the anyio backend name and its options."""

    name: str

    @property
    def anyio_backend(self) -> str:
        return "trio" if self.name == "trio" else "asyncio"

    @property
    def options(self) -> dict[str, Any]:
        return {"use_uvloop": True} if self.name == "uvloop" else {}


def parse_backend(value: str | None) -> Backend:
    """Validate a backend name; None or "" means the default, asyncio."""
    name = (value or "asyncio").strip().lower()
    if name not in BACKENDS:
        raise ConfigError(
            f"{ENV_VAR}={value!r} is not a valid backend; use one of: {', '.join(BACKENDS)}"
        )
    if name == "uvloop":
        if sys.platform == "win32":
            raise ConfigError(f"{ENV_VAR}=uvloop is not available on Windows; use asyncio or trio")
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{ENV_VAR}=uvloop needs the uvloop package: pip install 'koala[uvloop]'"
            ) from None
    return Backend(name)


def backend_from_env() -> Backend:
    """The backend KOALA_BACKEND asks for (asyncio when unset)."""
    return parse_backend(os.environ.get(ENV_VAR))


def run(func: Callable[[], Awaitable[T]], backend: Backend | None = None) -> T:
    """Run `func` on the chosen backend (KOALA_BACKEND by default)."""
    chosen = backend or backend_from_env()
    return anyio.run(func, backend=chosen.anyio_backend, backend_options=chosen.options)
