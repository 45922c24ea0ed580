"""Serial line source (the Greengrass "Serial Stream" connector): a sensor printing lines.

Two modes. Streaming (default): the device prints lines on its own; the source is long-lived and
yields rows as lines arrive. Request/response (`request:` set): every tick the source writes the
command and reads one answer line. Either way an unplugged device is reopened with exponential
backoff, and a line the parser cannot read goes to the dead-letter file instead of stopping the
stream.

Blocking pyserial calls run in worker threads, bounded by `timeout`, so the event loop never
waits on the port and shutdown waits at most one `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from collector.errors import SourceError
from collector.parsers import ParseError, ParserConfig, Row
from collector.plugin import Model, Source, SourceConfig
from collector.units import Duration


class ReconnectConfig(Model):
    """Backoff between attempts to reopen a port that went away (doubles up to `max`)."""

    initial: Duration = Field(default=1.0, gt=0, description="First wait before reopening.")
    max: Duration = Field(default=30.0, gt=0, description="Longest wait between attempts.")


class SerialConfig(SourceConfig):
    """A serial port with a line parser; `request` switches to polling."""

    type: Literal["serial"] = Field(default="serial", description="Plugin name.")

    port: str = Field(description="Device path, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/…`.")
    baudrate: int = Field(default=9600, gt=0, description="Line speed in bit/s.")
    parity: Literal["N", "E", "O", "M", "S"] = Field(
        default="N", description="Parity: N(one), E(ven), O(dd), M(ark), S(pace)."
    )
    bytesize: Literal[5, 6, 7, 8] = Field(default=8, description="Data bits.")
    stopbits: Literal[1, 1.5, 2] = Field(default=1, description="Stop bits.")
    timeout: Duration = Field(
        default=1.0, gt=0, description="Read timeout; also how long a request waits for its answer."
    )
    parser: ParserConfig = Field(description="How a line becomes readings: regex, csv, json, kv.")
    eol: str = Field(
        default="\n", min_length=1, description="Line terminator; a trailing CR is stripped too."
    )
    encoding: str = Field(default="utf-8", description="Text encoding of the lines.")
    max_line: int = Field(
        default=4096, gt=0, description="Longer lines are dead-lettered (guards against noise)."
    )
    request: str | None = Field(
        default=None,
        description='Command written each tick (e.g. `"READ\\r\\n"`); the answer line is parsed. '
        "Without it the source streams whatever the device prints.",
    )
    reconnect: ReconnectConfig = Field(
        default_factory=ReconnectConfig, description="Backoff while the port is gone."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_poll(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("request") is not None
            and not (data.get("every") or data.get("cron"))
        ):
            data = {**data, "every": "5s"}
        return data

    @model_validator(mode="after")
    def _schedule_only_when_polling(self) -> SerialConfig:
        if self.request is None and (self.every is not None or self.cron is not None):
            raise ValueError(
                "a streaming serial source has no schedule; set `request` to poll the device"
            )
        try:
            "x".encode(self.encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown encoding {self.encoding!r}") from None
        return self


class LineFramer:
    """Splits a byte stream into lines; an overlong line is cut off and flagged, not buffered."""

    def __init__(self, eol: bytes, max_line: int) -> None:
        self.eol = eol
        self.max_line = max_line
        self.buf = bytearray()
        self.discarding = False

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Complete lines (without the terminator) and whether each was too long."""
        self.buf += data
        out: list[tuple[bytes, bool]] = []
        while True:
            idx = self.buf.find(self.eol)
            if idx < 0:
                break
            line = bytes(self.buf[:idx])
            del self.buf[: idx + len(self.eol)]
            if self.discarding:
                self.discarding = False
                continue
            out.append((line, len(line) > self.max_line))
        if len(self.buf) > self.max_line and not self.discarding:
            out.append((bytes(self.buf[: self.max_line]), True))
            self.discarding = True
        if self.discarding:
            self.buf.clear()
        return out

    def reset(self) -> None:
        self.buf.clear()
        self.discarding = False


