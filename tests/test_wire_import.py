"""koala.wire is pure: importing it loads no event loop (h11's rule for a sans-IO core).

The root facade (``koala/__init__.py``) loads the host runtime, which runs on anyio, and
Python runs it before any sub-package; so the check below imports ``koala.wire`` under
an empty ``koala`` package of the same directory: what it pins is that the wire package
and everything it imports stay free of anyio, sniffio, trio and asyncio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import koala

LOOPS = ("anyio", "sniffio", "trio", "asyncio", "uvloop")

_PROBE = """
import json, sys, types
root = types.ModuleType("koala")
root.__path__ = [sys.argv[1]]
sys.modules["koala"] = root
import koala.wire
from koala.wire import Connection, Role
conn = Connection(Role.CLIENT, cluster_id="c", node_id="n")
assert conn.initiate()
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by_wire() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(Path(koala.__file__).parent)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return list(json.loads(out.stdout))


def test_importing_the_wire_package_loads_no_event_loop() -> None:
    modules = _loaded_by_wire()
    assert "koala.wire._protocol" in modules  # the probe did import it
    loops = [m for m in modules if m.split(".")[0] in LOOPS]
    assert loops == [], f"koala.wire pulled in {loops}"
    koala_modules = {m for m in modules if m.startswith("koala.")}
    # the protocol's own modules and the leaves it names, nothing of the transport
    assert koala_modules <= {
        "koala.wire",
        "koala.wire._events",
        "koala.wire._wire",
        "koala.wire._protocol",
        "koala._messages",
        "koala._errors",
    }, koala_modules
