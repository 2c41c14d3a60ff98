"""The gateway tests' WebSocket client (``koala.testing.websocket``)."""

from koala.testing.websocket import KEY, Closed, WSClient, connect, first_packet, session

__all__ = ["KEY", "Closed", "WSClient", "connect", "first_packet", "session"]
