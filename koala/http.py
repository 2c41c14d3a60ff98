"""Serve an ASGI app (FastAPI) through hypercorn inside the runtime's event loop.

This is the one place that branches on the backend (hypercorn has a serve per loop).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config

from ._errors import ConfigError


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); a clear error for anything else."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must look like HOST:PORT (e.g. 127.0.0.1:8000), got {value!r}")
    return host.strip("[]"), int(port)


def _bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    shutdown: anyio.Event,
    *,
    graceful_timeout: float = 3.0,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on host:port until ``shutdown`` is set; report the bound address.

    The socket is bound here (so port 0 works on every backend and errors are ours) and
    handed to hypercorn by file descriptor.
    """
    sock = _bind_socket(host, port)
    bound = sock.getsockname()[:2]
    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn owns (and closes) the dup
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.errorlog = None
    try:
        task_status.started((bound[0], bound[1]))
        if sniffio.current_async_library() == "trio":
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, config, shutdown_trigger=shutdown.wait)
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            await asyncio_serve(app, config, shutdown_trigger=shutdown.wait)
    finally:
        sock.close()
