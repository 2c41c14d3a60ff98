"""The store on etcd, through etcd's v3 JSON gateway (``/v3/...``) with httpx.

Why the JSON gateway: httpx runs on asyncio and trio alike, while the gRPC clients on
PyPI need asyncio. Its conventions (all verified against etcd 3.4): keys and values
travel base64-encoded, 64-bit integers as JSON strings, fields holding a default value
(0, false, empty) are left out, and errors come as 4xx/5xx with
``{"error": ..., "code": ...}`` (gRPC status codes).

Every request runs under a deadline (``timeout``); a server that does not answer gives
:class:`StoreUnavailableError`, never a hang. Several endpoints may be given (the
members of an etcd cluster): on a connection failure the next one is tried, and a
connection that broke without an answer (e.g. a pooled connection the server closed)
is retried once more on a fresh one. Repeating a request is harmless for every
operation the PD makes: reads and lease keep-alives are idempotent, a repeated
create-if-absent or compare-and-swap that had landed reports the key as existing or
changed (the PD then reads or retries), and a repeated grant leaves a lease nobody
renews, which expires.

etcd out of space (the NOSPACE alarm: ``--quota-backend-bytes`` reached) answers
writes with RESOURCE_EXHAUSTED: :class:`StoreFullError`.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import httpx

from ... import _metrics
from ..._errors import ConfigError
from ._store import (
    NOSPACE,
    CreateOutcome,
    KeyValue,
    LeaseNotFoundError,
    StoreError,
    StoreFullError,
    StoreStatus,
    StoreUnavailableError,
    check_distinct,
    check_key,
    check_revision,
    check_timeout,
    check_ttl,
)

# Connections kept per client; requests beyond wait on a semaphore, because httpx's
# pool scans every connection for every queued request (quadratic under load).
HTTP_POOL = 16

log = logging.getLogger("koala.pd.etcd")

# etcd's failures, by kind, for koala_pd_store_errors_total
store_errors = _metrics.Counters(
    "koala_pd_store_errors_total",
    "etcd requests that failed, by kind (timeout, transport, full, unavailable, ...)",
    ("kind",),
)
_metrics.report(_metrics.PROCESS, lambda _: [store_errors.family()])
_ERROR_KINDS: dict[type[StoreError], str] = {
    StoreFullError: "full",
    StoreUnavailableError: "unavailable",
    LeaseNotFoundError: "lease_not_found",
}

DEFAULT_TIMEOUT = 5.0
DEFRAG_TIMEOUT = 120.0  # defragmenting rewrites the whole file: a large one takes a while
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: operations per branch of one txn
_GRPC_NOT_FOUND = 5
_GRPC_RESOURCE_EXHAUSTED = 8  # "mvcc: database space exceeded" (NOSPACE)
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


def _read_back(data: dict[str, Any], count: int) -> list[KeyValue | None]:
    """The keys a txn's ``count`` range reads found (None: absent), in order."""
    responses = data.get("responses") or []
    if len(responses) != count:
        raise StoreError(f"etcd answered a txn of {count} reads with {len(responses)}")
    found: list[KeyValue | None] = []
    for response in responses:
        kvs = response.get("response_range", {}).get("kvs")
        found.append(_kv(kvs[0]) if kvs else None)
    return found


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
    """:class:`~koala.pd.server.Store` on etcd's v3 JSON gateway. Use ``await store.aclose()``."""

    def __init__(
        self, url: str, *, timeout: float = DEFAULT_TIMEOUT, max_txn_ops: int = MAX_TXN_OPS
    ) -> None:
        """``max_txn_ops``: etcd's ``--max-txn-ops`` (a batch is split in txns this big)."""
        check_timeout(timeout)
        if isinstance(max_txn_ops, bool) or not isinstance(max_txn_ops, int) or max_txn_ops < 1:
            raise ConfigError(f"max_txn_ops must be a whole number >= 1, got {max_txn_ops!r}")
        self.endpoints = parse_endpoints(url)
        self.timeout = timeout
        self.max_txn_ops = max_txn_ops
        self._current = 0
        self._slots = anyio.Semaphore(HTTP_POOL)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=HTTP_POOL, max_keepalive_connections=HTTP_POOL),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        endpoint: str | None = None,
        wait: float | None = None,
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` on an endpoint (``endpoint``: that one only) within
        ``wait`` seconds (default: the store's timeout); the decoded answer or a StoreError.

        Each endpoint is tried once, and one more attempt is made after a connection
        that broke without a timeout (see the module docstring: repeats are harmless)."""
        errors: list[str] = []
        spare = 1  # the extra attempt after a broken connection
        tries = 1 if endpoint is not None else len(self.endpoints)
        while tries > 0:
            tries -= 1
            target = endpoint or self.endpoints[self._current]
            try:
                with anyio.fail_after(wait or self.timeout):
                    async with self._slots:  # queue here, not in httpx's pool (slow scans)
                        resp = await self._client.post(target + path, json=body)
            except (httpx.TransportError, TimeoutError) as exc:
                store_errors.inc(("timeout" if isinstance(exc, TimeoutError) else "transport",))
                errors.append(f"{target}: {type(exc).__name__} {exc}".rstrip())
                if endpoint is None:
                    self._current = (self._current + 1) % len(self.endpoints)
                if spare and not isinstance(exc, (TimeoutError, httpx.TimeoutException)):
                    spare -= 1
                    tries += 1
                continue
            try:
                return self._answer(target, path, resp)
            except StoreError as exc:
                store_errors.inc((_ERROR_KINDS.get(type(exc), "refused"),))
                raise
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
            if code == _GRPC_RESOURCE_EXHAUSTED and "space" in message:
                raise StoreFullError(
                    f"etcd at {endpoint} is out of space ({message}): its NOSPACE alarm is "
                    "raised and it refuses writes until history is compacted, the database "
                    "defragmented and the alarm disarmed; if live data fills the quota, raise "
                    "etcd's --quota-backend-bytes"
                )
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

    async def create_many(self, items: Sequence[tuple[str, bytes, int]]) -> list[CreateOutcome]:
        check_distinct([key for key, _, _ in items])
        outcomes: list[CreateOutcome | None] = [None] * len(items)
        step = self.max_txn_ops

        async def chunk(start: int) -> None:
            await self._create_chunk(
                items, list(range(start, min(start + step, len(items)))), outcomes
            )

        await self._each_chunk(len(items), chunk)
        return [outcome for outcome in outcomes if outcome is not None]

    async def _each_chunk(
        self, count: int, run: Callable[[int], Coroutine[Any, Any, None]]
    ) -> None:
        """``run(start)`` for every chunk of ``max_txn_ops`` items, concurrently."""
        if count <= self.max_txn_ops:
            if count:
                await run(0)
            return
        async with anyio.create_task_group() as tg:
            for start in range(0, count, self.max_txn_ops):
                tg.start_soon(run, start)

    async def _create_chunk(
        self,
        items: Sequence[tuple[str, bytes, int]],
        todo: list[int],
        outcomes: list[CreateOutcome | None],
    ) -> None:
        """Create ``items[i]`` for i in ``todo`` (at most max_txn_ops): one txn compares
        every key's create revision with 0 and puts them all; if any key exists, the
        failure branch reads them all, the existing ones are answered and the txn runs
        again for the rest. A dead lease fails the whole txn: the dead leases are found
        (time_to_live), their keys answered LeaseNotFoundError, and the rest retried.
        Each round answers at least one key, so this ends."""
        rounds = 2 * len(todo) + 2
        while todo:
            rounds -= 1
            if rounds < 0:
                raise StoreError("etcd kept changing the keys of a batch create; retry")
            keys = [_b64(items[i][0]) for i in todo]
            txn = {
                "compare": [
                    {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                    for k in keys
                ],
                "success": [
                    {"request_put": self._put_op(items[i][0], items[i][1], items[i][2])}
                    for i in todo
                ],
                "failure": [{"request_range": {"key": k}} for k in keys],
            }
            try:
                data = await self._call("/v3/kv/txn", txn)
            except LeaseNotFoundError:
                dead = await self._dead_leases({items[i][2] for i in todo if items[i][2]})
                if not dead:
                    continue  # nothing dead now: the next round finds out again
                for i in todo:
                    if items[i][2] in dead:
                        outcomes[i] = LeaseNotFoundError(
                            f"lease {items[i][2]} not found (it expired or was revoked)"
                        )
                todo = [i for i in todo if items[i][2] not in dead]
                continue
            if data.get("succeeded", False):
                revision = _int(data.get("header", {}), "revision")
                for i in todo:
                    key, value, lease = items[i]
                    # every write of one txn has the txn's revision; a created key is version 1
                    outcomes[i] = (True, KeyValue(key, bytes(value), revision, revision, 1, lease))
                return
            left = []
            for i, kv in zip(todo, _read_back(data, len(todo)), strict=True):
                if kv is not None:
                    outcomes[i] = (False, kv)
                else:
                    left.append(i)  # absent: created in the next round
            todo = left

    async def _dead_leases(self, leases: set[int]) -> set[int]:
        dead: set[int] = set()
        for lease in sorted(leases):
            if await self.time_to_live(lease) is None:
                dead.add(lease)
        return dead

    async def get_many(self, keys: Sequence[str]) -> list[KeyValue | None]:
        check_distinct(keys)
        found: list[KeyValue | None] = [None] * len(keys)
        step = self.max_txn_ops

        async def chunk(start: int) -> None:
            part = keys[start : start + step]
            txn = {"success": [{"request_range": {"key": _b64(key)}} for key in part]}
            data = await self._call("/v3/kv/txn", txn)
            for n, kv in enumerate(_read_back(data, len(part))):
                found[start + n] = kv

        await self._each_chunk(len(keys), chunk)
        return found

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

    async def delete_many(self, items: Sequence[tuple[str, int]]) -> list[bool]:
        check_distinct([key for key, _ in items])
        done = [False] * len(items)
        step = self.max_txn_ops

        async def chunk(start: int) -> None:
            await self._delete_chunk(items, list(range(start, min(start + step, len(items)))), done)

        await self._each_chunk(len(items), chunk)
        return done

    async def _delete_chunk(
        self, items: Sequence[tuple[str, int]], todo: list[int], done: list[bool]
    ) -> None:
        """Delete ``items[i]`` for i in ``todo`` (at most max_txn_ops): one txn compares
        every key's mod revision with the one given and deletes them all; if any differs,
        the failure branch reads them all, the ones that differ (or are gone) are answered
        False and the txn runs again for the rest. Each round answers at least one key.
        A txn of deletes only is accepted even when etcd is out of space (NOSPACE)."""
        while todo:
            keys = [_b64(items[i][0]) for i in todo]
            txn = {
                "compare": [
                    {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(items[i][1])}
                    for k, i in zip(keys, todo, strict=True)
                ],
                "success": [{"request_delete_range": {"key": k}} for k in keys],
                "failure": [{"request_range": {"key": k}} for k in keys],
            }
            data = await self._call("/v3/kv/txn", txn)
            if data.get("succeeded", False):
                for i in todo:
                    done[i] = True
                return
            left = []
            for i, kv in zip(todo, _read_back(data, len(todo)), strict=True):
                if kv is not None and kv.mod_revision == items[i][1]:
                    left.append(i)  # still the one asked: deleted in the next round
            if len(left) == len(todo):
                raise StoreError("etcd refused a guarded delete whose revisions all match")
            todo = left

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

    async def lease_keys(self, lease: int) -> list[str] | None:
        data = await self._call("/v3/lease/timetolive", {"ID": str(lease), "keys": True})
        if _int(data, "TTL") < 0:
            return None
        return sorted(_unb64(k).decode() for k in data.get("keys") or [])

    async def revoke(self, lease: int) -> bool:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except LeaseNotFoundError:
            return False
        return True

    # ------------------------------------------------------------ maintenance

    async def status(self) -> StoreStatus:
        data = await self._call("/v3/maintenance/status", {})
        alarms = await self._alarms()
        return StoreStatus(
            revision=_int(data.get("header", {}), "revision"),
            db_size=_int(data, "dbSize"),
            db_size_in_use=_int(data, "dbSizeInUse") or _int(data, "dbSize"),
            alarms=tuple(sorted({alarm for _, alarm in alarms})),
        )

    async def _alarms(self) -> list[tuple[str, str]]:
        """(member id, alarm name) of every alarm raised in the etcd cluster."""
        data = await self._call("/v3/maintenance/alarm", {"action": "GET"})
        return [
            (str(a.get("memberID", "0")), str(a.get("alarm", "NONE")))
            for a in data.get("alarms") or []
            if a.get("alarm", "NONE") != "NONE"
        ]

    async def compact(self, revision: int) -> None:
        check_revision(revision)
        try:
            # physical: answer once the compacted entries are gone from the backend (a
            # defragmentation right after, as a full store's recovery does, frees them;
            # without it etcd compacts in the background and the defragmentation can
            # run first and free nothing, and a full store then stays full)
            await self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        except StoreError as exc:
            if "has been compacted" in str(exc):
                return  # another PD (or etcd's auto-compaction) got there first
            raise

    async def defragment(self) -> None:
        # per member: each endpoint defragments its own file
        for endpoint in self.endpoints:
            await self._call(
                "/v3/maintenance/defragment",
                {},
                endpoint=endpoint,
                wait=max(self.timeout, DEFRAG_TIMEOUT),
            )

    async def disarm(self) -> None:
        for member, alarm in await self._alarms():
            if alarm == NOSPACE:
                body = {"action": "DEACTIVATE", "memberID": member, "alarm": alarm}
                await self._call("/v3/maintenance/alarm", body)
