"""The rebalancer's rule: how many activations a host gives up so that hosts even out.

Placement already follows the load: a new actor, or one placed again after it was
deactivated (its position given back), goes to the less loaded of two hosts. What that
cannot fix alone is a host holding more than its share of actors that stay active (a host
joined, or one restarted, while the rest kept theirs). So at each renewal a host compares
its activations with the cluster's mean (as the PD reports it, with the least any host
holds) and, when it is above the mean by more than ``threshold`` (or above it at all
while a host is below it by more than that), deactivates a few of its least recently used idle
activations (``Runtime.shed``: at a turn boundary, like collection). Their next call
places them anew, by load. At most ``fraction`` of the host's activations go per
renewal, so a rebalance never becomes a storm of re-placements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._errors import ConfigError


@dataclass(frozen=True, slots=True)
class RebalanceConfig:
    """When a host gives activations up, and how fast. Validated on construction.

    - ``threshold``: give up activations when above the mean by more than this fraction
      of it (0: never; the rebalancer is off).
    - ``fraction``: at most this fraction of the host's activations per renewal.
    - ``minimum``: an excess smaller than this many activations is left alone (noise)
      unless some host is below the mean by more than ``threshold`` and by at least this
      many; and at least this many may go per renewal.
    """

    threshold: float = 0.2
    fraction: float = 0.01
    minimum: int = 16

    def __post_init__(self) -> None:
        for name in ("threshold", "fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"RebalanceConfig.{name} must be a number >= 0, got {value!r}")
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"RebalanceConfig.fraction must be from 0 to 1, got {self.fraction}")
        if isinstance(self.minimum, bool) or not isinstance(self.minimum, int) or self.minimum < 1:
            raise ConfigError(
                f"RebalanceConfig.minimum must be an integer >= 1, got {self.minimum!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.threshold > 0 and self.fraction > 0


def to_shed(mine: int, mean: float, least: int, config: RebalanceConfig) -> int:
    """How many of its ``mine`` activations a host gives up now, the cluster's mean
    being ``mean`` and its least loaded host holding ``least``: down towards the mean,
    in steps of at most ``fraction``. A host sheds when it is above the mean by more
    than the threshold, or when it is above the mean at all while some host is below it
    by more than the threshold (one that just joined)."""
    if not config.enabled or mean <= 0:
        return 0
    above = mine > mean * (1 + config.threshold)
    # a host far behind: below the mean by the threshold, and by more than noise
    lagging = (
        least < mean * (1 - config.threshold) and mean - least >= config.minimum and mine > mean
    )
    if not (above or lagging):
        return 0
    excess = mine - math.ceil(mean)
    if excess <= 0 or (excess < config.minimum and not lagging):
        return 0  # a small excess is noise, unless a host is far behind
    step = max(config.minimum, int(mine * config.fraction))
    return min(excess, step)
