"""One sink worker: drains its spool into its sink, oldest batch first.

Owns what happens after a failure: exponential backoff with jitter (or the server's
Retry-After), re-spooling only the rows to retry, dead-lettering rejected rows, the optional
retry limit, the bandwidth cap and the priority between sinks. A sink itself only raises.

Two guards keep a bad endpoint visible without flooding anyone:

- **Deadlines.** Every ``open`` and ``write`` runs under a deadline (:func:`call_deadline`): a
  server that accepts the connection and never answers costs one deadline, then the batch goes
  back to the spool as a transient failure. While a call is in flight ``SinkState.inflight_since``
  is set, so telemetry turns ``sink_up`` to 0 and ``/health`` to 503 with "no answer for N s"
  as soon as the call is older than ``telemetry.unhealthy_after``, long before the deadline.
- **Repeated errors are logged once with a count** (:class:`RepeatedLog`): the first occurrence,
  then at most one line a minute saying how often it repeated, and one when the sink recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import polars as pl

from collector import redact
from collector.config import Component
from collector.errors import PartialWriteError, PermanentSinkError, TransientSinkError
from collector.plugin import Counters, Sink
from collector.runtime.spool import Spool, SpoolItem
from collector.runtime.telemetry import SinkState

log = logging.getLogger("collector")
T = TypeVar("T")

DEFAULT_DEADLINE = 120.0
"""Seconds one ``write`` may take when the sink names no ``deadline`` of its own."""
MIN_UPLOAD_RATE = 32 * 1024
"""Bytes/s every uplink is assumed to reach: a batch gets ``nbytes / MIN_UPLOAD_RATE`` seconds
on top of the deadline, so a big batch on a slow GSM link is never cut off (and then retried
forever) by a deadline meant for a silent server."""
OPEN_DEADLINE = 60.0
"""Seconds ``Sink.open`` may take (connect, a cluster's ``GET /``, an index template)."""


def call_deadline(sink: Sink, nbytes: int = 0) -> float:
    """Seconds a ``write`` of ``nbytes`` may take before it is abandoned as "no answer".

    A sink may define ``deadline`` (seconds, its own timeouts times its own retries); else
    :data:`DEFAULT_DEADLINE`. Either way the transfer time at :data:`MIN_UPLOAD_RATE` is added.
    """
    own = getattr(sink, "deadline", None)
    base = float(own) if isinstance(own, int | float) and own > 0 else DEFAULT_DEADLINE
    return base + nbytes / MIN_UPLOAD_RATE


class NoAnswerError(TransientSinkError):
    """A sink call passed its deadline: the endpoint accepted and never answered."""


class RepeatedLog:
    """Logs an error the first time, then at most once per ``every`` seconds with a count.

    A sink whose endpoint is down fails on every retry, and a backoff capped at a few seconds
    would otherwise write the same WARNING five times a second. Messages are compared with
    their digits masked, so "batch 000000000012" and "batch 000000000013" count as the same.
    """

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self.logger = logger
        self.every = every
        self._key: str | None = None
        self._level = logging.WARNING
        self._repeats = 0
        self._last_emit = 0.0

    @staticmethod
    def _mask(message: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "#", message)

    def __call__(self, level: int, message: str, *, exc_info: Any = None) -> bool:
        """Log ``message`` unless it repeats the last one within ``every``; True if logged."""
        now = time.monotonic()
        key = self._mask(message)
        if key == self._key and now - self._last_emit < self.every:
            self._repeats += 1
            return False
        if key == self._key and self._repeats:
            message += f" (repeated {self._repeats} times in {now - self._last_emit:.0f} s)"
        else:
            self.flush()
        self.logger.log(level, message, exc_info=exc_info)
        self._key, self._level, self._repeats, self._last_emit = key, level, 0, now
        return True

    def flush(self, note: str = "") -> None:
        """Say how often the last error repeated since it was logged (on recovery, or a new
        error), so no occurrence goes uncounted."""
        if self._key is not None and self._repeats:
            self.logger.log(
                self._level,
                "the last error repeated %d more times%s",
                self._repeats,
                note,
            )
        self._key, self._repeats = None, 0


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
        self.errors = RepeatedLog(log)
        self._went_silent = False

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
        st.last_error = redact.text(f"{type(exc).__name__}: {exc}")[:500]
        st.last_error_at = now
        self._went_silent = isinstance(exc, NoAnswerError)
        st.failing_since = st.failing_since or now
        self.counters.inc("retries_total", sink=self.name)

    def _succeeded(self, seconds: float) -> None:
        st = self.state
        st.last_success = time.time()
        st.consecutive_failures = 0
        st.failing_since = None
        st.latency_sum += seconds
        st.latency_count += 1
        self.errors.flush(f" before sink {self.name} recovered")

    async def _call(self, what: str, call: Awaitable[T], deadline: float) -> T:
        """Await a sink call under ``deadline``, marking it in flight for telemetry.

        On expiry the call is cancelled and :class:`NoAnswerError` (transient) raised: the
        batch stays in the spool and the next try opens the sink again.
        """
        st = self.state
        st.inflight_since = time.time()
        st.inflight_what = what
        try:
            return await asyncio.wait_for(call, timeout=deadline)
        except TimeoutError:
            raise NoAnswerError(
                f"{what}: no answer for {deadline:.0f} s (deadline); will retry"
            ) from None
        finally:
            st.inflight_since = None
            st.inflight_what = None

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
                    await self._call("open", self.sink.open(), OPEN_DEADLINE)
                    opened = True
                    self.state.consecutive_failures = 0  # retries count sends, not connects
                except Exception as exc:
                    self._failed(exc)
                    self.errors(logging.WARNING, f"sink {self.name} cannot open: {exc}")
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
                self.errors(  # a disk error is the environment, not a bug: no traceback
                    logging.ERROR,
                    f"sink {self.name}: delivery step failed: {exc}",
                    exc_info=not isinstance(exc, OSError),
                )
                self.spool.release_if_inflight(item)
                self._failed(exc)
                self._backoff()
            if self._went_silent:
                opened = await self._reopen()

    async def _send(self, item: SpoolItem) -> None:
        frame = self.spool.read(item)
        t0 = time.monotonic()
        try:
            await self._call(
                f"write {item.batch_id}",
                self.sink.write(
                    frame.to_arrow() if self.sink.arrow_batches else frame, item.batch_id
                ),
                call_deadline(self.sink, item.nbytes),
            )
        except PartialWriteError as exc:
            self._partial(item, frame, exc, t0)
        except PermanentSinkError as exc:
            self.spool.dead_letter(frame, str(exc), item.batch_id)
            self.spool.done(item, delivered_rows=0)
            self.errors(
                logging.ERROR, f"sink {self.name} rejected batch {item.batch_id} for good: {exc}"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # transient, or a sink bug: the batch waits, never lost
            self._failed(exc)
            if self._give_up(item, frame):
                return
            self.spool.release(item)
            hint = exc.retry_after if isinstance(exc, TransientSinkError) else None
            delay = self._backoff(hint)
            if isinstance(exc, TransientSinkError):
                self.errors(logging.WARNING, f"sink {self.name}: {exc}; retry in {delay:.1f}s")
            else:
                self.errors(
                    logging.ERROR,
                    f"sink {self.name} raised an unexpected error: {type(exc).__name__}: {exc}; "
                    f"retry in {delay:.1f}s",
                    exc_info=exc,
                )
        else:
            self.spool.done(item)
            self._succeeded(time.monotonic() - t0)

    def _partial(
        self, item: SpoolItem, frame: pl.DataFrame, exc: PartialWriteError, t0: float
    ) -> None:
        retry, rejected = _frame(exc.retry_rows), _frame(exc.rejected_rows)
        delivered = (
            frame.height
            - (retry.height if retry is not None else 0)
            - (rejected.height if rejected is not None else 0)
        )
        self.counters.inc("delivered_rows_total", delivered, sink=self.name)
        if rejected is not None:
            self.spool.dead_letter(rejected, exc.reasons or str(exc), item.batch_id)
        if rejected is not None:
            self.errors(
                logging.ERROR,
                f"sink {self.name}: {rejected.height} rows of batch {item.batch_id} to the "
                f"dead letter: {exc}",
            )
        if retry is not None:
            self.spool.replace(item, retry)
            self._failed(exc)
            delay = self._backoff()
            self.errors(logging.WARNING, f"sink {self.name}: {exc}; retry in {delay:.1f}s")
        else:  # every row is settled: the sink works, only some data was bad
            self.spool.done(item, delivered_rows=0)
            self._succeeded(time.monotonic() - t0)

    def _give_up(self, item: SpoolItem, frame: pl.DataFrame) -> bool:
        """`spool.max_retries`: after that many failures in a row, dead-letter this batch."""
        limit = self.settings.max_retries
        if limit is None or self.state.consecutive_failures <= limit:
            return False
        reason = f"gave up after {limit} retries: {self.state.last_error}"
        self.spool.dead_letter(frame, reason, item.batch_id)
        self.spool.done(item, delivered_rows=0)
        self.state.consecutive_failures = 0
        self.backoff_until = 0
        return True

    async def _reopen(self) -> bool:
        """After a call passed its deadline: drop the connection that went silent.

        A pooled connection to a server that stopped answering would be reused by the next
        try; closing the sink makes the next try connect afresh. Returns ``opened`` (False).
        """
        self._went_silent = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sink.close(), timeout=10)
        return False

    async def _sleep_or_wake(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.sink.close(), timeout=10)
        except Exception as exc:
            log.warning("sink %s close: %s", self.name, exc)


def _frame(rows: Any) -> pl.DataFrame | None:
    """Rows a sink handed back, as a frame (an ``arrow_batches`` sink's are Arrow); None if
    there are none."""
    if rows is None:
        return None
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows)
    return frame if frame.height else None
