"""The store on etcd, through etcd's v3 JSON gateway (``/v3/...``) with httpx.

Why the JSON gateway: httpx runs on asyncio and trio alike, while the gRPC clients on
PyPI need asyncio. Its conventions (all verified against etcd 3.4): keys and values
travel base64-encoded, 64-bit integers as JSON strings, fields holding a default value
(0, false, empty) are left out, and errors come as 4xx/5xx with
``{"error": ..., "code": ...}`` (gRPC status codes).

Every request runs under a deadline (``timeout``); a server that does not answer gives
:class:`StoreUnavailableError`, never a hang. Several endpoints may be given (the
members of an etcd cluster): on a connection failure the next one is tried.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import anyio
import httpx

from .._errors import ConfigError
from ._store import (
    KeyValue,
    LeaseNotFoundError,
    StoreError,
    StoreUnavailableError,
    check_key,
    check_timeout,
    check_ttl,
)

# Connections kept per client; requests beyond wait on a semaphore, because httpx's
# pool scans every connection for every queued request (quadratic under load).
HTTP_POOL = 16

log = logging.getLogger("koala.pd.etcd")

DEFAULT_TIMEOUT = 5.0
_GRPC_NOT_FOUND = 5
_GRPC_UNAVAILABLE = (4, 14)  # DEADLINE_EXCEEDED, UNAVAILABLE


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end)."""
    raw = bytearray(prefix)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # every key


def _int(obj: dict[str, Any], name: str) -> int:
    return int(obj.get(name, 0))  # proto3 leaves out zeros; int64 comes as a string


def _kv(obj: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(obj["key"]).decode(),
        value=_unb64(obj.get("value", "")),
        create_revision=_int(obj, "create_revision"),
        mod_revision=_int(obj, "mod_revision"),
        version=_int(obj, "version"),
        lease=_int(obj, "lease"),
    )


def parse_endpoints(url: str) -> list[str]:
    """'http://a:2379,http://b:2379' -> the list; a clear error for anything else."""
    endpoints = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
    if not endpoints:
        raise ConfigError("the etcd URL is empty; pass e.g. --etcd http://127.0.0.1:2379")
    for endpoint in endpoints:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"etcd endpoint {endpoint!r} must start with http:// or https:// "
                "(e.g. http://127.0.0.1:2379)"
            )
    return endpoints


class EtcdStore:
    """:class:`~koala.pd.Store` on etcd's v3 JSON gateway. Use ``await store.aclose()``."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        check_timeout(timeout)
        self.endpoints = parse_endpoints(url)
        self.timeout = timeout
        self._current = 0
        self._slots = anyio.Semaphore(HTTP_POOL)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=HTTP_POOL, max_keepalive_connections=HTTP_POOL),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on an endpoint; the decoded answer or a StoreError."""
        errors: list[str] = []
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[self._current]
            try:
                with anyio.fail_after(self.timeout):
                    async with self._slots:  # queue here, not in httpx's pool (slow scans)
                        resp = await self._client.post(endpoint + path, json=body)
            except (httpx.TransportError, TimeoutError) as exc:
                errors.append(f"{endpoint}: {type(exc).__name__} {exc}".rstrip())
                self._current = (self._current + 1) % len(self.endpoints)
                continue
            return self._answer(endpoint, path, resp)
        raise StoreUnavailableError(
            f"etcd cannot be reached ({'; '.join(errors)}); check that etcd runs and that "
            "--etcd points at its client URL"
        )

    def _answer(self, endpoint: str, path: str, resp: httpx.Response) -> dict[str, Any]:
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(
                f"etcd at {endpoint} answered {path} with HTTP {resp.status_code} and a body "
                "that is not JSON; is this etcd's client URL?"
            ) from None
        if not isinstance(data, dict):
            raise StoreError(f"etcd at {endpoint} answered {path} with {data!r}")
        if resp.status_code != 200 or "error" in data:
            message = str(data.get("message") or data.get("error") or data)
            code = int(data.get("code", 0))
            if code == _GRPC_NOT_FOUND and "lease" in message:
                raise LeaseNotFoundError(f"{message} (it expired or was revoked)")
            if code in _GRPC_UNAVAILABLE:
                raise StoreUnavailableError(f"etcd at {endpoint}: {message}")
            raise StoreError(f"etcd at {endpoint} refused {path}: {message}")
        return data

    # ------------------------------------------------------------ kv

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        data = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str, *, limit: int = 0) -> list[KeyValue]:
        check_key(prefix)
        raw = prefix.encode()
        body: dict[str, Any] = {"key": _b64(raw), "range_end": _b64(_prefix_end(raw))}
        if limit > 0:
            body["limit"] = str(limit)
        data = await self._call("/v3/kv/range", body)
        return [_kv(obj) for obj in data.get("kvs") or []]

    def _put_op(self, key: str, value: bytes, lease: int) -> dict[str, Any]:
        op: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            op["lease"] = str(lease)
        return op

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        data = await self._call("/v3/kv/put", self._put_op(key, value, lease))
        return _int(data.get("header", {}), "revision")

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> tuple[bool, KeyValue]:
        check_key(key)
        txn = {
            "compare": [
                {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            ],
            "success": [
                {"request_put": self._put_op(key, value, lease)},
                {"request_range": {"key": _b64(key)}},
            ],
            "failure": [{"request_range": {"key": _b64(key)}}],
        }
        data = await self._call("/v3/kv/txn", txn)
        succeeded = bool(data.get("succeeded", False))
        for response in data.get("responses") or []:
            kvs = response.get("response_range", {}).get("kvs")
            if kvs:
                return succeeded, _kv(kvs[0])
        # the key was deleted between the compare and the read: impossible in one txn
        raise StoreError(f"etcd's transaction on {key!r} returned no key")

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        check_key(key)
        txn = {
            "compare": [
                {
                    "key": _b64(key),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": str(mod_revision),
                }
            ],
            "success": [{"request_put": self._put_op(key, value, lease)}],
        }
        data = await self._call("/v3/kv/txn", txn)
        return bool(data.get("succeeded", False))

    async def delete(self, key: str) -> bool:
        check_key(key)
        data = await self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return _int(data, "deleted") > 0

    # ------------------------------------------------------------ leases

    async def grant(self, ttl: int) -> int:
        check_ttl(ttl)
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        lease = _int(data, "ID")
        if not lease:
            raise StoreError(f"etcd granted no lease: {data.get('error') or data}")
        return lease

    async def keep_alive(self, lease: int) -> int:
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = data.get("result", data)
        ttl = _int(result, "TTL")
        if ttl <= 0:  # a dead lease is answered with 200 and no TTL
            raise LeaseNotFoundError(f"lease {lease} not found (it expired or was revoked)")
        return ttl

    async def time_to_live(self, lease: int) -> int | None:
        data = await self._call("/v3/lease/timetolive", {"ID": str(lease)})
        ttl = _int(data, "TTL")
        return None if ttl < 0 else ttl

    async def revoke(self, lease: int) -> bool:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except LeaseNotFoundError:
            return False
        return True
