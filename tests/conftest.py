"""Every async test runs on asyncio, asyncio+uvloop and trio."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest

BACKENDS: list[Any] = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform != "win32":
    BACKENDS.insert(1, pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


# pytest-timeout (method "thread") ends the whole run when a test hangs, printing every
# thread's stack but not the test's name: name it first, a second before.
_watchdogs: dict[str, threading.Timer] = {}


def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    if settings.timeout and settings.timeout > 1:
        note = f"\n{item.nodeid} has run for {settings.timeout - 1:g} s"
        timer = threading.Timer(settings.timeout - 1, lambda: print(note, file=sys.stderr))
        timer.daemon = True
        timer.start()
        _watchdogs[item.nodeid] = timer


def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    timer = _watchdogs.pop(item.nodeid, None)
    if timer is not None:
        timer.cancel()
