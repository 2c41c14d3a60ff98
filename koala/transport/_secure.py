"""TLS on host links: the contexts of a transport, and each end's wrapping of a stream.

Both ends use anyio's ``TLSStream``, which runs the same on asyncio, uvloop and trio.
The TLS is mutual: the listener demands a certificate signed by the cluster's CA, the
dialler checks the listener's against that CA and the host part of the address it
dialled. Sessions end with Koala's CLOSE frame, so neither end waits for TLS's own
closing handshake (``standard_compatible=False``): a peer that drops the TCP stream is an
end of stream, as without TLS.

A listener reads the first bytes of a connection before it wraps it: a peer that does
not open with a TLS record is told in a plain CLOSE frame that this node speaks TLS,
so a node with TLS off learns why it was refused.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream

from .._errors import ConfigError
from .._tls import TLSConfig

TLS_HANDSHAKE_RECORD = 0x16  # the first byte of a TLS session (a ClientHello record)
TLS_FILES_HINT = "--tls-cert, --tls-key and --tls-ca (KOALA_TLS_CERT, KOALA_TLS_KEY, KOALA_TLS_CA)"


class TLSRefused(Exception):
    """A TLS handshake failed; the message says what to check."""


@dataclass(frozen=True, slots=True)
class Contexts:
    """A transport's TLS contexts, built once: loading the files costs milliseconds."""

    server: ssl.SSLContext | None  # None: this node has no certificate (it only dials)
    client: ssl.SSLContext


def contexts(tls: TLSConfig) -> Contexts:
    """The contexts of ``tls``; ConfigError naming the files if they do not load."""
    try:
        server = tls.server_context(require_client_cert=True) if tls.enabled else None
        client = tls.client_context()
    except ssl.SSLError as exc:
        raise ConfigError(
            f"the TLS files of host links do not load (certificate {tls.cert}, key "
            f"{tls.key}, CA {tls.ca}): {exc.reason or exc}; give PEM files that belong "
            "together"
        ) from None
    return Contexts(server, client)


def _reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    return str(exc.reason or exc)


class Replay(ByteStream):
    """``inner``, with ``head`` (bytes already read from it) handed out first."""

    def __init__(self, inner: ByteStream, head: bytes) -> None:
        self.inner = inner
        self._head = head

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._head:
            data, self._head = self._head[:max_bytes], self._head[max_bytes:]
            return data
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Any]:
        return self.inner.extra_attributes


async def accept(stream: ByteStream, head: bytes, context: ssl.SSLContext) -> TLSStream:
    """The listener's end: the TLS session whose first bytes, ``head``, were read."""
    try:
        return await TLSStream.wrap(
            Replay(stream, head),
            server_side=True,
            ssl_context=context,
            standard_compatible=False,
        )
    except ssl.SSLError as exc:
        raise TLSRefused(
            f"TLS handshake failed: {_reason(exc)} (a peer must present a certificate "
            "signed by this cluster's CA)"
        ) from None
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise TLSRefused(f"the peer left during the TLS handshake ({exc!r})") from None


async def connect(stream: ByteStream, host: str, context: ssl.SSLContext) -> TLSStream:
    """The dialler's end: a TLS session with the listener at ``host``, checked."""
    try:
        return await TLSStream.wrap(
            stream,
            server_side=False,
            hostname=host,
            ssl_context=context,
            standard_compatible=False,
        )
    except ssl.SSLCertVerificationError as exc:
        raise TLSRefused(
            f"TLS: the node's certificate is not trusted ({_reason(exc)}); it must be "
            f"signed by the CA this node trusts and name {host}: check {TLS_FILES_HINT} "
            "on both nodes"
        ) from None
    except ssl.SSLError as exc:
        raise TLSRefused(
            f"TLS handshake failed ({_reason(exc)}); does the node speak TLS on host "
            f"links? Turn it on for every node or none, with {TLS_FILES_HINT}"
        ) from None
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise TLSRefused(
            f"TLS: the node closed the connection during the TLS handshake ({exc!r}); "
            f"does it speak TLS on host links? Check {TLS_FILES_HINT}"
        ) from None


def broken_session(exc: BaseException) -> str | None:
    """If ``exc`` is a TLS alert that ended a session during Koala's handshake (the
    listener refused this node's certificate only once TLS 1.3 had let it send), the
    reason to report; else None."""
    cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if not isinstance(cause, ssl.SSLError):
        return None
    return (
        f"TLS: the node refused this one's certificate ({_reason(cause)}); present one "
        f"signed by the cluster's CA: check {TLS_FILES_HINT}"
    )


CLOSED_AFTER_TLS = (
    "TLS: the node refused this one's certificate (it closed the session before the "
    "Koala handshake); present one signed by the cluster's CA: check " + TLS_FILES_HINT
)
"""Why a listener closed a TLS session at once: with TLS 1.3 a dialler's handshake is
done before the listener has checked its certificate, and the listener's refusal
(its alert) does not always reach the dialler before the connection ends."""
