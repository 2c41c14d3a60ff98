"""koala.wire is pure: importing it loads no event loop (h11's rule for a sans-IO core).

The root facade (``koala/__init__.py``) loads its names on first use, so importing the
wire package through it, in a fresh interpreter, loads the protocol's modules and the
leaves they name and nothing else: no anyio, sniffio, trio or asyncio, no runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys

LOOPS = ("anyio", "sniffio", "trio", "asyncio", "uvloop")

_PROBE = """
import json, sys
import koala.wire
from koala.wire import Connection, Role
conn = Connection(Role.CLIENT, cluster_id="c", node_id="n")
assert conn.initiate()
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by_wire() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
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
    koala_modules = {m for m in modules if m.split(".")[0] == "koala"}
    # the protocol's own modules and the leaves it names, nothing of the transport
    assert koala_modules <= {
        "koala",
        "koala.wire",
        "koala.wire._events",
        "koala.wire._wire",
        "koala.wire._protocol",
        "koala._messages",
        "koala._errors",
    }, koala_modules


def test_the_root_facade_loads_its_names_on_first_use() -> None:
    code = (
        "import json, sys, koala; before = sorted(sys.modules); "
        "rt = koala.Runtime; print(json.dumps([before, sorted(sys.modules)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    before, after = json.loads(out.stdout)
    assert [m for m in before if m.split(".")[0] in ("koala", *LOOPS)] == ["koala"]
    assert "koala.host._runtime" in after
    assert "anyio" in after
