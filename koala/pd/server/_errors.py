"""What the PD refuses, and how: :class:`PDError` (an HTTP status and a short code)."""

from __future__ import annotations

import time

from ..._errors import KoalaError


class PDError(KoalaError):
    """A request the PD cannot serve; ``status`` is the HTTP status, ``code`` a short name."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def now_ms() -> int:
    return int(time.time() * 1000)


STORE_FULL_FIX = (
    "etcd is out of space (its NOSPACE alarm is raised: the database reached "
    "--quota-backend-bytes), so it refuses writes: no new actor can be placed and no host "
    "can register, while actors already placed keep answering and leases keep renewing. "
    "The PD compacts, defragments and disarms the alarm by itself once there is room; if "
    "live data fills the quota, delete keys or raise etcd's --quota-backend-bytes"
)


def store_full_error() -> PDError:
    return PDError(507, "store_full", STORE_FULL_FIX)
