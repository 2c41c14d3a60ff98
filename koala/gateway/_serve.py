"""Start-up of a gateway from the command line: in-process (``koala dev --gateway``) or
as a cluster member (``koala gateway --pd URL --listen HOST:PORT``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial

import anyio
from anyio.abc import TaskStatus

from .._tls import TLSConfig
from ..host import Runtime
from ..transport import Transport, TransportConfig
from ._cluster import ClusterLink
from ._config import DEV_KEY, KEY_ENV, GatewayConfig
from ._gateway import Gateway, LocalLink

log = logging.getLogger("koala.gateway")

__all__ = ["DEV_KEY", "dev_config", "serve_cluster_gateway", "serve_dev_gateway"]


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
    tls: TLSConfig | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an in-process gateway for ``runtime`` until ``shutdown`` is set (wss when
    ``tls`` holds a certificate)."""
    gateway = Gateway(dev_config(), LocalLink(runtime))
    await gateway.serve(host, port, shutdown, tls=tls, task_status=task_status)


async def serve_cluster_gateway(
    pd_url: str,
    listen: tuple[str, int],
    shutdown: anyio.Event,
    *,
    config: GatewayConfig | None = None,
    transport_config: TransportConfig | None = None,
    tls: TLSConfig | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """``koala gateway``: a gateway that reaches the cluster's hosts through the PD at
    ``pd_url`` and the transport, until ``shutdown`` is set. ``tls`` (with a certificate)
    makes its clients connect with wss, and is what the gateway presents to the PD and
    to hosts (its links to them follow ``transport_config``, by default the
    environment's settings with this ``tls``)."""
    from ..pd import PDClient

    cfg = config or GatewayConfig.from_env()
    if transport_config is None:
        transport_config = TransportConfig.from_env(**({"tls": tls} if tls else {}))
    pd = PDClient(pd_url, secret=transport_config.secret, tls=tls or transport_config.tls)
    try:
        async with (
            Transport(transport_config) as transport,
            ClusterLink(pd, transport) as link,
            anyio.create_task_group() as tg,
        ):
            gateway = Gateway(cfg, link)
            bound = await tg.start(partial(gateway.serve, *listen, shutdown, tls=tls))
            scheme = "wss" if tls is not None and tls.enabled else "ws"
            (announce or _say)(
                f"koala gateway: {scheme}://{bound[0]}:{bound[1]}; PD {', '.join(pd.urls)}"
            )
    finally:
        with anyio.CancelScope(shield=True):
            await pd.aclose()


def _say(text: str) -> None:
    print(text, flush=True)
