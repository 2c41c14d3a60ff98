"""The command line's flags: every one with an environment twin, HostConfig's fields
as flags of ``koala dev`` and ``koala host``, and the checks of their values."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, NoReturn

from ._config import HostConfig
from ._errors import ConfigError


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be > 0")
    return number


def _log_level(value: str) -> str:
    name = value.strip().upper()
    if name not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a logging level: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    return name


ENV_PREFIX = "KOALA_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_name(action: argparse.Action) -> str:
    """The environment twin of a flag: ``--mailbox-size`` is KOALA_MAILBOX_SIZE, and a
    positional argument is named by its dest (``app``: KOALA_APP)."""
    longest = max(action.option_strings, key=len) if action.option_strings else action.dest
    return ENV_PREFIX + longest.lstrip("-").replace("-", "_").upper()


class EnvParser(argparse.ArgumentParser):
    """An argument parser whose every argument has an environment twin (:func:`env_name`),
    so a container sets ``KOALA_PD`` where a shell types ``--pd``.

    A flag given on the command line beats its variable; an empty variable counts as
    unset. Variables are read when this parser parses, so only the chosen command's are
    looked at, and a bad one is a one-line error naming it. Each argument's help names
    its variable.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # what add_argument said, before any variable changed it: (default, required, nargs)
        self._declared: dict[argparse.Action, tuple[Any, bool, Any]] = {}

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if isinstance(action, argparse._HelpAction):
            return action
        self._declared[action] = (action.default, action.required, action.nargs)
        if action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env {env_name(action)}]".lstrip()
        return action

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self._apply_env(os.environ)
        return super().parse_known_args(*args, **kwargs)

    def _apply_env(self, environ: Mapping[str, str]) -> None:
        for action, (default, required, nargs) in self._declared.items():
            action.default, action.required, action.nargs = default, required, nargs
            name = env_name(action)
            raw = environ.get(name, "")
            if not raw:
                continue
            action.default = self._env_value(action, name, raw)
            action.required = False
            if not action.option_strings:  # a positional the variable may stand for
                action.nargs = "?"

    def _env_value(self, action: argparse.Action, name: str, raw: str) -> Any:
        flag = max(action.option_strings, key=len) if action.option_strings else action.dest
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            word = raw.strip().lower()
            if word not in _TRUE | _FALSE:
                self._env_error(name, raw, flag, "use 1/true/yes/on or 0/false/no/off")
            return (word in _TRUE) == isinstance(action, argparse._StoreTrueAction)
        if action.nargs not in (None, "?") and action.option_strings:
            self._env_error(name, raw, flag, "this flag cannot be set from the environment")
        value: Any = raw
        convert = self._registry_get("type", action.type, action.type)
        if callable(convert):
            try:
                value = convert(raw)
            except argparse.ArgumentTypeError as exc:
                self._env_error(name, raw, flag, str(exc))
            except (TypeError, ValueError):
                kind = getattr(convert, "__name__", "value")
                self._env_error(name, raw, flag, f"not a valid {kind}")
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            self._env_error(name, raw, flag, f"use one of: {choices}")
        return value

    def _env_error(self, name: str, raw: str, flag: str, why: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {name}={raw!r} (for {flag}): {why}\n")


# HostConfig's fields, each a flag of `koala dev` and `koala host` (and so a variable);
# HostConfig validates the values. tests/test_cli_env.py checks that none is missing.
HOST_FLAGS = {
    "default_timeout": "seconds: the deadline of a call made without one",
    "idle_timeout": "seconds an actor may stay unused before it is deactivated",
    "collection_interval": "seconds between two looks for idle actors",
    "mailbox_size": "most calls queued for one actor",
    "max_queued": "most calls queued on the host; past it calls fail with OverloadedError",
    "shutdown_grace": "seconds a stopping host lets running turns and on_deactivate finish",
    "deactivation_batch": "activations deactivated between two yields to other tasks",
    "deactivation_tasks": "most on_deactivate hooks of idle actors running at once",
    "inline_check": "local calls in a row between two looks at the clock (to let others run)",
    "slow_turn": "seconds past which a local call counts in koala_slow_turns_total",
}


def _add_host_config_flags(command: argparse.ArgumentParser) -> None:
    defaults = HostConfig()
    for f in fields(HostConfig):
        value = getattr(defaults, f.name)
        command.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int if isinstance(value, int) else float,
            metavar="N" if isinstance(value, int) else "SECONDS",
            default=None,  # HostConfig's own default, so that it stays in one place
            help=f"{HOST_FLAGS[f.name]} (default {value:g})",
        )


def _host_config(args: argparse.Namespace) -> HostConfig:
    """HostConfig from the flags (or their variables) given; HostConfig validates them,
    and a bad one names the flag and its variable."""
    given = {f.name: getattr(args, f.name) for f in fields(HostConfig)}
    try:
        return HostConfig(**{name: value for name, value in given.items() if value is not None})
    except ConfigError as exc:
        bad = [name for name in given if f"HostConfig.{name} " in str(exc)]
        if not bad:
            raise
        flag = "--" + bad[0].replace("_", "-")
        raise ConfigError(f"{flag} (env {ENV_PREFIX}{bad[0].upper()}): {exc}") from None
