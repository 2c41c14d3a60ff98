"""What a transport reports: its statistics, and the metrics families read from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from .. import _metrics

if TYPE_CHECKING:
    from ._channel import Channel
    from ._remote import Transport


@dataclass(frozen=True, slots=True)
class TransportStatistics:
    """``connections``: open channels; ``unauthenticated``: inbound connections still in
    their handshake; ``refused_connections``: inbound ones closed before or at their
    handshake (``displaced`` of them to make room for newer ones)."""

    connections: int
    pending_calls: int
    serving: int
    connects: int
    failed_connects: int
    refused_connections: int
    unauthenticated: int = 0
    displaced: int = 0
    # since the transport started, on connections that completed their handshake
    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def add_io(io: tuple[int, int, int, int], ch: Channel) -> tuple[int, int, int, int]:
    conn = ch.conn
    return (
        io[0] + conn.frames_sent,
        io[1] + conn.frames_received,
        io[2] + conn.bytes_sent,
        io[3] + conn.bytes_received,
    )


def transport_metrics(transport: Transport) -> list[Metric]:
    st = transport.statistics()
    c, g = _metrics.counter, _metrics.gauge
    return [
        g("koala_transport_connections", "Open connections to other hosts", st.connections),
        g("koala_transport_pending_calls", "Calls out waiting for their answer", st.pending_calls),
        g("koala_transport_serving", "Requests from other hosts being served", st.serving),
        g(
            "koala_transport_unauthenticated",
            "Inbound connections in their handshake",
            st.unauthenticated,
        ),
        c("koala_transport_frames_sent_total", "Frames sent to other hosts", st.frames_sent),
        c(
            "koala_transport_frames_received_total",
            "Frames received from other hosts",
            st.frames_received,
        ),
        c("koala_transport_sent_bytes_total", "Bytes sent to other hosts", st.bytes_sent),
        c(
            "koala_transport_received_bytes_total",
            "Bytes received from other hosts",
            st.bytes_received,
        ),
        c("koala_transport_connects_total", "Connections dialled", st.connects),
        c("koala_transport_failed_connects_total", "Dials that failed", st.failed_connects),
        c(
            "koala_transport_refused_total",
            "Inbound connections refused at their handshake",
            st.refused_connections,
        ),
    ]
