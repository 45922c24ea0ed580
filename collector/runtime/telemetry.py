"""Metrics (Prometheus text), /health, and the status file `collector status` reads.

The status file is rewritten every few seconds and at exit, so `collector status` answers while
the collector runs and after it died; the spool folders are re-read directly for the backlog.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector.plugin import Counters

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

    from prometheus_client import CollectorRegistry

log = logging.getLogger("collector")
PREFIX = "edge_collector_"


@dataclass
class SinkState:
    """What a sink worker knows about its own health."""

    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failing_since: float | None = None
    consecutive_failures: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0
    spool_backlog_rows: int = 0
    spool_backlog_bytes: int = 0
    spool_oldest_ms: int | None = None
    inflight_since: float | None = None
    """Wall time the sink call now in flight started (None: no call in flight). A call that
    never returns would otherwise leave the state of the last *finished* call: all green."""
    inflight_what: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def stalled_for(self, now: float, after: float) -> float | None:
        """Seconds the call in flight has waited, if that is longer than ``after``."""
        since = self.inflight_since
        if since is None or now - since <= after:
            return None
        return now - since

    def up(self, now: float, after: float) -> bool:
        """Not failing, and no call waiting longer than ``after`` for an answer."""
        return self.failing_since is None and self.stalled_for(now, after) is None

    def current_error(self, now: float, after: float) -> str | None:
        """``last_error``, or "no answer for N s" while a call has been silent too long."""
        stalled = self.stalled_for(now, after)
        if stalled is not None:
            return f"{self.inflight_what or 'call'}: no answer for {stalled:.0f} s"
        return self.last_error


class _CountersCollector:
    """The counters and sink states as Prometheus families (prometheus_client's ``Collector``
    is a Protocol: ``collect()`` is all it asks, so this module imports it only when scraped)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
        for (name, labels), value in self.t.counters.snapshot():
            by_name.setdefault(name, []).append((dict(labels), value))
        for name, samples in sorted(by_name.items()):
            label_names = sorted({k for labels, _ in samples for k in labels})
            metric_name = PREFIX + name.removesuffix("_total")
            fam = CounterMetricFamily(metric_name, name.replace("_", " "), labels=label_names)
            for labels, value in samples:
                fam.add_metric([labels.get(k, "") for k in label_names], value)
            yield fam
        now = time.time()
        gauges = {
            "spool_rows": ("rows waiting in the spool", lambda s: s.spool_backlog_rows),
            "spool_bytes": ("bytes waiting in the spool", lambda s: s.spool_backlog_bytes),
            "spool_oldest_age_seconds": (
                "age of the oldest spooled batch",
                lambda s: (now - s.spool_oldest_ms / 1000) if s.spool_oldest_ms else 0.0,
            ),
            "sink_latency_seconds_sum": ("total time in sink writes", lambda s: s.latency_sum),
            "sink_latency_seconds_count": ("sink writes timed", lambda s: s.latency_count),
            "sink_up": (
                "1 when the last write succeeded and no call waits longer than unhealthy_after",
                lambda s: 1.0 if s.up(now, self.t.unhealthy_after) else 0.0,
            ),
            "sink_inflight_seconds": (
                "age of the sink call in flight (0 when none)",
                lambda s: (now - s.inflight_since) if s.inflight_since else 0.0,
            ),
        }
        for gname, (doc, fn) in gauges.items():
            g = GaugeMetricFamily(PREFIX + gname, doc, labels=["sink"])
            for sink, state in self.t.sinks.items():
                g.add_metric([sink], float(fn(state)))
            yield g
        yield GaugeMetricFamily(
            PREFIX + "log_bytes", "size of the device log", value=float(self.t.log_bytes())
        )


