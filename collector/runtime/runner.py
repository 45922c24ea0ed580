"""The runtime: the only part that knows about threads, retries, timers and disks.

    sources ──▶ device log ──▶ pipeline (thread) ──▶ spool per sink ──▶ sink worker per sink

Sources append to the log; one consumer thread advances the deterministic ``Pipeline`` over the
log and writes cut batches to the spools, checkpointing its state with the log offset; one
asyncio worker per sink drains its spool with backoff, partial re-spooling and dead letters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from collector import redact
from collector.config import Component, LoadedConfig
from collector.errors import TransformError
from collector.plugin import Context, Counters, Source, Transform
from collector.runtime import blobs, identity, statecodec
from collector.runtime.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from collector.runtime.delivery import RepeatedLog, SinkWorker
from collector.runtime.fsutil import write_parquet
from collector.runtime.log import DeviceLog, Entry, Kind
from collector.runtime.pipeline import Batch, Pipeline, Route
from collector.runtime.quarantine import quarantine_file
from collector.runtime.spool import Spool
from collector.runtime.telemetry import SinkState, Telemetry
from collector.schema import Reject, normalize

log = logging.getLogger("collector")


FINITE_SOURCE_ATTEMPTS = 3
"""A finite source (a replay) failing this often in a row, with no data between, gives up."""
HANDOFF_BYTES = 16 * 1024 * 1024
"""Rows logged by reference wait in memory for the pipeline up to this much; beyond it the
source waits (the device log holds no copy of them to fall back on). Two chunks of a fast
replay: 64 MiB cost 100 MB more peak RSS on the throughput benchmark for no speed."""


class _Abort(Exception):
    """The consumer stopped mid-entry (shutdown while a spool was full): do not checkpoint."""


class Runtime:
    """One run of one config: build, start, stop. A SIGHUP reload builds a new Runtime."""

    def __init__(
        self, cfg: LoadedConfig, data_dir: Path | None = None, *, from_start: bool = False
    ) -> None:
        self.cfg = cfg
        self.from_start = from_start
        """Sources ignore their logged positions (``collector run --from-start``)."""
        s = cfg.settings
        self.data_dir = Path(data_dir or s.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.counters = Counters()
        self.instance_id = identity.instance_id(self.data_dir)
        self.id_prefix = identity.batch_prefix(s.device, self.instance_id)
        self.log = DeviceLog(
            self.data_dir / "log",
            s.log.fsync,
            s.log.fsync_interval,
            s.log.segment_bytes,
            counters=self.counters,
            data_dir=self.data_dir,
        )
        self.telemetry = Telemetry(
            self.counters, self.data_dir, s.telemetry.unhealthy_after, log_bytes=self.log.size_bytes
        )
        self.blobs = blobs.attach(self.data_dir, s.blobs, self.counters)  # before the sources
        self.sources = [(c, c.cls(c.config, self._ctx(c.name))) for c in cfg.sources]
        self.transform_ctx = [self._ctx(c.name) for c in cfg.transforms]
        transforms: list[Transform] = [
            c.cls(c.config, ctx) for c, ctx in zip(cfg.transforms, self.transform_ctx, strict=True)
        ]  # type: ignore[misc]
        self.sinks: dict[str, SinkWorker] = {}
        routes = []
        for c in cfg.sinks:
            self.telemetry.sinks[c.name] = state = SinkState()
            spool = Spool(
                self.data_dir / "spool" / c.name,
                c.config.spool,
                c.name,
                self.counters,
                data_dir=self.data_dir,
            )
            sink = c.cls(c.config, self._ctx(c.name))
            self.sinks[c.name] = SinkWorker(
                c,
                sink,
                spool,
                state,
                self.counters,  # type: ignore[arg-type]
                cfg.settings.shutdown_timeout,
            )
            routes.append(Route(c.name, c.config.where, c.config.batch, self.id_prefix))
        for worker in self.sinks.values():
            worker.peers = list(self.sinks.values())
        self.pipeline = Pipeline(transforms, routes)
        self.store = CheckpointStore(self.data_dir / "state")
        self._last_cp: Checkpoint | None = None
        self._restore()
        if self.log.next_offset <= self.pipeline.offset:
            log.warning(
                "the device log ends at offset %d, before the checkpoint (%d): its "
                "unsynced tail was lost (power cut?); continuing after the checkpoint",
                self.log.next_offset - 1,
                self.pipeline.offset,
            )
            self.log.skip_to(self.pipeline.offset + 1)
        self._resume_sources()
        for t in self.pipeline.transforms:
            opener = getattr(t, "open", None)
            if callable(opener):
                opener()  # e.g. loads a model; a ConfigError here stops the start (exit 2)
        self._new_data = threading.Event()
        self._stop = threading.Event()
        self._last_checkpoint = 0.0
        self._last_append = time.monotonic()
        self._ticks: set[asyncio.Task[Any]] = set()
        self.pipeline_still_running = False
        """Set when a stop gave up waiting for the pipeline thread (no in-process restart)."""
        self._log_errors = 0
        self._skipped: dict[str, int] = {}
        self.failed_sources: dict[str, str] = {}
        """Finite sources that gave up (their reason): `--once` then exits 1."""
        self._source_logs: dict[str, RepeatedLog] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._handoff: dict[int, pl.DataFrame] = {}
        """Log offset -> rows a source handed over by reference (``Source.reference``), kept
        in memory until the pipeline takes them; bounded by ``HANDOFF_BYTES``."""
        self._handoff_bytes = 0
        self._handoff_lock = threading.Lock()

    def _ctx(self, component: str) -> Context:
        return Context(
            device=self.cfg.settings.device,
            component=component,
            data_dir=self.data_dir,
            counters=self.counters,
        )

    # -- checkpoints ------------------------------------------------------------------------

    def _restore(self) -> None:
        """The newest readable checkpoint; damaged ones are set aside, never fatal."""
        legacy = self.store.legacy
        if legacy.exists():  # a pickle: loading it could run code, so it is never loaded
            self._set_aside(legacy, "pickle checkpoint of an older version (not loaded)")
            log.warning("old pickle checkpoint not loaded: transform state starts empty")
        tried = False
        for path in self.store.candidates():
            tried = True
            try:
                cp = Checkpoint.from_bytes(path.read_bytes())
                same = self.pipeline.restore(cp, self.cfg.transforms_fingerprint, self.store)
            except (OSError, CheckpointError, statecodec.StateError, ValueError) as exc:
                self._set_aside(path, f"unreadable checkpoint: {exc}")
                continue
            if not same:
                log.warning("transforms changed since the last run: their state starts empty")
            if path.name != "checkpoint":
                log.warning("using the previous checkpoint (%s)", path.name)
            self._last_cp = cp
            log.info("resuming after log offset %d", self.pipeline.offset)
            return
        if tried:
            log.error(
                "no readable checkpoint: replaying the whole retained device log with empty "
                "transform state (sinks that overwrite by id stay exact; others may see repeats)"
            )

    def _set_aside(self, path: Path, reason: str) -> None:
        quarantine_file(
            self.data_dir, path, file=f"state/{path.name}", reason=reason, counters=self.counters
        )

    def _resume_sources(self) -> None:
        """Hand each source the last position logged with its data (checkpoint, then log)."""
        positions = dict(self.pipeline.positions)
        for entry in self.log.read(self.pipeline.offset + 1, payload=False):
            if entry.meta and "s" in entry.meta:
                positions[str(entry.meta["s"])] = entry.meta.get("p")
        self._logged_positions = positions
        if self.from_start:
            if positions:
                log.info("--from-start: sources ignore their saved positions")
            return
        for comp, src in self.sources:
            pos = positions.get(comp.name)
            if pos is None:
                continue
            try:
                src.resume(pos)
            except Exception as exc:  # a position the source cannot use: it starts afresh
                log.warning("source %s cannot resume from %s: %s", comp.name, pos, exc)

    def _checkpoint(self) -> None:
        """Commit transform state, positions, pending refs and offset; then trim the log."""
        self._last_checkpoint = time.monotonic()
        try:
            if self.cfg.settings.log.fsync != "every_tick":
                self.log.sync()  # never commit past records a power cut could still take
            cp = self.pipeline.checkpoint(self.cfg.transforms_fingerprint, self.store)
            self.store.write(cp)
        except OSError as exc:  # disk full: keep the log, the next checkpoint may succeed
            log.error("cannot write checkpoint: %s", exc)
            return
        prev, self._last_cp = self._last_cp, cp
        keep = {r.file for r in cp.pending.values()}
        if prev is not None:  # the previous checkpoint is the fallback: keep what it needs
            keep |= {r.file for r in prev.pending.values()}
        self.store.prune_pending(keep)
        oldest = min(cp.offset, prev.offset) if prev is not None else cp.offset
        if cp.offset == self.log.next_offset - 1 and self._disk_short():
            self.log.roll()  # everything is processed: let the current segment go too
        self.log.truncate_before(oldest + 1)

    def _disk_short(self) -> bool:
        """Less free space than two log segments (at least 64 MiB)."""
        try:
            free = shutil.disk_usage(self.log.folder).free
        except OSError:
            return False
        return free < max(2 * self.cfg.settings.log.segment_bytes, 64 * 1024 * 1024)

    # -- sources ----------------------------------------------------------------------------

    def _normalize(
        self,
        data: Any,
        source: Component,
        src: Source | None,
        reject: Reject | None,
    ) -> pl.DataFrame:
        """What a source returned as canonical rows (its config's units and tags applied)."""
        cfg = source.config
        extra = getattr(src, "extra_schema", None) or {}  # typed columns of its own (files)
        df = normalize(
            data,
            device=self.cfg.settings.device,
            source=source.name,
            now=datetime.now(UTC),
            units=cfg.units,
            tags={**cfg.tags, **dict.fromkeys(extra, "")} if extra else cfg.tags,
            reject=reject,
        )
        if extra:  # normalize keeps them as text, like tags: give them back their types
            df = df.with_columns(df.get_column(k).cast(t, strict=False) for k, t in extra.items())
        return df

    def _append(self, data: Any, source: Component, src: Source | None = None) -> int:
        """Log what a source returned, with its position; bad rows go to its dead letter.

        Rows a source can read again (``Source.reference``) are logged as that reference and
        handed to the pipeline in memory; all others are logged themselves.
        """
        position = src.position() if src is not None else None
        df = self._normalize(data, source, src, src.ctx.reject if src is not None else None)
        meta = None
        if position is not None and position != self._logged_positions.get(source.name):
            meta = {"s": source.name, "p": position}
        ref = src.reference() if src is not None and df.height else None
        if ref is not None:
            meta = {"s": source.name, "p": position, "r": ref}
        if df.height == 0 and meta is None:
            return 0
        try:
            if ref is not None:
                with self._handoff_lock:  # the pipeline finds the rows once it sees the entry
                    offset = self.log.append(None, Kind.REF, meta=meta)
                    self._handoff[offset] = df
                    self._handoff_bytes += int(df.estimated_size())
            else:
                self.log.append(df if df.height else None, Kind.DATA, meta=meta)
        except OSError as exc:  # disk full: count the loss, keep running
            self.counters.inc("dropped_rows_total", df.height, sink="*", reason="log_write")
            self._log_errors += 1
            if self._log_errors in (1, 10, 100) or self._log_errors % 1000 == 0:
                log.error(
                    "device log write failed (%d times so far), readings lost: %s",
                    self._log_errors,
                    exc,
                )
            return 0
        self._log_errors = 0
        if meta is not None:
            self._logged_positions[source.name] = position
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
            await asyncio.to_thread(self._append, data, comp, source)
            self._source_log(comp.name).flush(" before it read again")
        except Exception as exc:
            self.counters.inc("source_errors_total", source=comp.name)
            self._source_log(comp.name)(logging.WARNING, f"source {comp.name}: {exc}")

    async def _let_ticks_finish(self, timeout: float) -> None:
        """Wait for the ticks in flight, up to ``timeout``, so their readings are logged.

        Some are not in ``_ticks`` yet: APScheduler may have handed a tick to the loop just
        before the pause, and it registers when it starts, maybe while we wait for the others.
        Those are waited for too, or the scheduler's shutdown would cancel them mid-read.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await asyncio.sleep(0)  # ticks already handed to the loop start and register
        while self._ticks and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._ticks), timeout=left)

    def _source_log(self, name: str) -> RepeatedLog:
        """One source failing every tick logs once, then once a minute with a count."""
        if name not in self._source_logs:
            self._source_logs[name] = RepeatedLog(log)
        return self._source_logs[name]

    async def _stream(self, comp: Component, source: Source) -> None:
        """Run a long-lived source, restarting it after a failure (it resumes from its
        position). A finite one (a replay) that fails this many times in a row without
        handing over anything gives up, so `--once` ends with the reason instead of looping."""
        delay = 1.0
        failures = 0
        finite = getattr(source, "finite", False)
        while not self._stop.is_set():
            try:
                async for data in source.stream():
                    await asyncio.to_thread(self._append, data, comp, source)
                    delay, failures = 1.0, 0
                    while self._handoff_bytes > HANDOFF_BYTES and not self._stop.is_set():
                        await asyncio.sleep(0.005)  # the pipeline is behind: wait for it
                if finite:
                    return
                log.warning("source %s ended; restarting in %.0fs", comp.name, delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counters.inc("source_errors_total", source=comp.name)
                failures += 1
                if finite and failures >= FINITE_SOURCE_ATTEMPTS:
                    self.failed_sources[comp.name] = str(exc)
                    log.error(
                        "source %s failed %d times in a row, giving up: %s",
                        comp.name,
                        failures,
                        exc,
                    )
                    return
                self._source_log(comp.name)(
                    logging.WARNING, f"source {comp.name} failed: {exc}; restarting in {delay:.0f}s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    # -- consumer (thread) ------------------------------------------------------------------

    def _consume(self, drain_only: bool = False) -> None:
        """Advance the pipeline over new log entries until stopped; spool what it cuts."""
        every = self.cfg.settings.log.checkpoint_every
        while True:
            self._new_data.clear()
            self.blobs.sweep_due(self)  # this thread alone moves rows: a consistent view
            start, end = self.pipeline.offset + 1, self.log.next_offset
            if start < end:
                try:
                    for entry in self.log.read(start, end):
                        entry = self._materialize(entry)
                        try:
                            batches = self.pipeline.process(entry)
                        except Exception as exc:  # a plugin bug must not stop the pipeline
                            if not isinstance(exc, TransformError):
                                log.exception("pipeline failed on log entry %d", entry.offset)
                            self._dead_letter_entry(entry, exc)
                            batches = []
                        for batch in batches:
                            self._spool(batch)
                        if time.monotonic() - self._last_checkpoint >= every:
                            self._checkpoint()  # also in a long backlog: a kill redoes little
                except _Abort:
                    return
                continue
            if self._stop.is_set() or drain_only:
                self._checkpoint()
                self.blobs.sweep_due(self, last=True)
                return
            self._new_data.wait(0.5)

    def _materialize(self, entry: Entry) -> Entry:
        """An entry logged by reference, with its rows: from memory, or (after a restart)
        read again from the source's file. Rows that cannot be read again are counted lost."""
        if entry.kind != Kind.REF:
            return entry
        assert entry.meta is not None
        ref = entry.meta["r"]
        with self._handoff_lock:
            frame = self._handoff.pop(entry.offset, None)
            if frame is not None:
                self._handoff_bytes -= int(frame.estimated_size())
        if frame is None:
            frame = self._reread(str(entry.meta["s"]), ref, entry.offset)
        return Entry(entry.offset, Kind.DATA, entry.wall_us, frame, entry.meta)

    def _reread(self, name: str, ref: dict[str, Any], offset: int) -> pl.DataFrame | None:
        found = [(c, s) for c, s in self.sources if c.name == name]
        try:
            if not found:
                raise LookupError("the source is no longer configured")
            comp, src = found[0]
            # bad rows were dead-lettered when first read: not again
            return self._normalize(src.reread(ref), comp, src, lambda *_: None)
        except Exception as exc:
            rows = max(0, int(ref.get("hi", 0)) - int(ref.get("lo", 0)))
            self.counters.inc("dropped_rows_total", rows, sink="*", reason="source_changed")
            log.error(
                "log entry %d: cannot read the %d source row(s) of %s it refers to again "
                "(%s); they are lost",
                offset,
                rows,
                name,
                redact.text(str(exc)),
            )
            return None

    def _dead_letter_entry(self, entry: Entry, exc: Exception) -> None:
        """A transform failed on these readings: keep them with the reason, go on with the next.

        The file is named by log offset, so a replay after a crash rewrites the same file.
        """
        self.pipeline.offset = entry.offset
        log.error(
            "%s; %d readings kept in dead-letter/",
            exc,
            entry.frame.height if entry.frame is not None else 0,
        )
        if entry.frame is None:
            return
        frame = entry.frame.with_columns(
            pl.lit(redact.text(str(exc)), pl.String).alias("dead_letter_reason")
        )
        folder = self.data_dir / "dead-letter"
        folder.mkdir(parents=True, exist_ok=True)
        write_parquet(folder / f"pipeline-{entry.offset:012d}.parquet", frame, compression="zstd")
        self.counters.inc("pipeline_dead_letter_rows_total", frame.height)

    def _spool(self, batch: Batch) -> None:
        """Hand a batch to its spool; with `when_full: block` wait here (the log holds data)."""
        run = self.sinks[batch.sink]
        waited = 0.0
        while True:
            try:
                result = run.spool.put(
                    batch.frame, batch.batch_id, created_ms=batch.wall_us // 1000, wait_if_full=True
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

    # -- housekeeping -----------------------------------------------------------------------

    def _refresh_sink_state(self) -> None:
        for run in self.sinks.values():
            run.state.spool_backlog_rows = run.spool.backlog_rows
            run.state.spool_backlog_bytes = run.spool.backlog_bytes
            run.state.spool_oldest_ms = run.spool.oldest_created_ms

    async def _housekeeping(self) -> None:
        n = 0
        while True:  # once a second: cheap on a small device, fine-grained enough for max_age
            await asyncio.sleep(1.0)
            n += 1
            try:
                if self.pipeline.has_pending() and time.monotonic() - self._last_append >= 1.0:
                    await asyncio.to_thread(self._append_marker, Kind.TICK)
                for run in self.sinks.values():
                    run.spool.expire()
                self._refresh_sink_state()
                if n % 3 == 0:
                    await asyncio.to_thread(self.telemetry.write_status)
                if n % 60 == 0:
                    self._report_skipped()
            except Exception:  # one bad round (a full disk) must not end housekeeping
                log.exception("housekeeping")

    def _report_skipped(self) -> None:
        """Ticks skipped because the previous read was still running, once a minute."""
        for name, count in sorted(self._skipped.items()):
            log.warning(
                "source %s: %d tick(s) skipped in the last minute (the previous read was "
                "still running, or the loop was busy); see missed_ticks_total",
                name,
                count,
            )
        self._skipped.clear()

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
        flush: bool = True,
    ) -> int:
        """Run until ``stop`` is set (or once / for ``duration``); returns the exit code.

        ``flush=False`` (a reload that keeps the transform chain) stops without flushing open
        windows: the next Runtime restores them from the checkpoint and carries on.
        """
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
            asyncio.create_task(r.run(lambda: draining["on"]), name=f"sink:{n}")
            for n, r in self.sinks.items()
        ]
        housekeeping = asyncio.create_task(self._housekeeping())
        opened: list[Source] = []
        tasks: list[asyncio.Task[Any]] = []
        scheduler = None
        code = 0
        try:
            opening = asyncio.create_task(self._open_sources(opened))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([opening, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not opening.done():  # a stop while a device is still opening: skip to shutdown
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
            elif once:  # a stop signal ends it at once, even a source's backoff
                ticking = asyncio.create_task(self._run_once(opened))
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait([ticking, stopped], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                ticking.cancel()
                await asyncio.gather(ticking, return_exceptions=True)
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
                await self._let_ticks_finish(self.cfg.settings.shutdown_timeout)
                scheduler.shutdown(wait=False)
                self._report_skipped()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for src in opened:
                try:
                    await asyncio.wait_for(src.close(), timeout=10)
                except (Exception, asyncio.CancelledError) as exc:
                    log.warning("source close: %r", exc)
            code = await self._shutdown(consumer, workers, housekeeping, draining, once, flush)
        return code

    async def _open_sources(self, opened: list[Source]) -> None:
        for comp, src in self.sources:
            try:
                await src.open()
            except Exception as exc:  # that source stays off; the others run
                log.error("source %s cannot start: %s", comp.name, exc)
                self.counters.inc("source_errors_total", source=comp.name)
                continue
            opened.append(src)

    def _start_consumer(self) -> asyncio.Future[None]:
        """The pipeline runs in a daemon thread: a stuck plugin can never block the exit."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def target() -> None:
            try:
                self._consume()
                done.set_result(None)
            except BaseException as exc:
                log.exception("pipeline stopped")
                self.telemetry.pipeline_error = f"pipeline stopped: {exc!r}"[:500]
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
            self._skipped[event.job_id] = self._skipped.get(event.job_id, 0) + 1

        # APScheduler warns once per skipped tick; the runtime counts them and says it once a
        # minute instead (see _report_skipped)
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        scheduler.add_listener(missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        for src in sources:
            comp = by_obj[id(src)]
            if getattr(src, "long_lived", False):
                tasks.append(asyncio.create_task(self._stream(comp, src), name=comp.name))
                continue
            cfg = comp.config
            trigger: Any
            if cfg.cron:
                trigger = CronTrigger.from_crontab(cfg.cron, timezone="UTC")
                trigger.jitter = cfg.jitter or None
                first: dict[str, Any] = {}  # the cron's own first fire time
            else:
                trigger = IntervalTrigger(
                    seconds=cfg.every or 5.0, timezone="UTC", jitter=cfg.jitter or None
                )
                first = {"next_run_time": datetime.now(UTC)}
            scheduler.add_job(
                self._tick,
                trigger,
                args=[comp, src],
                id=comp.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(cfg.jitter or 0) + 1),
                **first,
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
        flush: bool = True,
    ) -> int:
        timeout = self.cfg.settings.shutdown_timeout
        try:
            if flush:
                await asyncio.to_thread(self._append_marker, Kind.FLUSH)
        finally:
            self._stop.set()
            self._new_data.set()
        try:
            await asyncio.wait_for(asyncio.shield(consumer), timeout=max(timeout, 30.0))
        except TimeoutError:
            log.error("pipeline did not catch up with the log; the rest is replayed next start")
            self.pipeline_still_running = True
        except Exception:  # already logged by the thread; shut down the rest all the same
            log.error("pipeline had stopped; the log is replayed from the last checkpoint")
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
            await run.close()
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
        if once and self.failed_sources:
            log.error(
                "--once incomplete: %s",
                "; ".join(f"source {n} gave up: {r}" for n, r in self.failed_sources.items()),
            )
            return 1
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