class SerialSource(Source):
    """Lines from a serial port, parsed into readings."""

    Config: ClassVar[type[SerialConfig]] = SerialConfig
    description: ClassVar[str] = "Lines from a serial port (stream or request/response), parsed."
    example: ClassVar[str] = """\
- name: th-sensor
  type: serial
  port: /dev/ttyUSB0
  baudrate: 115200
  parser: {type: kv, rename: {T: temperature, H: humidity}}
  units: {temperature: C, humidity: "%"}
"""
    requires: ClassVar[dict[str, str]] = {"serial": "devices"}
    long_lived: ClassVar[bool] = True
    maybe_long_lived: ClassVar[bool] = True
    """Streams without `request`, polls with it: the instance's `long_lived` says which."""

    def __init__(self, config: SerialConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        # A runtime that looks at the instance schedules `read()` in request mode; one that
        # looks at the class runs `stream()`, which paces itself with `every` in that mode.
        self.long_lived = config.request is None  # type: ignore[misc]
        self._ser: Any = None
        self._io_lock = threading.Lock()
        self._framer = LineFramer(config.eol.encode(config.encoding), config.max_line)
        self._down_since: float | None = None
        self._next_poll = 0.0

    # -- port handling (worker threads) ------------------------------------------------------

    def _open_port(self) -> None:
        import serial

        with self._io_lock:
            if self._ser is not None:
                return
            cfg = self.config
            self._ser = serial.Serial(
                port=cfg.port,
                baudrate=cfg.baudrate,
                parity=cfg.parity,
                bytesize=cfg.bytesize,
                stopbits=cfg.stopbits,
                timeout=cfg.timeout,
                write_timeout=cfg.timeout,
            )
            self._framer.reset()
        self.ctx.logger.info("%s: serial port %s open", self.ctx.component, cfg.port)

    def _close_port(self) -> None:
        with self._io_lock:
            ser, self._ser = self._ser, None
            if ser is not None:
                with contextlib.suppress(OSError):
                    ser.close()

    def _read_rows(self) -> list[Row]:
        """Whatever arrived within one timeout, parsed; bad lines are dead-lettered here."""
        with self._io_lock:
            ser = self._ser
            if ser is None:
                return []
            data = ser.read(max(1, ser.in_waiting))
        return self._lines_to_rows(self._framer.feed(data))

    def _poll_once(self) -> list[Row]:
        """Write the request and parse the first complete answer line."""
        cfg = self.config
        assert cfg.request is not None
        with self._io_lock:
            ser = self._ser
            if ser is None:
                return []
            ser.reset_input_buffer()
            self._framer.reset()
            ser.write(cfg.request.encode(cfg.encoding))
            ser.flush()
            deadline = time.monotonic() + cfg.timeout
            lines: list[tuple[bytes, bool]] = []
            while not lines and time.monotonic() < deadline:
                lines = self._framer.feed(ser.read(max(1, ser.in_waiting)))
        if not lines:
            self.ctx.counters.inc("serial_timeouts_total", component=self.ctx.component)
            raise SourceError(f"{cfg.port}: no answer to the request within {cfg.timeout}s")
        return self._lines_to_rows(lines[:1])

    def _lines_to_rows(self, lines: list[tuple[bytes, bool]]) -> list[Row]:
        cfg = self.config
        now = self.ctx.clock()
        rows: list[Row] = []
        for raw, too_long in lines:
            if too_long:
                self.ctx.reject(raw, f"line longer than {cfg.max_line} bytes")
                continue
            try:
                text = raw.decode(cfg.encoding).rstrip("\r")
            except UnicodeDecodeError as exc:
                self.ctx.reject(raw, f"not {cfg.encoding}: {exc.reason}")
                continue
            if not text.strip():
                continue
            try:
                parsed = cfg.parser.parse(text)
            except ParseError as exc:
                self.ctx.reject(raw, str(exc))
                continue
            except Exception as exc:  # a value no parser check foresaw (e.g. 10**400)
                self.ctx.reject(raw, f"unreadable: {exc!r}")
                continue
            for row in parsed:
                row.setdefault("ts", now)
            rows.extend(parsed)
        if lines:
            self.ctx.counters.inc("serial_lines_total", len(lines), component=self.ctx.component)
        return rows

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Try once; a missing device is not fatal (the source keeps retrying)."""
        try:
            await asyncio.to_thread(self._open_port)
        except OSError as exc:  # serial.SerialException is an OSError
            self._went_down(exc)

    async def close(self) -> None:
        await asyncio.to_thread(self._close_port)

    def _went_down(self, exc: BaseException) -> None:
        """Count every failed read/open; log and count the outage itself once."""
        self.ctx.counters.inc("serial_errors_total", component=self.ctx.component)
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.ctx.counters.inc("serial_disconnects_total", component=self.ctx.component)
            self.ctx.logger.warning(
                "%s: serial port %s unavailable (%s); retrying with backoff",
                self.ctx.component,
                self.config.port,
                exc,
            )

    def _came_back(self) -> None:
        if self._down_since is not None:
            self.ctx.logger.info(
                "%s: serial port %s back after %.1fs",
                self.ctx.component,
                self.config.port,
                time.monotonic() - self._down_since,
            )
            self.ctx.counters.inc("serial_reconnects_total", component=self.ctx.component)
            self._down_since = None

    async def read(self) -> list[Row]:
        """One request/response exchange (request mode, scheduled by `every`)."""
        if self.config.request is None:
            raise SourceError("a streaming serial source has no per-tick read; use stream()")
        try:
            await asyncio.to_thread(self._open_port)
            rows = await asyncio.to_thread(self._poll_once)
        except OSError as exc:
            self._went_down(exc)
            await asyncio.to_thread(self._close_port)
            raise SourceError(f"{self.config.port}: {exc}") from exc
        self._came_back()
        return rows

    async def stream(self) -> AsyncIterator[list[Row]]:
        cfg = self.config
        delay = cfg.reconnect.initial
        try:
            while True:
                try:
                    await asyncio.to_thread(self._open_port)
                    if cfg.request is None:
                        rows = await asyncio.to_thread(self._read_rows)
                    else:
                        rows = await self._paced_poll()
                except OSError as exc:
                    self._went_down(exc)
                    await asyncio.to_thread(self._close_port)
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, cfg.reconnect.max)
                    continue
                delay = cfg.reconnect.initial
                self._came_back()
                if rows:
                    yield rows
        finally:
            await asyncio.to_thread(self._close_port)

    async def _paced_poll(self) -> list[Row]:
        """Request mode inside `stream()`: wait for the next tick, then one exchange."""
        wait = self._next_poll - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._next_poll = time.monotonic() + (self.config.every or 5.0)
        try:
            return await asyncio.to_thread(self._poll_once)
        except SourceError as exc:
            self.ctx.logger.warning("%s: %s", self.ctx.component, exc)
            return []
