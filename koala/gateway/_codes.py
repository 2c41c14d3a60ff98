"""The WebSocket close codes the gateway sends, one per reason (see docs/gateway.md)."""

from __future__ import annotations

import enum


class ClientCloseCode(enum.IntEnum):
    """Why the gateway closed a client's WebSocket.

    1000-1013 are the standard codes of RFC 6455 where one fits; 4000-4099 are Koala's.
    An actor that closes a session picks its own code (1000, or 3000-4999).
    """

    NORMAL = 1000  # the actor closed the session without a code
    GOING_AWAY = 1001  # the gateway is stopping
    MESSAGE_TOO_BIG = 1009  # a frame above max_frame_size (or the first packet above its cap)
    INTERNAL_ERROR = 1011  # a bug, or the actor's on_client_open raised
    TRY_AGAIN_LATER = 1013  # max_connections reached
    BAD_FIRST_PACKET = 4000  # the first packet is not a JSON object in a text frame
    BAD_FIELD = 4001  # a required field is missing, or a field has the wrong type
    BAD_CHECKSUM = 4002  # check_sum does not match
    STALE_TIMESTAMP = 4003  # timestamp outside the window (replay protection)
    AUTH_TIMEOUT = 4004  # no first packet within auth_timeout
    NO_ACTOR = 4005  # no actor to bind: unknown actor type, or the account service refused
    REPLAYED = 4006  # this first packet was already accepted within the window
    REPLAY_CACHE_FULL = 4007  # the replay cache is full within the window: try again later
    RATE_LIMITED = 4008  # the client sent faster than its token bucket allows
    SEND_QUEUE_FULL = 4009  # the client does not read what is pushed to it
    IDLE_TIMEOUT = 4010  # nothing received from the client for idle_timeout
    UNAVAILABLE = 4011  # the bound actor cannot be reached (re-binding failed in time)
    OVERLOADED = 4012  # the actor's mailbox or its host is full


def valid_actor_close_code(code: int) -> bool:
    """Codes an actor may send: 1000, or the registered/private ranges 3000-4999."""
    return code == 1000 or 3000 <= code <= 4999
