"""The deployment kit cannot drift from the CLI: compose.yaml's koala command lines parse
with `koala`'s own parser (in each service's environment), its health checks and
published ports are the ports those commands listen on, the Dockerfile builds what
compose runs, and docs/deploying.md names every environment variable.

Docker itself is not run here (no engine on the machine that wrote this)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from koala._flags import env_name
from koala.cli import build_parser, check_bind, check_dialable
from koala.http import parse_hostport

ROOT = Path(__file__).resolve().parent.parent
KOALA_IMAGE = "koala:local"
# what `export KOALA_CLUSTER_SECRET=$(openssl rand -hex 32)` and the gateway key give
SHELL = {"KOALA_CLUSTER_SECRET": "ab" * 32, "KOALA_GATEWAY_KEY": "cd" * 16}


def _interpolate(value: str, shell: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error} (an unset NAME with :? is
    an error: the file says so instead of starting with an empty secret)."""

    def one(found: re.Match[str]) -> str:
        name, op, arg = found.group(1), found.group(2), found.group(3)
        if shell.get(name):
            return shell[name]
        if op == ":?":
            raise LookupError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def compose(shell: dict[str, str] = SHELL) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for service in data["services"].values():
        env = service.get("environment") or {}
        service["environment"] = {k: _interpolate(str(v), shell) for k, v in env.items()}
    return data


def koala_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image") == KOALA_IMAGE
    }


def _parse(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The service's command as `koala` in the container parses it (the entrypoint is
    `koala`; only the service's variables are set)."""
    for name in list(os.environ):
        if name.startswith("KOALA_"):
            monkeypatch.delenv(name)
    for name, value in service["environment"].items():
        monkeypatch.setenv(name, value)
    command = service["command"]
    assert isinstance(command, list), "commands are lists: no shell inside the image"
    return build_parser().parse_args(command)


def test_compose_has_the_cluster() -> None:
    services = compose()["services"]
    assert set(services) == {"etcd", "pd", "host1", "host2", "gateway", "status"}
    assert {s["command"][0] for s in koala_services().values()} == {
        "pd",
        "host",
        "gateway",
        "status",
    }


def test_compose_refuses_to_start_without_the_secrets() -> None:
    for missing in SHELL:
        with pytest.raises(LookupError, match=missing):
            compose({k: v for k, v in SHELL.items() if k != missing})


@pytest.mark.parametrize("name", ["pd", "host1", "host2", "gateway", "status"])
def test_every_koala_command_is_one_the_cli_accepts(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = koala_services()[name]
    args = _parse(service, monkeypatch)
    # and the checks `koala` makes before it starts serving pass too
    if args.command in ("pd", "host", "gateway"):
        host, _ = parse_hostport(args.listen, "--listen")
        check_bind(host, "--listen", gateway=args.command == "gateway")
    if args.command == "host":
        check_dialable(parse_hostport(args.listen)[0])
        assert (ROOT / args.app).is_file(), "the app must be in the image (COPY examples)"
        assert args.pd == "http://pd:9000"
        check_bind(parse_hostport(args.http)[0], "--http")
    if args.command in ("host", "gateway", "status"):
        assert args.pd.startswith("http://pd:")


def _listening_ports(args: argparse.Namespace) -> set[int]:
    ports = {parse_hostport(args.listen)[1]}
    if getattr(args, "http", None):
        ports.add(parse_hostport(args.http)[1])
    return ports


@pytest.mark.parametrize("name", ["pd", "host1", "host2", "gateway"])
def test_health_checks_and_published_ports_are_the_ports_koala_listens_on(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = koala_services()[name]
    ports = _listening_ports(_parse(service, monkeypatch))
    probe = " ".join(service["healthcheck"]["test"])
    found = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", probe)
    assert found, probe
    assert int(found.group(1)) in ports, (probe, ports)
    assert found.group(2) in ("/healthz", "/readyz")
    for published in service.get("ports", []):
        host_ip, _, container = published.split(":")
        assert host_ip == "127.0.0.1"  # nothing published beyond this machine by default
        assert int(container) in ports


def test_the_pd_reaches_the_etcd_compose_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    etcd = compose()["services"]["etcd"]
    advertised = next(a for a in etcd["command"] if a.startswith("--advertise-client-urls="))
    args = _parse(koala_services()["pd"], monkeypatch)
    assert args.etcd == advertised.split("=", 1)[1]
    quota = next(a for a in etcd["command"] if a.startswith("--quota-backend-bytes="))
    assert args.etcd_quota_bytes == int(quota.split("=", 1)[1])


def test_hosts_stop_within_their_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("host1", "host2"):
        service = koala_services()[name]
        args = _parse(service, monkeypatch)
        grace = args.shutdown_grace or 10.0
        period = service["stop_grace_period"]
        assert period.endswith("s")
        # the drain, then leaving the PD (bounded by 5 s in koala._host), with room
        assert float(period[:-1]) >= grace + 5 + 5


def test_the_dockerfile_builds_what_compose_runs() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    instructions = [line for line in lines if not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert 'ENTRYPOINT ["koala"]' in instructions
    assert any(line.startswith("COPY koala ") for line in instructions)
    assert any(line.startswith("COPY examples ") for line in instructions)
    assert any(re.match(r"RUN pip install '\.\[uvloop\]'", line) for line in instructions)
    assert any(line.startswith("USER ") and "root" not in line for line in instructions)
    for service in koala_services().values():  # uvloop is what the image installs
        assert service["environment"].get("KOALA_BACKEND", "uvloop") == "uvloop"
    assert all(s.get("build") == "." for s in koala_services().values())


def _all_cli_variables() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        env_name(action)
        for command in sub.choices.values()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction)
    }


def test_deploying_md_names_every_variable() -> None:
    doc = (ROOT / "docs" / "deploying.md").read_text()
    others = {
        "KOALA_BACKEND",
        "KOALA_CLUSTER_SECRET",
        "KOALA_CLUSTER_ID",
        "KOALA_GATEWAY_KEY",
        "KOALA_STORAGE_URL",
        "KOALA_NO_LOOP_HOOKS",
    }
    used = {name for s in compose()["services"].values() for name in s["environment"]}
    missing = sorted(n for n in _all_cli_variables() | others | used if f"`{n}`" not in doc)
    assert not missing, f"docs/deploying.md does not name {missing}"
