"""Start-up of a gateway from the command line: in-process (``koala dev --gateway``)."""

from __future__ import annotations

import logging
import os

import anyio
from anyio.abc import TaskStatus

from .._runtime import Runtime
from ._config import KEY_ENV, GatewayConfig
from ._gateway import Gateway, LocalLink

log = logging.getLogger("koala.gateway")

DEV_KEY = "koala-dev-key"


def dev_config() -> GatewayConfig:
    """The key from KOALA_GATEWAY_KEY, else the documented development key (loopback)."""
    if os.environ.get(KEY_ENV):
        return GatewayConfig.from_env()
    log.warning(
        "%s is not set: clients sign with the development key %r; set it for anything "
        "but local development",
        KEY_ENV,
        DEV_KEY,
    )
    return GatewayConfig(private_key=DEV_KEY)


async def serve_dev_gateway(
    runtime: Runtime,
    host: str,
    port: int,
    shutdown: anyio.Event,
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an in-process gateway for ``runtime`` until ``shutdown`` is set."""
    gateway = Gateway(dev_config(), LocalLink(runtime))
    await gateway.serve(host, port, shutdown, task_status=task_status)
