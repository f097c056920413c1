"""Micro-batching: requests that arrive within a short window are handled as one batch on one thread.

Encoding queries and searching Faiss cost much less per query in a batch (one forward pass, one BLAS call)
than one by one, and a single worker thread means one index version is searched at a time, so a version
switch between batches can never mix two versions inside a request. Written here because the pattern is
a few lines over `queue` and `concurrent.futures`; the serving frameworks that do it (Ray Serve's
@serve.batch, Triton) bring a whole deployment system with them."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class Busy(Exception):
    """More work is waiting than the server queues (`max_pending`)."""


@dataclass
class _Job:
    payload: Any
    size: int
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    items: int = 0
    largest: int = 0
    busy_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.jobs, "queries": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0,
                "busy_s": round(self.busy_s, 3)}


class MicroBatcher:
    """Runs `handle(payloads) -> results` (one result per payload, in order; an Exception instance fails
    that payload's request alone) on batches of submitted jobs.

    A batch opens with the first waiting job and takes every job already waiting, then waits up to
    `window_s` for more, closing at `max_batch` items (queries); one job larger than `max_batch` is a batch
    of its own. Under load the requests that arrive while a batch runs make the next batch, so even
    `window_s=0` batches; the window adds batching at light load for latency. `max_batch=1` serves one
    request at a time. `before_batch` runs on the worker thread before each batch and, every `idle_s` without work, on
    its own (a server's hot reload). An exception in `handle` for a batch of several requests retries them one
    by one, so that one bad request fails alone, never the others that shared its batch."""

    def __init__(self, handle: Callable[[list[Any]], Sequence[Any]], *, window_s: float, max_batch: int,
                 max_pending: int, before_batch: Callable[[], None] | None = None, idle_s: float = 1.0,
                 name: str = "ragkit-batcher") -> None:
        self.handle, self.window_s, self.max_batch, self.max_pending = handle, window_s, max_batch, max_pending
        self.before_batch, self.idle_s = before_batch, idle_s
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._carry: _Job | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, payload: Any, size: int = 1) -> Future:
        with self._lock:
            if self._pending + size > self.max_pending:
                raise Busy(f"{self._pending} queries are waiting (the server queues at most {self.max_pending})")
            self._pending += size
        job = _Job(payload, size)
        self._queue.put(job)
        return job.future

    async def run(self, payload: Any, size: int, timeout_s: float) -> Any:
        """Submit and wait; a request that times out is dropped from the queue if it has not started."""
        future = self.submit(payload, size)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # -- the worker thread --------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        return self._queue.get(timeout=timeout)

    def _loop(self) -> None:
        while True:
            try:
                first = self._next(self.idle_s)
            except queue.Empty:
                self._run_hook()
                continue
            if first is None:
                return
            batch, size, closing = [first], first.size, False
            deadline = time.perf_counter() + self.window_s
            while size < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:  # past the window, still take what is already waiting (it queued during the last batch)
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                if size + job.size > self.max_batch:
                    self._carry = job
                    break
                batch.append(job)
                size += job.size
            self._run(batch)
            if closing:
                return

    def _alone(self, job: _Job) -> Any:
        try:
            return self.handle([job.payload])[0]
        except Exception as exc:  # noqa: BLE001 (this request's own failure)
            return exc

    def _run_hook(self) -> None:
        if self.before_batch is not None:
            try:
                self.before_batch()
            except Exception:  # a failed reload keeps the version being served; the hook reports it
                pass

    def _run(self, batch: list[_Job]) -> None:
        with self._lock:
            self._pending -= sum(job.size for job in batch)
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # timed-out ones drop here
        if not live:
            return
        self._run_hook()
        started = time.perf_counter()
        try:
            try:
                results = list(self.handle([job.payload for job in live]))
            except Exception:  # noqa: BLE001 (which request caused it is found by running each alone)
                if len(live) == 1:
                    raise
                results = [self._alone(job) for job in live]
        except BaseException as exc:  # noqa: BLE001 (delivered to the requests, never kills the worker)
            for job in live:
                job.future.set_exception(exc)
        else:
            for job, result in zip(live, results):
                if isinstance(result, Exception):  # that request's own error (a bad mode for this index, ...)
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self.stats.batches += 1
            self.stats.jobs += len(live)
            self.stats.items += sum(job.size for job in live)
            self.stats.largest = max(self.stats.largest, sum(job.size for job in live))
            self.stats.busy_s += time.perf_counter() - started