class Telemetry:
    """Owns counters and per-sink state; serves them and writes the status file."""

    def __init__(
        self, counters: Counters, data_dir: Path, unhealthy_after: float, log_bytes: Any = lambda: 0
    ) -> None:
        self.counters = counters
        self.data_dir = Path(data_dir)
        self.unhealthy_after = unhealthy_after
        self.log_bytes = log_bytes
        self.sinks: dict[str, SinkState] = {}
        self.pipeline_error: str | None = None
        self.started = time.time()
        # http.server is imported by serve() (not at all with `telemetry: {enabled: false}`),
        # prometheus_client by the first /metrics request
        self.registry: CollectorRegistry | None = None
        self._registry_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self.port: int | None = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        now = time.time()
        after = self.unhealthy_after
        failing: dict[str, Any] = {}
        for name, s in self.sinks.items():
            stalled = s.stalled_for(now, after)
            if stalled is not None:
                failing[name] = {
                    "failing_for_s": round(stalled, 1),
                    "last_error": s.current_error(now, after),
                }
            elif s.failing_since is not None and now - s.failing_since > after:
                failing[name] = {
                    "failing_for_s": round(now - s.failing_since, 1),
                    "last_error": s.last_error,
                }
        if self.pipeline_error:
            failing["pipeline"] = {"last_error": self.pipeline_error}
        return not failing, {"status": "unhealthy" if failing else "ok", "failing": failing}

    def status(self, running: bool = True) -> dict[str, Any]:
        c = self.counters
        items = c.snapshot()
        now = time.time()
        sinks = {}
        for name, s in self.sinks.items():
            dropped = {
                dict(labels).get("reason", ""): v
                for (n, labels), v in items
                if n == "dropped_rows_total" and dict(labels).get("sink") == name
            }
            sinks[name] = {
                "spooled_rows": c.get("spooled_rows_total", sink=name),
                "delivered_rows": c.get("delivered_rows_total", sink=name),
                "dead_lettered_rows": c.get("dead_letter_rows_total", sink=name),
                "dropped_rows": dropped,
                "retries": c.get("retries_total", sink=name),
                **{k: v for k, v in asdict(s).items() if k != "extra"},
                "up": s.up(now, self.unhealthy_after),
                "last_error": s.current_error(now, self.unhealthy_after),
            }
        return {
            "pid": os.getpid(),
            "running": running,
            "updated_at": time.time(),
            "started_at": self.started,
            "sinks": sinks,
            "rows_in": sum(v for (n, _), v in items if n == "rows_in_total"),
            "missed_ticks": sum(v for (n, _), v in items if n == "missed_ticks_total"),
        }

    def write_status(self, running: bool = True) -> None:
        path = self.data_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.status(running), indent=1, default=str))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk must not stop collection
            log.warning("cannot write %s: %s", path, exc)

    # -- HTTP ----------------------------------------------------------------------------------

    def metrics(self) -> bytes:
        """The Prometheus text exposition of the counters and sink states."""
        from prometheus_client import CollectorRegistry, generate_latest

        with self._registry_lock:
            if self.registry is None:
                self.registry = CollectorRegistry(auto_describe=False)
                self.registry.register(_CountersCollector(self))
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        telemetry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, code = telemetry.metrics(), 200
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                elif self.path.startswith("/health"):
                    ok, detail = telemetry.health()
                    body, code = json.dumps(detail).encode(), 200 if ok else 503
                    ctype = "application/json"
                else:
                    body, code, ctype = b"see /metrics and /health\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            log.warning(
                "metrics endpoint %s:%s unavailable (%s); running without it",
                host,
                port,
                exc.strerror,
            )
            return
        self.port = self._server.server_address[1]
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="telemetry")
        self._thread.start()
        log.info("metrics on http://%s:%s/metrics, health on /health", host, self.port)

    def _serve(self) -> None:
        """``serve_forever`` without its half-second poll: the thread sleeps until a request
        comes or close() wakes it, so close() returns at once instead of waiting up to 0.5 s for
        the next poll (paid by every `collector run --once`), and an idle collector is not woken
        twice a second."""
        server, wake = self._server, self._wake
        assert server is not None and wake is not None
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            selector.register(wake[0], selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is wake[0] for key, _ in ready):
                    return
                if ready:
                    server._handle_request_noblock()  # what serve_forever calls

    def close(self) -> None:
        if self._server is not None:
            assert self._wake is not None and self._thread is not None
            self._wake[1].send(b"x")
            self._thread.join()
            self._server.server_close()
            for end in self._wake:
                end.close()
            self._server = self._thread = self._wake = None


def read_status(data_dir: Path) -> dict[str, Any]:
    """Status for `collector status`: the last status file plus a fresh look at the spools."""
    data_dir = Path(data_dir)
    status: dict[str, Any] = {}
    path = data_dir / "status.json"
    if path.exists():
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            status = {}
    pid = status.get("pid")
    alive = False
    if pid and status.get("running"):
        try:
            os.kill(int(pid), 0)
            alive = True
        except OSError:
            alive = False
    status["alive"] = alive
    sinks = status.setdefault("sinks", {})
    spool_root = data_dir / "spool"
    if spool_root.is_dir():
        for folder in sorted(p for p in spool_root.iterdir() if p.is_dir()):
            files = [*folder.glob("*.arrow"), *(folder / "inflight").glob("*.arrow")]
            s = sinks.setdefault(folder.name, {})
            s["backlog_files"] = len(files)
            s["backlog_bytes"] = sum(f.stat().st_size for f in files)
            mtimes = [f.stat().st_mtime for f in files]
            s["oldest_file_age_s"] = round(time.time() - min(mtimes), 1) if mtimes else None
            s["dead_letter_files"] = len(list((folder / "dead-letter").glob("*.parquet")))
    return status


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
