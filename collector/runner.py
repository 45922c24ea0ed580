"""The runtime: the only part that knows about threads, retries, timers and disks.

    sources ──▶ device log ──▶ pipeline (thread) ──▶ spool per sink ──▶ sink worker per sink

Sources append to the log; one consumer thread advances the deterministic ``Pipeline`` over the
log and writes cut batches to the spools, checkpointing its state with the log offset; one
asyncio worker per sink drains its spool with backoff, partial re-spooling and dead letters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from collector.config import Component, LoadedConfig
from collector.errors import (
    PartialWriteError,
    PermanentSinkError,
    TransientSinkError,
)
from collector.fsutil import atomic_write
from collector.log import DeviceLog, Kind
from collector.pipeline import Batch, Pipeline, Route
from collector.plugin import Context, Counters, Sink, Source, Transform
from collector.schema import normalize
from collector.spool import Spool
from collector.telemetry import SinkState, Telemetry

log = logging.getLogger("collector")


class _Abort(Exception):
    """The consumer stopped mid-entry (shutdown while a spool was full): do not checkpoint."""


@dataclass
class _SinkRun:
    component: Component
    sink: Sink
    spool: Spool
    state: SinkState
    wake: asyncio.Event
    backoff_until: float = 0.0


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


class Runtime:
    """One run of one config: build, start, stop. A SIGHUP reload builds a new Runtime."""

    def __init__(self, cfg: LoadedConfig, data_dir: Path | None = None) -> None:
        self.cfg = cfg
        s = cfg.settings
        self.data_dir = Path(data_dir or s.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.counters = Counters()
        self.log = DeviceLog(
            self.data_dir / "log", s.log.fsync, s.log.fsync_interval, s.log.segment_bytes
        )
        self.telemetry = Telemetry(
            self.counters, self.data_dir, s.telemetry.unhealthy_after, log_bytes=self.log.size_bytes
        )
        self.sources = [(c, c.cls(c.config, self._ctx(c.name))) for c in cfg.sources]
        self.transform_ctx = [self._ctx(c.name) for c in cfg.transforms]
        transforms: list[Transform] = [
            c.cls(c.config, ctx) for c, ctx in zip(cfg.transforms, self.transform_ctx, strict=True)
        ]  # type: ignore[misc]
        self.sinks: dict[str, _SinkRun] = {}
        routes = []
        for c in cfg.sinks:
            self.telemetry.sinks[c.name] = state = SinkState()
            spool = Spool(self.data_dir / "spool" / c.name, c.config.spool, c.name, self.counters)
            self.sinks[c.name] = _SinkRun(
                c, c.cls(c.config, self._ctx(c.name)), spool, state, asyncio.Event()
            )  # type: ignore[arg-type]
            routes.append(Route(c.name, c.config.where, c.config.batch))
        self.pipeline = Pipeline(transforms, routes)
        self.checkpoint_path = self.data_dir / "state" / "checkpoint.pkl"
        self._restore()
        for t in self.pipeline.transforms:  # after restore: it replaces the objects
            opener = getattr(t, "open", None)
            if callable(opener):
                opener()  # e.g. loads a model; a ConfigError here stops the start (exit 2)
        self._new_data = threading.Event()
        self._stop = threading.Event()
        self._consumer_done = threading.Event()
        self._last_checkpoint = 0.0
        self._last_append = time.monotonic()
        self._ticks: set[asyncio.Task[Any]] = set()
        self._log_errors = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def _ctx(self, component: str) -> Context:
        return Context(
            device=self.cfg.settings.device,
            component=component,
            data_dir=self.data_dir,
            counters=self.counters,
        )

    # -- checkpoints ------------------------------------------------------------------------

    def _restore(self) -> None:
        if not self.checkpoint_path.exists():
            return
        same = self.pipeline.restore(
            self.checkpoint_path.read_bytes(),
            self.cfg.transforms_fingerprint,
            self.transform_ctx,
            [c.config for c in self.cfg.transforms],
        )
        if not same:
            log.warning("transforms changed since the last run: their state starts empty")
        log.info("resuming after log offset %d", self.pipeline.offset)

    def _checkpoint(self) -> None:
        """Commit transform state + offset; then the log below it can go."""
        self._last_checkpoint = time.monotonic()
        blob = self.pipeline.snapshot(self.cfg.transforms_fingerprint)
        try:
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.checkpoint_path, lambda tmp: Path(tmp).write_bytes(blob))
        except OSError as exc:  # disk full: keep the log, the next checkpoint may succeed
            log.error("cannot write checkpoint: %s", exc)
            return
        self.log.truncate_before(self.pipeline.offset + 1)

    # -- sources ----------------------------------------------------------------------------

    def _append(self, data: Any, source: Component) -> int:
        cfg = source.config
        df = normalize(
            data,
            device=self.cfg.settings.device,
            source=source.name,
            now=datetime.now(UTC),
            units=cfg.units,
            tags=cfg.tags,
        )
        if df.height == 0:
            return 0
        try:
            self.log.append(df.to_arrow(), Kind.DATA)
        except OSError as exc:  # disk full: count the loss, keep running
            self.counters.inc("dropped_rows_total", df.height, sink="*", reason="log_write")
            self._log_errors += 1
            if self._log_errors in (1, 10, 100) or self._log_errors % 1000 == 0:
                log.error("device log write failed (%d times so far), readings lost: %s",
                          self._log_errors, exc)
            return 0
        self._log_errors = 0
        self.counters.inc("rows_in_total", df.height, source=source.name)
        self._last_append = time.monotonic()
        self._new_data.set()
        return df.height

    async def _tick(self, comp: Component, source: Source) -> None:
        task = asyncio.current_task()
        if task is not None:  # a stop waits for ticks in flight: their readings get logged
            self._ticks.add(task)
            task.add_done_callback(self._ticks.discard)
        try:
            if inspect.iscoroutinefunction(source.read):
                data = await source.read()
            else:
                data = await asyncio.to_thread(source.read)
            await asyncio.to_thread(self._append, data, comp)
        except Exception as exc:
            self.counters.inc("source_errors_total", source=comp.name)
            log.warning("source %s: %s", comp.name, exc)

    async def _stream(self, comp: Component, source: Source) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                async for data in source.stream():
                    await asyncio.to_thread(self._append, data, comp)
                    delay = 1.0
                if getattr(source, "finite", False):
                    return
                log.warning("source %s ended; restarting in %.0fs", comp.name, delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counters.inc("source_errors_total", source=comp.name)
                log.warning("source %s failed: %s; restarting in %.0fs", comp.name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    # -- consumer (thread) ------------------------------------------------------------------

    def _consume(self, drain_only: bool = False) -> None:
        """Advance the pipeline over new log entries until stopped; spool what it cuts."""
        every = self.cfg.settings.log.checkpoint_every
        while True:
            self._new_data.clear()
            start, end = self.pipeline.offset + 1, self.log.next_offset
            if start < end:
                try:
                    for entry in self.log.read(start, end):
                        for batch in self.pipeline.process(entry):
                            self._spool(batch)
                except _Abort:
                    return
                if time.monotonic() - self._last_checkpoint >= every:
                    self._checkpoint()
                continue
            if self._stop.is_set() or drain_only:
                self._checkpoint()
                return
            self._new_data.wait(0.5)

    def _spool(self, batch: Batch) -> None:
        """Hand a batch to its spool; with `when_full: block` wait here (the log holds data)."""
        run = self.sinks[batch.sink]
        waited = 0.0
        while True:
            try:
                result = run.spool.put(
                    batch.table, batch.batch_id, created_ms=batch.wall_us // 1000, wait_if_full=True
                )
            except OSError as exc:
                log.error(
                    "spool %s: cannot write batch %s (%s); retrying",
                    batch.sink,
                    batch.batch_id,
                    exc,
                )
                result = "full"
            if result != "full":
                break
            if self._stop.is_set() and waited >= self.cfg.settings.shutdown_timeout:
                raise _Abort  # the log keeps these rows; the next start replays them
            time.sleep(0.2)
            waited += 0.2
        if self.loop is not None:
            self.loop.call_soon_threadsafe(run.wake.set)

    # -- sink workers -----------------------------------------------------------------------

    def _blocked_by_priority(self, run: _SinkRun) -> bool:
        me = run.component.config.spool.priority
        now = time.monotonic()
        return any(
            o.component.config.spool.priority < me
            and o.spool.has_ready()
            and o.backoff_until <= now
            for o in self.sinks.values()
            if o is not run
        )

    def _backoff(self, run: _SinkRun, hint: float | None = None) -> float:
        sp = run.component.config.spool
        n = run.state.consecutive_failures
        delay = min(sp.retry_cap, sp.retry_base * 2 ** max(0, n - 1)) * random.uniform(0.5, 1.0)
        if hint is not None:
            delay = max(delay, min(hint, sp.retry_cap))
        run.backoff_until = time.monotonic() + delay
        return delay

    def _failed(self, run: _SinkRun, exc: BaseException) -> None:
        now = time.time()
        st = run.state
        st.consecutive_failures += 1
        st.last_error = f"{type(exc).__name__}: {exc}"[:500]
        st.last_error_at = now
        st.failing_since = st.failing_since or now
        self.counters.inc("retries_total", sink=run.component.name)

    async def _worker(self, run: _SinkRun, draining: Callable[[], bool]) -> None:
        name = run.component.name
        spool = run.spool
        cfg = run.component.config.spool
        bucket = TokenBucket(cfg.bandwidth) if cfg.bandwidth else None
        opened = False
        while True:
            if draining() and self._gave_up(run):
                return
            wait = run.backoff_until - time.monotonic()
            if wait > 0:  # short steps, so a stop is noticed during a long backoff
                await asyncio.sleep(min(wait, 0.5))
                continue
            if not opened:
                try:
                    await run.sink.open()
                    opened = True
                except Exception as exc:
                    self._failed(run, exc)
                    log.warning("sink %s cannot open: %s", name, exc)
                    self._backoff(run)
                    continue
            if self._blocked_by_priority(run):
                await self._sleep_or_wake(run, 0.2)
                continue
            item = spool.claim()
            if item is None:
                if draining():
                    return
                await self._sleep_or_wake(run, 1.0)
                continue
            if bucket is not None:
                await bucket.take(item.nbytes)
            table = spool.read(item)
            t0 = time.monotonic()
            try:
                await run.sink.write(table, item.batch_id)
            except PartialWriteError as exc:
                self._partial(run, item, table, exc)
            except PermanentSinkError as exc:
                spool.dead_letter(table, str(exc), item.batch_id)
                spool.done(item, delivered_rows=0)
                log.error("sink %s rejected batch %s for good: %s", name, item.batch_id, exc)
            except asyncio.CancelledError:
                spool.release(item)
                raise
            except Exception as exc:  # transient, or a sink bug: the batch waits, never lost
                spool.release(item)
                self._failed(run, exc)
                if not isinstance(exc, TransientSinkError):
                    log.exception("sink %s raised an unexpected error", name)
                hint = exc.retry_after if isinstance(exc, TransientSinkError) else None
                delay = self._backoff(run, hint)
                log.warning("sink %s: %s; retry in %.1fs", name, exc, delay)
                self._give_up_if_needed(run)
            else:
                spool.done(item)
                st = run.state
                st.last_success = time.time()
                st.consecutive_failures = 0
                st.failing_since = None
                st.latency_sum += time.monotonic() - t0
                st.latency_count += 1

    def _partial(self, run: _SinkRun, item: Any, table: pa.Table, exc: PartialWriteError) -> None:
        retry = exc.retry_rows if exc.retry_rows is not None and exc.retry_rows.num_rows else None
        rejected = (
            exc.rejected_rows
            if exc.rejected_rows is not None and exc.rejected_rows.num_rows
            else None
        )
        delivered = (
            table.num_rows
            - (retry.num_rows if retry else 0)
            - (rejected.num_rows if rejected else 0)
        )
        self.counters.inc("delivered_rows_total", delivered, sink=run.component.name)
        if rejected is not None:
            run.spool.dead_letter(rejected, exc.reasons or str(exc), item.batch_id)
        if retry is not None:
            run.spool.replace(item, retry)
            self._failed(run, exc)
            self._backoff(run)
        else:
            run.spool.done(item, delivered_rows=0)

    def _gave_up(self, run: _SinkRun) -> bool:
        """While stopping: a sink failing for longer than `shutdown_timeout` keeps its spool."""
        since = run.state.failing_since
        return since is not None and time.time() - since > self.cfg.settings.shutdown_timeout

    def _give_up_if_needed(self, run: _SinkRun) -> None:
        limit = run.component.config.spool.max_retries
        if limit is None or run.state.consecutive_failures <= limit:
            return
        item = run.spool.claim()
        if item is not None:
            run.spool.dead_letter(
                run.spool.read(item),
                f"gave up after {limit} retries: {run.state.last_error}",
                item.batch_id,
            )
            run.spool.done(item, delivered_rows=0)
        run.state.consecutive_failures = 0
        run.backoff_until = 0

    @staticmethod
    async def _sleep_or_wake(run: _SinkRun, seconds: float) -> None:
        run.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.wake.wait(), timeout=seconds)

    # -- housekeeping -----------------------------------------------------------------------

    def _refresh_sink_state(self) -> None:
        for run in self.sinks.values():
            run.state.spool_backlog_rows = run.spool.backlog_rows
            run.state.spool_backlog_bytes = run.spool.backlog_bytes
            run.state.spool_oldest_ms = run.spool.oldest_created_ms

    async def _housekeeping(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(0.5)
            n += 1
            if self.pipeline.has_pending() and time.monotonic() - self._last_append >= 1.0:
                await asyncio.to_thread(self._append_marker, Kind.TICK)
            for run in self.sinks.values():
                run.spool.expire()
            self._refresh_sink_state()
            if n % 4 == 0:
                await asyncio.to_thread(self.telemetry.write_status)

    def _append_marker(self, kind: Kind) -> None:
        try:
            self.log.append(None, kind)
        except OSError as exc:
            log.error("device log write failed: %s", exc)
            return
        self._last_append = time.monotonic()
        self._new_data.set()

    # -- life cycle -------------------------------------------------------------------------

    async def run(
        self,
        *,
        once: bool = False,
        duration: float | None = None,
        stop: asyncio.Event | None = None,
    ) -> int:
        """Run until ``stop`` is set (or once / for ``duration``); returns the exit code."""
        self.loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        tele = self.cfg.settings.telemetry
        if tele.enabled:
            self.telemetry.serve(tele.host, tele.port)
        self._refresh_sink_state()
        self.telemetry.write_status()  # `collector status` sees this run from its first second
        consumer = self._start_consumer()
        draining = {"on": False}
        workers = [
            asyncio.create_task(self._worker(r, lambda: draining["on"]), name=f"sink:{n}")
            for n, r in self.sinks.items()
        ]
        housekeeping = asyncio.create_task(self._housekeeping())
        opened: list[Source] = []
        tasks: list[asyncio.Task[Any]] = []
        scheduler = None
        code = 0
        try:
            for comp, src in self.sources:
                try:
                    await src.open()
                except Exception as exc:
                    log.error("source %s cannot start: %s", comp.name, exc)
                    self.counters.inc("source_errors_total", source=comp.name)
                    continue
                opened.append(src)
            if once:
                await self._run_once(opened)
            else:
                scheduler = self._schedule(opened, tasks)
                waiters = [asyncio.create_task(stop.wait())]
                if duration is not None:
                    waiters.append(asyncio.create_task(asyncio.sleep(duration)))
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
        finally:
            if scheduler is not None:
                # pause, let ticks in flight log their readings, then shut down (APScheduler's
                # shutdown cancels running coroutine jobs: their readings would miss the flush)
                scheduler.pause()
                if self._ticks:
                    await asyncio.wait(set(self._ticks),
                                       timeout=self.cfg.settings.shutdown_timeout)
                scheduler.shutdown(wait=False)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for src in opened:
                try:
                    await asyncio.wait_for(src.close(), timeout=10)
                except (Exception, asyncio.CancelledError) as exc:
                    log.warning("source close: %r", exc)
            code = await self._shutdown(consumer, workers, housekeeping, draining, once)
        return code

    def _start_consumer(self) -> asyncio.Future[None]:
        """The pipeline runs in a daemon thread: a stuck plugin can never block the exit."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def target() -> None:
            try:
                self._consume()
                done.set_result(None)
            except BaseException as exc:
                log.exception("pipeline stopped")
                done.set_exception(exc)

        threading.Thread(target=target, name="pipeline", daemon=True).start()
        return asyncio.wrap_future(done)

    async def _run_once(self, sources: list[Source]) -> None:
        by_obj = {id(s): c for c, s in self.sources}
        jobs: list[Awaitable[Any]] = []
        for src in sources:
            comp = by_obj[id(src)]
            if getattr(src, "long_lived", False):
                if getattr(src, "finite", False):
                    jobs.append(self._stream(comp, src))
                else:
                    log.warning("--once skips long-lived source %s", comp.name)
            else:
                jobs.append(self._tick(comp, src))
        await asyncio.gather(*jobs)

    def _schedule(self, sources: list[Source], tasks: list[asyncio.Task[Any]]) -> Any:
        from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        scheduler = AsyncIOScheduler(timezone="UTC")
        by_obj = {id(s): c for c, s in self.sources}

        def missed(event: Any) -> None:
            self.counters.inc("missed_ticks_total", source=event.job_id)

        scheduler.add_listener(missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        for src in sources:
            comp = by_obj[id(src)]
            if getattr(src, "long_lived", False):
                tasks.append(asyncio.create_task(self._stream(comp, src), name=comp.name))
                continue
            cfg = comp.config
            trigger = (
                CronTrigger.from_crontab(cfg.cron, timezone="UTC")
                if cfg.cron
                else IntervalTrigger(seconds=cfg.every or 5.0, timezone="UTC")
            )
            scheduler.add_job(
                self._tick,
                trigger,
                args=[comp, src],
                id=comp.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=1,
                next_run_time=None if cfg.cron else datetime.now(UTC),
            )
        scheduler.start()
        return scheduler

    async def _shutdown(
        self,
        consumer: asyncio.Task[Any],
        workers: list[asyncio.Task[Any]],
        housekeeping: asyncio.Task[Any],
        draining: dict[str, bool],
        once: bool,
    ) -> int:
        timeout = self.cfg.settings.shutdown_timeout
        try:
            await asyncio.to_thread(self._append_marker, Kind.FLUSH)
        finally:
            self._stop.set()
            self._new_data.set()
        try:
            await asyncio.wait_for(asyncio.shield(consumer), timeout=max(timeout, 30.0))
        except TimeoutError:
            log.error("pipeline did not catch up with the log; the rest is replayed next start")
        for run in self.sinks.values():
            run.wake.set()
        draining["on"] = True
        # --once delivers the whole backlog (giving up only on failing sinks); a signal gives
        # sinks `shutdown_timeout` and leaves the rest in the spool for the next start
        done, pending = await asyncio.wait(workers, timeout=None if once else timeout)
        for w in pending:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                log.error("sink worker failed: %r", t.exception())
        housekeeping.cancel()
        await asyncio.gather(housekeeping, return_exceptions=True)
        for run in self.sinks.values():
            try:
                await asyncio.wait_for(run.sink.close(), timeout=10)
            except Exception as exc:
                log.warning("sink %s close: %s", run.component.name, exc)
        self._refresh_sink_state()
        self.log.close()
        self.telemetry.write_status(running=False)
        self.telemetry.close()
        left = {n: r.spool.backlog_rows for n, r in self.sinks.items() if r.spool.backlog_rows}
        if left:
            log.warning(
                "rows kept in the spool for the next run: %s",
                ", ".join(f"{n}={v}" for n, v in left.items()),
            )
            return 1 if once else 0
        return 0


def pid_lock(data_dir: Path) -> Any:
    """One collector per data_dir: an flock on ``<data_dir>/.lock`` held for the run."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    fh = open(data_dir / ".lock", "a+")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh
