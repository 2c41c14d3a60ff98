"""Every flag of `koala` has an environment twin (KOALA_ and the flag's name), and every
HostConfig field is a flag of `koala dev` and `koala host`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from koala import ConfigError, HostConfig
from koala._flags import HOST_FLAGS, EnvParser, _host_config, env_name
from koala.cli import build_parser, check_dialable, first_koala_error

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("dev", "pd", "host", "gateway", "status")


@pytest.fixture(autouse=True)
def _no_koala_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the variables they mean; none leaks in from the caller's shell."""
    for name in list(os.environ):
        if name.startswith("KOALA_") and name != "KOALA_BACKEND":
            monkeypatch.delenv(name)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _arguments(command: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in command._actions if not isinstance(a, argparse._HelpAction)]


def test_every_argument_of_every_command_names_its_variable_in_its_help() -> None:
    commands = _commands()
    assert set(commands) == set(COMMANDS)
    seen = 0
    for name, command in commands.items():
        assert isinstance(command, EnvParser), name
        text = command.format_help()
        for action in _arguments(command):
            seen += 1
            assert f"[env {env_name(action)}]" in " ".join(text.split()), (name, action.dest)
    assert seen > 40  # the walk above did look at the flags


@pytest.mark.parametrize(
    ("flag", "variable"),
    [
        ("--pd", "KOALA_PD"),
        ("--listen", "KOALA_LISTEN"),
        ("--mailbox-size", "KOALA_MAILBOX_SIZE"),
        ("--etcd-quota-bytes", "KOALA_ETCD_QUOTA_BYTES"),
        ("--tls-cert", "KOALA_TLS_CERT"),  # the same name koala._tls reads
    ],
)
def test_variable_names(flag: str, variable: str) -> None:
    assert env_name(argparse.Action([flag], dest="x")) == variable
    assert env_name(argparse.Action([], dest="app")) == "KOALA_APP"


def test_variables_stand_in_for_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOALA_PD", "http://10.0.0.5:9000")
    monkeypatch.setenv("KOALA_LISTEN", "127.0.0.1:7001")
    monkeypatch.setenv("KOALA_TTL", "7")
    monkeypatch.setenv("KOALA_MAILBOX_SIZE", "12")
    monkeypatch.setenv("KOALA_IDLE_TIMEOUT", "2.5")
    monkeypatch.setenv("KOALA_LOG_LEVEL", "debug")
    monkeypatch.setenv("KOALA_APP", "examples/echo.py")
    args = build_parser().parse_args(["host"])  # --pd is required, the variable gives it
    assert args.pd == "http://10.0.0.5:9000"
    assert args.listen == "127.0.0.1:7001"
    assert args.ttl == 7
    assert args.app == "examples/echo.py"
    assert args.log_level == "DEBUG"
    config = _host_config(args)
    assert (config.mailbox_size, config.idle_timeout) == (12, 2.5)
    assert config.max_queued == HostConfig().max_queued  # unset: HostConfig's default


def test_a_flag_beats_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOALA_PD", "http://from-env:9000")
    monkeypatch.setenv("KOALA_TTL", "7")
    monkeypatch.setenv("KOALA_APP", "examples/timers.py")
    args = build_parser().parse_args(
        ["host", "examples/echo.py", "--pd", "http://from-flag:9000", "--ttl", "9"]
    )
    assert (args.pd, args.ttl, args.app) == ("http://from-flag:9000", 9, "examples/echo.py")


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOALA_PD", "")
    monkeypatch.setenv("KOALA_TTL", "")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["host", "examples/echo.py"])  # --pd still required
    args = build_parser().parse_args(["host", "examples/echo.py", "--pd", "http://p:1"])
    assert args.ttl == 15


def test_a_variable_is_forgotten_once_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    monkeypatch.setenv("KOALA_TTL", "7")
    assert parser.parse_args(["host", "a.py", "--pd", "http://p:1"]).ttl == 7
    monkeypatch.delenv("KOALA_TTL")
    assert parser.parse_args(["host", "a.py", "--pd", "http://p:1"]).ttl == 15


