"""Skip a test of an optimisation when the loop hook it needs is off (see koala._loop).

Such a test checks a fast path, not behaviour: without its hook (``KOALA_NO_LOOP_HOOKS``
set, or a dependency release that moved an internal) the slow path runs instead and
the test has nothing to check. ``tests/test_loop.py`` is the one that fails, by name,
when a hook is missing on the installed versions.
"""

from __future__ import annotations

import pytest

from koala import _loop


def require_hooks(*names: str) -> None:
    """Skip the calling test unless each hook named works on the running backend."""
    backend = _loop.running_backend()
    record = _loop.hooks(backend)
    off = [
        name
        for name in names
        if backend in _loop.BY_NAME[name].backends
        and _loop.BY_NAME[name].applies()
        and not record.get(name, False)
    ]
    if off:
        why = f"forced off by {_loop.ENV_VAR}" if _loop.forced_off() else "missing here"
        pytest.skip(f"checks the fast path of loop hook {', '.join(off)}, which is {why}")


def require_scope_marker() -> None:
    """Skip unless the running backend's innermost cancel scope can be known."""
    trio = _loop.running_backend() == "trio"
    require_hooks("trio_scope_marker" if trio else "asyncio_scope_marker")
