"""``koala status``: the PD's membership as a table of hosts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ._http import PDClient
from ._records import Membership

if TYPE_CHECKING:
    from .._tls import TLSConfig


def _age(now_ms: int, then_ms: int) -> str:
    if not then_ms:
        return "-"
    seconds = max(0.0, (now_ms - then_ms) / 1000)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def status_table(view: Membership) -> str:
    """The cluster as a text table: one host per line."""
    now = view.now or int(time.time() * 1000)
    header = ("SERVER", "ADDRESS", "LOAD", "ACTIVATIONS", "LEASE AGE", "RENEWED", "TTL", "SERVES")
    rows = [header]
    for server_id in sorted(view.hosts):
        h = view.hosts[server_id]
        rows.append(
            (
                str(server_id),
                h.address,
                str(h.load),
                str(h.activations),
                _age(now, h.start_time),
                f"{_age(now, h.renew_time)} ago",
                f"{h.ttl}s",
                ",".join(sorted(h.services)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(f"{len(view.hosts)} host(s)")
    return "\n".join(lines)


async def fetch_status(
    pd_url: str, *, secret: bytes | str | None = None, tls: TLSConfig | None = None
) -> str:
    """``koala status``: the PD's membership as a table; ``secret`` signs the request
    (the cluster secret, when the PD has one); ``tls``: the CA to check the PD against
    (and this client's certificate, for a PD that asks for one)."""
    pd = PDClient(pd_url, secret=secret, tls=tls)
    try:
        return status_table(await pd.fetch_all())
    finally:
        await pd.aclose()
