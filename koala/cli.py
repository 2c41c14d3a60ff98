"""The `koala` command: `koala dev APP` runs host + HTTP in one process."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import replace
from functools import partial
from types import ModuleType
from typing import Any

import anyio

from . import _backend
from ._config import HostConfig
from ._errors import ConfigError, KoalaError
from ._flags import (
    EnvParser,
    _add_host_config_flags,
    _host_config,
    _log_level,
    _positive,
)
from ._logging import configure_logging
from ._net import is_loopback
from ._tls import TLSConfig
from .http import add_error_handlers, parse_hostport, serve_asgi

log = logging.getLogger("koala.cli")


MIN_PUBLIC_GATEWAY_KEY = 16  # characters of KOALA_GATEWAY_KEY for a gateway beyond loopback


def check_bind(
    host: str, what: str, *, gateway: bool = False, links: bool = False, mutual_tls: bool = False
) -> None:
    """Listeners bind loopback unless they hold the proof their callers need.

    Hosts' links and HTTP and the PD need the cluster secret; a host's links
    (``links=True``) may instead use mutual TLS (``mutual_tls``: a certificate, and the
    CA its peers' must come from), where the certificate is the proof. A gateway
    (``gateway=True``)
    authenticates its clients with its own key, so it needs KOALA_GATEWAY_KEY instead: a
    real one (not the development key, at least ``MIN_PUBLIC_GATEWAY_KEY`` characters),
    and never the cluster secret, which a public endpoint should not hold.
    """
    if is_loopback(host) or (links and mutual_tls):
        return
    if gateway:
        from .gateway._config import DEV_KEY, KEY_ENV

        key = os.environ.get(KEY_ENV, "")
        why = ""
        if not key:
            why = "is not set"
        elif key == DEV_KEY:
            why = "is the development key"
        elif len(key) < MIN_PUBLIC_GATEWAY_KEY:
            why = f"is shorter than {MIN_PUBLIC_GATEWAY_KEY} characters"
        if why:
            raise ConfigError(
                f"{what} on {host} is reachable beyond this machine, and {KEY_ENV} {why}: "
                f"set {KEY_ENV} (the key your clients sign their first packet with; at least "
                f"{MIN_PUBLIC_GATEWAY_KEY} random characters) to allow it, or listen on "
                "127.0.0.1"
            )
        return
    if not os.environ.get("KOALA_CLUSTER_SECRET"):
        raise ConfigError(
            f"{what} on {host} is reachable beyond this machine: set KOALA_CLUSTER_SECRET "
            "(the cluster's shared secret) to allow it"
            + (", or give --tls-cert, --tls-key and --tls-ca (mutual TLS)" if links else "")
            + ", or listen on 127.0.0.1"
        )


def check_dialable(host: str) -> None:
    """A host registers the address it listens on, and other hosts and gateways dial it:
    a wildcard (0.0.0.0, ::) would send them to themselves."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:  # a name: it resolves to this machine's address, which is fine
        return
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if ip.is_unspecified or (mapped is not None and mapped.is_unspecified):
        raise ConfigError(
            f"koala host --listen {host}: the address a host listens on is the one it "
            "registers, and other hosts and gateways dial it; listen on this machine's "
            "address or name instead (in Docker Compose: the service's name, e.g. "
            "--listen host1:7001)"
        )


async def _watch_signals(shutdown: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            print(f"koala: {signal.Signals(signum).name} received, stopping", flush=True)
            shutdown.set()
            return


async def run_dev(
    module: ModuleType,
    target: str,
    host: str,
    port: int,
    config: HostConfig,
    gateway: tuple[str, int] | None = None,
) -> None:
    """Run the runtime on an embedded in-memory PD, and the module's `app` (if any),
    until SIGINT/SIGTERM; then drain."""
    app: Any = getattr(module, "app", None)
    shutdown = anyio.Event()
    backend = _backend.backend_from_env().name
    from ._host import DevPage, embedded_host, host_readiness

    page = DevPage()  # the cluster page, on the app's HTTP port (/dashboard/)
    async with (
        embedded_host(config, driver=page.driver) as runtime,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_watch_signals, shutdown)
        if gateway is not None:
            ws = await tg.start(page.serve_gateway, runtime, *gateway, shutdown)
            print(f"koala dev: gateway on ws://{ws[0]}:{ws[1]}", flush=True)
        if app is not None:
            add_error_handlers(app)
            tg.start_soon(page.run, shutdown)
            serve = partial(serve_asgi, readiness=host_readiness(runtime))
            bound = await tg.start(serve, page.dashboard.wrap(app), host, port, shutdown)
            print(
                f"koala dev: {target} on {backend}; HTTP on http://{bound[0]}:{bound[1]} "
                f"(cluster page: http://{bound[0]}:{bound[1]}/dashboard/; Ctrl-C to stop)",
                flush=True,
            )
        else:
            print(f"koala dev: {target} on {backend}; no `app`, actors only", flush=True)
        await shutdown.wait()  # hypercorn sees it too, and returns once it has drained
    print("koala dev: stopped", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = EnvParser(
        prog="koala",
        description="Koala virtual actors. KOALA_BACKEND picks the event loop: "
        + ", ".join(_backend.BACKENDS)
        + ". Every flag has an environment twin (KOALA_ and the flag's name: --pd is "
        "KOALA_PD); a flag given beats its variable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run actors and the app's HTTP API in one process")
    dev.add_argument("app", help="a file (examples/echo.py) or module (examples.echo)")
    dev.add_argument("--http", default="127.0.0.1:8000", help="HOST:PORT for HTTP")
    _add_host_config_flags(dev)
    dev.add_argument(
        "--log-level", type=_log_level, default="INFO", help="logging level (default INFO)"
    )
    dev.add_argument("--gateway", help="HOST:PORT for the WebSocket gateway (docs/gateway.md)")
    _add_cluster_commands(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--log-format",
            choices=("text", "json"),
            default="text",
            help="text (default) or json: one object a line",
        )
    return parser


def _add_cluster_commands(sub: Any) -> None:
    pd = sub.add_parser("pd", help="run a placement driver (membership, placement, ids)")
    pd.add_argument("--etcd", help="etcd client URL(s), comma-separated (http://127.0.0.1:2379)")
    pd.add_argument("--store", default=None, help="'etcd' (default with --etcd) or 'memory'")
    pd.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT of the HTTP API")
    pd.add_argument("--prefix", default="/koala/", help="key prefix in etcd (default /koala/)")
    pd.add_argument(
        "--compact-interval",
        type=float,
        default=60.0,
        help="seconds between two compactions of etcd's history (default 60; 0: never)",
    )
    pd.add_argument(
        "--compact-history",
        type=float,
        default=300.0,
        help="seconds of etcd's history a compaction keeps (default 300)",
    )
    pd.add_argument(
        "--store-check-interval",
        type=float,
        default=10.0,
        help="seconds between two checks of etcd's alarms, e.g. NOSPACE (default 10)",
    )
    pd.add_argument(
        "--etcd-quota-bytes",
        type=int,
        default=0,
        help="etcd's --quota-backend-bytes, if known: after NOSPACE the alarm is disarmed "
        "once the database is below 90%% of it (default 0: unknown, disarm and let etcd "
        "check)",
    )
    pd.add_argument(
        "--log-level", type=_log_level, default="INFO", help="logging level (default INFO)"
    )
    host = sub.add_parser("host", help="join a cluster as a host of the app's actors")
    host.add_argument("app", help="a file (examples/echo.py) or module (examples.echo)")
    host.add_argument("--pd", required=True, help="URL of a placement driver")
    host.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for other hosts")
    host.add_argument("--http", help="HOST:PORT to serve the app's HTTP API on (if it has one)")
    host.add_argument(
        "--metrics",
        help="HOST:PORT for /metrics, /healthz and /readyz alone (they are on --http too)",
    )
    host.add_argument(
        "--ttl", type=int, default=15, help="membership lease TTL, seconds (default 15)"
    )
    host.add_argument(
        "--positions-per-lease",
        type=int,
        default=None,
        help="one more lease for the host's positions per this many (default 4096; 0: one "
        "lease); etcd deletes a dead host's positions lease by lease",
    )
    host.add_argument(
        "--rebalance-threshold",
        type=float,
        default=None,
        help="give activations up when above the cluster's mean by more than this fraction "
        "(default 0.2; 0 turns the rebalancer off)",
    )
    host.add_argument(
        "--rebalance-fraction",
        type=float,
        default=None,
        help="at most this fraction of the host's activations given up per renewal (default 0.01)",
    )
    _add_host_config_flags(host)
    host.add_argument(
        "--log-level", type=_log_level, default="INFO", help="logging level (default INFO)"
    )
    gw = sub.add_parser("gateway", help="run a WebSocket gateway in front of a cluster")
    gw.add_argument("--pd", required=True, help="URL of a placement driver")
    gw.add_argument("--listen", default="127.0.0.1:8001", help="HOST:PORT for WebSocket clients")
    gw.add_argument("--failover-timeout", type=_positive, help="seconds to re-bind a session")
    gw.add_argument(
        "--log-level", type=_log_level, default="INFO", help="logging level (default INFO)"
    )
    status = sub.add_parser("status", help="print the cluster's hosts as a table")
    status.add_argument("--pd", required=True, help="URL of a placement driver")
    status.add_argument(
        "--wait-hosts",
        type=int,
        default=0,
        metavar="N",
        help="first wait until the PD answers and lists at least N hosts (scripts that "
        "start a cluster: a host registers a moment after it starts)",
    )
    status.add_argument(
        "--wait-timeout",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="how long --wait-hosts waits before it fails (default 30)",
    )
    status.add_argument(
        "--log-level", type=_log_level, default="WARNING", help="logging level (default WARNING)"
    )
    for command in (pd, host, gw, status):
        _add_tls_flags(command)


def _add_tls_flags(command: argparse.ArgumentParser) -> None:
    """--tls-cert/--tls-key/--tls-ca, each with its environment twin (koala._tls)."""
    command.add_argument("--tls-cert", help="this process's certificate chain, PEM")
    command.add_argument("--tls-key", help="its private key, PEM")
    command.add_argument("--tls-ca", help="the CA certificates this process trusts, PEM")


def _tls(args: argparse.Namespace) -> TLSConfig:
    return TLSConfig.from_env(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)


async def _until_signal(serve: Any, *args: Any, **kwargs: Any) -> None:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, shutdown)
        await serve(*args, shutdown, **kwargs)
        tg.cancel_scope.cancel()


def _run_cluster_command(args: argparse.Namespace, backend: _backend.Backend) -> int:
    from . import _host
    from .pd import _status

    if args.command == "pd":
        from .pd.server import open_store

        host, port = parse_hostport(args.listen, "--listen")
        check_bind(host, "--listen")
        maintenance = _maintenance_config(args)
        store = open_store(args.store or ("etcd" if args.etcd else ""), args.etcd)

        tls = _tls(args)

        def started(bound: tuple[str, int]) -> None:
            kind = "memory" if args.store == "memory" else f"etcd {args.etcd}"
            print(f"koala pd: {tls.scheme}://{bound[0]}:{bound[1]} on {kind}", flush=True)

        async def pd_main(shutdown: anyio.Event) -> None:
            async with anyio.create_task_group() as tg:
                started(
                    await tg.start(
                        _serve_pd, store, host, port, shutdown, args.prefix, maintenance, tls
                    )
                )

        _backend.run(lambda: _until_signal(pd_main), backend)
        print("koala pd: stopped", flush=True)
        return 0
    if args.command == "host":
        from ._app import load_app
        from .pd import MemberConfig

        listen = parse_hostport(args.listen, "--listen")
        check_dialable(listen[0])
        tls = _tls(args)
        mutual = tls.enabled and tls.ca is not None
        check_bind(listen[0], "--listen", links=True, mutual_tls=mutual)
        http = parse_hostport(args.http, "--http") if args.http else None
        if http is not None:
            check_bind(http[0], "--http")
        metrics = parse_hostport(args.metrics, "--metrics") if args.metrics else None
        if metrics is not None:
            check_bind(metrics[0], "--metrics")
        config = _host_config(args)
        member = MemberConfig(ttl=args.ttl)
        if args.positions_per_lease is not None:
            member = replace(member, positions_per_lease=args.positions_per_lease)
        rebalance = member.rebalance
        if args.rebalance_threshold is not None:
            rebalance = replace(rebalance, threshold=args.rebalance_threshold)
        if args.rebalance_fraction is not None:
            rebalance = replace(rebalance, fraction=args.rebalance_fraction)
        member = replace(member, rebalance=rebalance)
        module = load_app(args.app)

        def announce(text: str) -> None:
            print(text, flush=True)

        _backend.run(
            lambda: _until_signal(
                _host.serve_host,
                module,
                args.pd,
                listen,
                http=http,
                metrics=metrics,
                config=config,
                member=member,
                tls=_tls(args),
                announce=announce,
            ),
            backend,
        )
        print("koala host: stopped", flush=True)
        return 0
    if args.command == "gateway":
        from .gateway import GatewayConfig
        from .gateway._serve import serve_cluster_gateway

        listen = parse_hostport(args.listen, "--listen")
        check_bind(listen[0], "--listen", gateway=True)
        timeout = {"failover_timeout": args.failover_timeout} if args.failover_timeout else {}
        gateway = GatewayConfig.from_env(**timeout)
        _backend.run(
            lambda: _until_signal(
                serve_cluster_gateway, args.pd, listen, config=gateway, tls=_tls(args)
            ),
            backend,
        )
        print("koala gateway: stopped", flush=True)
        return 0
    secret = os.environ.get("KOALA_CLUSTER_SECRET") or None
    if args.wait_hosts > 0:
        table = _backend.run(lambda: _wait_for_hosts(args, secret), backend)
    else:
        table = _backend.run(
            lambda: _status.fetch_status(args.pd, secret=secret, tls=_tls(args)), backend
        )
    print(table, flush=True)
    return 0


async def _wait_for_hosts(args: argparse.Namespace, secret: str | None) -> str:
    """``koala status --wait-hosts N``: the table once the PD lists N hosts."""
    from .pd import PDClient, PDRequestError, PDUnavailableError
    from .pd._status import status_table

    pd = PDClient(args.pd, secret=secret, tls=_tls(args))
    last = "the PD has not answered"
    try:
        with anyio.move_on_after(args.wait_timeout):
            while True:
                try:
                    view = await pd.fetch_all()
                except (PDUnavailableError, PDRequestError) as exc:
                    last = str(exc)  # not up yet: a cluster being started
                else:
                    if len(view.hosts) >= args.wait_hosts:
                        return status_table(view)
                    last = f"the PD lists {len(view.hosts)} host(s)"
                await anyio.sleep(0.2)
    finally:
        with anyio.CancelScope(shield=True):
            await pd.aclose()
    raise PDUnavailableError(
        f"waited {args.wait_timeout:g} s for {args.wait_hosts} host(s) (--wait-hosts): {last}"
    )


def _maintenance_config(args: argparse.Namespace) -> Any:
    from .pd.server import MaintenanceConfig

    try:
        return MaintenanceConfig(
            compact_interval=args.compact_interval,
            history=args.compact_history,
            check_interval=args.store_check_interval,
            quota_bytes=args.etcd_quota_bytes,
        )
    except KoalaError as exc:  # a bad flag: say which
        raise ConfigError(
            f"{exc} (flags --compact-interval, --compact-history, --store-check-interval, "
            "--etcd-quota-bytes)"
        ) from None


async def _serve_pd(
    store: Any,
    host: str,
    port: int,
    shutdown: anyio.Event,
    prefix: str,
    maintenance: Any,
    tls: TLSConfig,
    *,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    from .pd._auth import AuthConfig
    from .pd.server import serve_pd

    await serve_pd(
        store,
        host,
        port,
        shutdown,
        prefix=prefix,
        maintenance=maintenance,
        auth=AuthConfig.from_env(),
        tls=tls,
        task_status=task_status,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        backend = _backend.backend_from_env()
        configure_logging(args.log_format, args.log_level)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per PD request
        if args.command == "dev":
            host, port = parse_hostport(args.http, "--http")
            check_bind(host, "--http")
            config = _host_config(args)
            from ._app import load_app

            gateway = parse_hostport(args.gateway, "--gateway") if args.gateway else None
            if gateway is not None:
                check_bind(gateway[0], "--gateway", gateway=True)
            module = load_app(args.app)
            _backend.run(lambda: run_dev(module, args.app, host, port, config, gateway), backend)
        else:
            return _run_cluster_command(args, backend)
    except KoalaError as exc:  # bad configuration, or e.g. the PD cannot be reached
        return _fail(exc)
    except BaseExceptionGroup as group:
        # a task group's failure: a port in use, a PD that is not there, arrive wrapped
        # in one group per task group they crossed; an operator wants the one line
        found = first_koala_error(group)
        if found is None:
            raise
        return _fail(found)
    except KeyboardInterrupt:
        return 130
    return 0


def first_koala_error(group: BaseExceptionGroup[BaseException]) -> KoalaError | None:
    """The first of a group's leaves, however deeply nested, if every leaf is a
    KoalaError (a port in use, a PD that cannot be reached); None if any is not: that
    is a bug, and its traceback is worth more than one line."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if leaves and all(isinstance(leaf, KoalaError) for leaf in leaves):
        first = leaves[0]
        assert isinstance(first, KoalaError)
        return first
    return None


def _fail(exc: KoalaError) -> int:
    """One line on stderr; 2 for bad configuration (a port in use included), else 1."""
    print(f"koala: error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
