"""The rebalancer's rule (koala.pd._rebalance): when a host gives activations up, and
how many at a time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from koala import ConfigError
from koala.pd._rebalance import RebalanceConfig, to_shed


def test_a_host_within_the_threshold_keeps_everything() -> None:
    config = RebalanceConfig(threshold=0.2, fraction=0.01, minimum=16)
    assert to_shed(1_200, 1_000.0, 900, config) == 0  # 20% above: within
    assert to_shed(1_100, 1_000.0, 800, config) == 0  # the least is within too
    assert to_shed(900, 1_000.0, 0, config) == 0  # below the mean: never
    assert to_shed(5, 0.0, 0, config) == 0  # nobody reported yet


def test_a_host_above_the_threshold_sheds_a_bounded_step_towards_the_mean() -> None:
    config = RebalanceConfig(threshold=0.2, fraction=0.01, minimum=16)
    assert to_shed(150_000, 100_000.0, 100_000, config) == 1_500  # 1% of its activations
    assert to_shed(150, 100.0, 100, config) == 16  # at least the minimum step
    assert to_shed(130, 100.0, 100, config) == 16
    assert to_shed(40, 20.0, 20, config) == 16  # never below the mean: excess 20, step 16
    assert to_shed(30, 20.0, 20, config) == 0  # an excess under the minimum is noise


def test_a_host_that_joined_pulls_the_others_down_to_the_mean() -> None:
    config = RebalanceConfig(threshold=0.2, fraction=0.01, minimum=16)
    # 150 / 150 / 0 (a host joined): both shed
    assert to_shed(150, 100.0, 0, config) == 16
    # 118 / 112 / 70: within 20% above, but a host 30% below: shed towards the mean
    assert to_shed(118, 100.0, 70, config) == 16
    assert to_shed(118, 100.0, 90, config) == 0  # every host within 20%: nothing moves
    assert to_shed(100, 100.0, 70, config) == 0  # at the mean: keeps them
    # 93 / 89 / 58: small excesses, but a host far behind: they still go to the mean
    assert to_shed(93, 80.0, 58, config) == 13
    assert to_shed(89, 80.0, 58, config) == 9
    # a few actors on a few hosts: no host is behind by more than noise
    assert to_shed(3, 1.5, 0, config) == 0
    assert to_shed(20, 10.0, 0, config) == 0


def test_threshold_zero_turns_it_off() -> None:
    assert to_shed(10_000, 10.0, 0, RebalanceConfig(threshold=0)) == 0
    assert to_shed(10_000, 10.0, 0, RebalanceConfig(fraction=0)) == 0
    assert not RebalanceConfig(threshold=0).enabled


@given(
    mine=st.integers(0, 10**7),
    mean=st.floats(0, 10**7, allow_nan=False),
    least=st.integers(0, 10**7),
    threshold=st.floats(0, 2),
    fraction=st.floats(0, 1),
    minimum=st.integers(1, 1000),
)
def test_a_host_never_sheds_below_the_mean_nor_more_than_a_step(
    mine: int, mean: float, least: int, threshold: float, fraction: float, minimum: int
) -> None:
    config = RebalanceConfig(threshold=threshold, fraction=fraction, minimum=minimum)
    n = to_shed(mine, mean, least, config)
    assert 0 <= n <= max(minimum, int(mine * fraction))
    if n:
        assert mine - n >= mean
        assert mine > mean * (1 + threshold) or (
            least < mean * (1 - threshold) and mean - least >= minimum
        )


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        RebalanceConfig(threshold=-1)
    with pytest.raises(ConfigError, match="fraction"):
        RebalanceConfig(fraction=2)
    with pytest.raises(ConfigError, match="minimum"):
        RebalanceConfig(minimum=0)
