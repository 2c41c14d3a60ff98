"""Host configuration: a frozen record validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ._errors import ConfigError


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Settings of one host runtime. Bad values fail here, at start, with a clear error.

    - ``default_timeout``: deadline of a call made outside any cancel scope (seconds).
    - ``idle_timeout``: an activation unused this long is deactivated (an actor class
      may set its own ``idle_timeout``).
    - ``collection_interval``: how often idle activations are looked for.
    - ``mailbox_size``: most calls queued for one activation.
    - ``max_queued``: most calls queued on the whole host; past it calls are refused
      with OverloadedError at once.
    - ``shutdown_grace``: how long a stopping host lets in-flight turns and
      ``on_deactivate`` run before it cancels them.
    - ``deactivation_batch``: how many activations collection, ``evict_all``,
      ``shutdown`` and ``shed`` go through before they let other tasks run.
    - ``deactivation_tasks``: most tasks running ``on_deactivate`` of idle activations
      at once (an activation whose ``on_deactivate`` is the default needs none).
    - ``slow_turn``: a local call taking longer than this many seconds is counted in
      the ``koala_slow_turns_total`` metric.
    """

    default_timeout: float = 30.0
    idle_timeout: float = 600.0
    collection_interval: float = 1.0
    mailbox_size: int = 10_000
    max_queued: int = 100_000
    shutdown_grace: float = 10.0
    deactivation_batch: int = 32
    deactivation_tasks: int = 64
    slow_turn: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"HostConfig.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"HostConfig.{f.name} must be a positive number, got {value!r}")
        for name in ("mailbox_size", "max_queued", "deactivation_batch", "deactivation_tasks"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"HostConfig.{name} must be an integer")