def test_only_the_chosen_commands_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOALA_TTL", "not a number")  # a host's; `koala pd` has no --ttl
    monkeypatch.setenv("KOALA_COMPACT_INTERVAL", "5")
    args = build_parser().parse_args(["pd", "--store", "memory"])
    assert args.compact_interval == 5.0


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("KOALA_TTL", "abc", "KOALA_TTL='abc' (for --ttl): not a valid int"),
        ("KOALA_MAILBOX_SIZE", "1.5", "KOALA_MAILBOX_SIZE='1.5' (for --mailbox-size)"),
        ("KOALA_LOG_LEVEL", "loud", "'loud' is not a logging level"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["host", "examples/echo.py", "--pd", "http://p:1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # no usage block: the variable is the whole story
    assert err.startswith("koala host: error: ")
    assert message in err


def test_a_store_true_flag_reads_yes_and_no(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = EnvParser(prog="t")
    parser.add_argument("--verbose", action="store_true", help="talk")
    monkeypatch.setenv("KOALA_VERBOSE", "yes")
    assert parser.parse_args([]).verbose is True
    monkeypatch.setenv("KOALA_VERBOSE", "off")
    assert parser.parse_args([]).verbose is False
    monkeypatch.setenv("KOALA_VERBOSE", "maybe")
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_choices_hold_for_variables_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = EnvParser(prog="t")
    parser.add_argument("--mode", choices=["a", "b"], default="a", help="m")
    monkeypatch.setenv("KOALA_MODE", "b")
    assert parser.parse_args([]).mode == "b"
    monkeypatch.setenv("KOALA_MODE", "c")
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "KOALA_MODE='c' (for --mode): use one of: a, b" in capsys.readouterr().err


# ---------------------------------------------------------------- HostConfig on the CLI


def test_every_host_config_field_is_a_flag_of_dev_and_host() -> None:
    names = {f.name for f in fields(HostConfig)}
    assert set(HOST_FLAGS) == names  # a new field needs its flag (and help) here
    commands = _commands()
    for command in ("dev", "host"):
        dests = {a.dest for a in _arguments(commands[command])}
        assert names <= dests, (command, names - dests)


def test_host_config_flags_reach_host_config() -> None:
    values = {f.name: (7 if f.type in (int, "int") else 0.25) for f in fields(HostConfig)}
    argv = ["dev", "examples/echo.py"]
    for name, value in values.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    config = _host_config(build_parser().parse_args(argv))
    for name, value in values.items():
        assert getattr(config, name) == value, name


def test_host_config_validates_and_the_error_names_flag_and_variable() -> None:
    args = build_parser().parse_args(["dev", "examples/echo.py", "--max-queued", "0"])
    with pytest.raises(ConfigError) as info:
        _host_config(args)
    assert str(info.value).startswith("--max-queued (env KOALA_MAX_QUEUED): HostConfig.")
    assert "must be a positive number, got 0" in str(info.value)


def test_a_bad_variable_stops_the_real_command_before_it_starts() -> None:
    env = {**os.environ, "KOALA_SHUTDOWN_GRACE": "-1", "KOALA_PD": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "-m", "koala.cli", "host", "examples/echo.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "koala: error: --shutdown-grace (env KOALA_SHUTDOWN_GRACE): HostConfig.shutdown_grace "
        "must be a positive number, got -1.0"
    ]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::ffff:0.0.0.0"])
def test_a_host_never_registers_a_wildcard_address(host: str) -> None:
    with pytest.raises(ConfigError, match="other hosts and gateways dial it"):
        check_dialable(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.7", "host1", "::1"])
def test_addresses_and_names_are_dialable(host: str) -> None:
    check_dialable(host)


def test_a_task_groups_koala_error_is_unwrapped_but_a_bug_is_not() -> None:
    config = ConfigError("cannot listen on 127.0.0.1:7001: Address already in use")
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [config])])
    assert first_koala_error(nested) is config
    assert first_koala_error(ExceptionGroup("g", [config, KeyError("a bug")])) is None
