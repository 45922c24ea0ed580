"""One sink worker: drains its spool into its sink, oldest batch first.

Owns what happens after a failure: exponential backoff with jitter (or the server's
Retry-After), re-spooling only the rows to retry, dead-lettering rejected rows, the optional
retry limit, the bandwidth cap and the priority between sinks. A sink itself only raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence

import pyarrow as pa

from collector.config import Component
from collector.errors import PartialWriteError, PermanentSinkError, TransientSinkError
from collector.plugin import Counters, Sink
from collector.runtime.spool import Spool, SpoolItem
from collector.runtime.telemetry import SinkState

log = logging.getLogger("collector")


class TokenBucket:
    """Bytes-per-second cap on a sink's uploads (one file may exceed the burst)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class SinkWorker:
    """The delivery loop of one sink."""

    def __init__(
        self,
        component: Component,
        sink: Sink,
        spool: Spool,
        state: SinkState,
        counters: Counters,
        shutdown_timeout: float,
    ) -> None:
        self.component = component
        self.name = component.name
        self.sink = sink
        self.spool = spool
        self.state = state
        self.counters = counters
        self.shutdown_timeout = shutdown_timeout
        self.settings = component.config.spool
        self.wake = asyncio.Event()
        self.backoff_until = 0.0
        self.finished = False
        self.peers: Sequence[SinkWorker] = ()

    # -- decisions ----------------------------------------------------------------------------

    def blocked_by_priority(self) -> bool:
        """A more important sink (lower `priority`) has backlog and is not backing off."""
        now = time.monotonic()
        return any(
            o.settings.priority < self.settings.priority
            and o.spool.has_ready()
            and o.backoff_until <= now
            and not o.finished
            and not o.gave_up()
            for o in self.peers
            if o is not self
        )

    def gave_up(self) -> bool:
        """While stopping: a sink failing for longer than `shutdown_timeout` keeps its spool."""
        since = self.state.failing_since
        return since is not None and time.time() - since > self.shutdown_timeout

    def _backoff(self, hint: float | None = None) -> float:
        sp = self.settings
        n = self.state.consecutive_failures
        delay = min(sp.retry_cap, sp.retry_base * 2 ** max(0, n - 1)) * random.uniform(0.5, 1.0)
        if hint is not None:
            delay = max(delay, min(hint, sp.retry_cap))
        self.backoff_until = time.monotonic() + delay
        return delay

    def _failed(self, exc: BaseException) -> None:
        now = time.time()
        st = self.state
        st.consecutive_failures += 1
        st.last_error = f"{type(exc).__name__}: {exc}"[:500]
        st.last_error_at = now
        st.failing_since = st.failing_since or now
        self.counters.inc("retries_total", sink=self.name)

    def _succeeded(self, seconds: float) -> None:
        st = self.state
        st.last_success = time.time()
        st.consecutive_failures = 0
        st.failing_since = None
        st.latency_sum += seconds
        st.latency_count += 1

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, draining: Callable[[], bool]) -> None:
        """Deliver until ``draining()`` and the spool is empty (or the sink gave up)."""
        try:
            await self._loop(draining)
        finally:
            self.finished = True  # lower-priority sinks stop waiting for this one

    async def _loop(self, draining: Callable[[], bool]) -> None:
        bucket = TokenBucket(self.settings.bandwidth) if self.settings.bandwidth else None
        opened = False
        while True:
            if draining() and self.gave_up():
                return
            wait = self.backoff_until - time.monotonic()
            if wait > 0:  # short steps, so a stop is noticed during a long backoff
                await asyncio.sleep(min(wait, 0.5))
                continue
            if not opened:
                try:
                    await self.sink.open()
                    opened = True
                    self.state.consecutive_failures = 0  # retries count sends, not connects
                except Exception as exc:
                    self._failed(exc)
                    log.warning("sink %s cannot open: %s", self.name, exc)
                    self._backoff()
                    continue
            if self.blocked_by_priority():
                await self._sleep_or_wake(0.2)
                continue
            item = self.spool.claim()
            if item is None:
                if draining():
                    return
                await self._sleep_or_wake(1.0)
                continue
            try:
                if bucket is not None:
                    await bucket.take(item.nbytes)
                await self._send(item)
            except asyncio.CancelledError:
                self.spool.release_if_inflight(item)
                raise
            except Exception as exc:  # spool I/O (a full disk): the batch stays, retried later
                log.exception("sink %s: delivery step failed", self.name)
                self.spool.release_if_inflight(item)
                self._failed(exc)
                self._backoff()

    async def _send(self, item: SpoolItem) -> None:
        table = self.spool.read(item)
        t0 = time.monotonic()
        try:
            await self.sink.write(table, item.batch_id)
        except PartialWriteError as exc:
            self._partial(item, table, exc)
        except PermanentSinkError as exc:
            self.spool.dead_letter(table, str(exc), item.batch_id)
            self.spool.done(item, delivered_rows=0)
            log.error("sink %s rejected batch %s for good: %s", self.name, item.batch_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # transient, or a sink bug: the batch waits, never lost
            self._failed(exc)
            if not isinstance(exc, TransientSinkError):
                log.exception("sink %s raised an unexpected error", self.name)
            if self._give_up(item, table):
                return
            self.spool.release(item)
            hint = exc.retry_after if isinstance(exc, TransientSinkError) else None
            delay = self._backoff(hint)
            log.warning("sink %s: %s; retry in %.1fs", self.name, exc, delay)
        else:
            self.spool.done(item)
            self._succeeded(time.monotonic() - t0)

    def _partial(self, item: SpoolItem, table: pa.Table, exc: PartialWriteError) -> None:
        retry = exc.retry_rows if exc.retry_rows is not None and exc.retry_rows.num_rows else None
        rejected = exc.rejected_rows
        if rejected is not None and not rejected.num_rows:
            rejected = None
        delivered = (
            table.num_rows
            - (retry.num_rows if retry else 0)
            - (rejected.num_rows if rejected else 0)
        )
        self.counters.inc("delivered_rows_total", delivered, sink=self.name)
        if rejected is not None:
            self.spool.dead_letter(rejected, exc.reasons or str(exc), item.batch_id)
        if retry is not None:
            self.spool.replace(item, retry)
            self._failed(exc)
            self._backoff()
        else:
            self.spool.done(item, delivered_rows=0)

    def _give_up(self, item: SpoolItem, table: pa.Table) -> bool:
        """`spool.max_retries`: after that many failures in a row, dead-letter this batch."""
        limit = self.settings.max_retries
        if limit is None or self.state.consecutive_failures <= limit:
            return False
        reason = f"gave up after {limit} retries: {self.state.last_error}"
        self.spool.dead_letter(table, reason, item.batch_id)
        self.spool.done(item, delivered_rows=0)
        self.state.consecutive_failures = 0
        self.backoff_until = 0
        return True

    async def _sleep_or_wake(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.sink.close(), timeout=10)
        except Exception as exc:
            log.warning("sink %s close: %s", self.name, exc)
