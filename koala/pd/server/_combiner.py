"""Placements of concurrent requests, sharing store requests (:class:`CreateCombiner`)."""

from __future__ import annotations

from collections import deque

import anyio

from ._errors import PDError
from ._store import CreateOutcome, Store

# Placements of concurrent requests share store requests: CREATE_SLOTS run at once, and
# the creates that arrive meanwhile leave together (up to CREATE_BATCH keys) in the next.
CREATE_SLOTS = 2
CREATE_BATCH = 512
MAX_WAITING = 1024  # requests waiting for a slot; beyond, the PD answers 503 overloaded


class _Creates:
    """One caller's items for :meth:`Store.create_many`, waiting to be sent."""

    __slots__ = ("error", "items", "lead", "outcomes", "wake")

    def __init__(self, items: list[tuple[str, bytes, int]]) -> None:
        self.items = items
        self.outcomes: list[CreateOutcome] | None = None
        self.error: BaseException | None = None
        self.lead = False  # handed a slot: it sends the next batch itself
        self.wake = anyio.Event()

    @property
    def finished(self) -> bool:
        return self.outcomes is not None or self.error is not None


class CreateCombiner:
    """``store.create_many`` shared by concurrent callers, without a timer or a task.

    At most ``slots`` store requests run at once. A caller that finds them all busy
    queues its items and waits; when a request returns, its sender answers it and, if
    callers are waiting, sends their items together (at most ``batch`` keys, first come
    first served), until its own are answered; then it hands its slot to the next
    waiter. Alone, a caller sends at once. Items of different callers never share a
    key in one request (etcd refuses it, and each caller must learn whether *it*
    created its key): a caller whose keys collide waits for the next request.
    """

    def __init__(
        self,
        store: Store,
        *,
        slots: int = CREATE_SLOTS,
        batch: int = CREATE_BATCH,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.store = store
        self.slots = slots
        self.batch = batch
        self.max_waiting = max_waiting
        self._queue: deque[_Creates] = deque()
        self._running = 0
        self.requests = 0  # store requests sent (statistics)

    async def create_many(self, items: list[tuple[str, bytes, int]]) -> list[CreateOutcome]:
        if len(self._queue) >= self.max_waiting:
            raise PDError(503, "overloaded", "too many placements are waiting; retry shortly")
        job = _Creates(items)
        self._queue.append(job)
        if self._running < self.slots:
            self._running += 1
            job.lead = True
        else:
            try:
                await job.wake.wait()  # answered, or handed a slot
            except BaseException:
                if not job.finished and job in self._queue:
                    self._queue.remove(job)
                if job.lead:
                    self._release()
                raise
        if job.lead:
            try:
                # send batches while ours waits in the queue (another sender may take it)
                while not job.finished and job in self._queue:
                    await self._send_next()
            finally:
                self._release()
            if not job.finished:  # another sender has it on its way: wait for that
                job.wake = anyio.Event()
                await job.wake.wait()
        if job.error is not None:
            raise job.error
        assert job.outcomes is not None
        return job.outcomes

    def _release(self) -> None:
        """Hand this slot to the first waiter that has none, or free it."""
        for waiting in self._queue:
            if not waiting.lead:
                waiting.lead = True
                waiting.wake.set()
                return
        self._running -= 1

    async def _send_next(self) -> None:
        jobs: list[_Creates] = []
        keys: set[str] = set()
        count = 0
        while self._queue:
            job = self._queue[0]
            if jobs and (
                count + len(job.items) > self.batch or any(k in keys for k, _, _ in job.items)
            ):
                break
            self._queue.popleft()
            jobs.append(job)
            keys.update(k for k, _, _ in job.items)
            count += len(job.items)
        merged = [item for job in jobs for item in job.items]
        self.requests += 1
        try:
            # shielded: the answer belongs to every caller in it, not only to this one;
            # the store's own timeout bounds it
            with anyio.CancelScope(shield=True):
                outcomes = await self.store.create_many(merged)
        except Exception as exc:  # each caller raises it (the store failed them all)
            for job in jobs:
                job.error = exc
                job.wake.set()
            return
        except BaseException as exc:
            for job in jobs:
                job.error = exc
                job.wake.set()
            raise
        start = 0
        for job in jobs:
            job.outcomes = outcomes[start : start + len(job.items)]
            start += len(job.items)
            job.wake.set()
