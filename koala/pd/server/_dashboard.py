"""The PD's side of the cluster page (koala.dashboard): a sample of its host table."""

from __future__ import annotations

from ...dashboard import ClusterSample, HostSample
from ._driver import PlacementDriver


def cluster_sample(pd: PlacementDriver, gateway_sessions: int | None = None) -> ClusterSample:
    """The hosts as this PD last read them, with what each reported at its last renewal,
    and the placements this PD made (no store access: the page costs the PD nothing)."""
    hosts = [
        HostSample(
            server_id=info.server_id,
            address=info.address,
            load=float(info.load),
            activations=info.activations,
            start_time=info.start_time / 1000,
            renew_time=info.renew_time / 1000,
            lease_ttl=info.ttl,
            calls=stats.calls,
            call_seconds=stats.call_seconds,
            activations_by_type=dict(stats.activations_by_type),
        )
        for info, stats in pd.table.last_view()
    ]
    return ClusterSample(hosts, pd.placements, gateway_sessions)
