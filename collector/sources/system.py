"""Host health as readings (what the Greengrass Device Defender / CloudWatch connectors sent).

Metrics (all gauges unless noted):

- cpu: ``cpu_percent`` (since the previous tick), ``load_1m``, ``load_5m``, ``load_15m``
- memory: ``memory_used_percent``, ``memory_available_bytes``, ``swap_used_percent``
- disk (tag ``mount``): ``disk_used_percent``, ``disk_free_bytes``
- network (totals over all interfaces except loopback): ``net_bytes_sent_total``,
  ``net_bytes_recv_total`` (counters since boot, as the OS reports them) and
  ``net_bytes_sent_per_s``, ``net_bytes_recv_per_s`` (rates since the previous tick; not on the
  first tick, and not across a counter reset)
- temperature (tag ``sensor``): ``temperature`` in C for every sensor psutil finds; nothing
  where the OS exposes none (containers, macOS).

The tag columns (``mount``, ``sensor``) are declared automatically, so they reach the lake.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from collector.plugin import Context, Source, SourceConfig

Group = Literal["cpu", "memory", "disk", "network", "temperature"]
_UNITS = {
    "cpu_percent": "%",
    "memory_used_percent": "%",
    "swap_used_percent": "%",
    "memory_available_bytes": "B",
    "disk_used_percent": "%",
    "disk_free_bytes": "B",
    "net_bytes_sent_total": "B",
    "net_bytes_recv_total": "B",
    "net_bytes_sent_per_s": "B/s",
    "net_bytes_recv_per_s": "B/s",
    "temperature": "C",
}

_MIN_CPU_SPAN = 0.1
"""Seconds a cpu_percent reading spans at least (psutil's advice for a meaningful value)."""


def _cpu_total(times: Any) -> float:
    """All CPU time of a ``cpu_times()`` sample; guest time is already in user/nice on Linux."""
    return float(sum(times)) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _cpu_idle(times: Any) -> float:
    """Idle CPU time of a sample; iowait is idle too (the CPU waits and does nothing)."""
    return float(times.idle) + getattr(times, "iowait", 0.0)


class SystemConfig(SourceConfig):
    """Which host metrics to read, and how often."""

    type: Literal["system"] = Field(default="system", description="Plugin name.")

    include: list[Group] = Field(
        default_factory=lambda: ["cpu", "memory", "disk", "network", "temperature"],
        description="Metric groups: cpu, memory, disk, network, temperature.",
    )
    disks: list[str] = Field(default_factory=lambda: ["/"], description="Mount points to report.")

    @model_validator(mode="before")
    @classmethod
    def _default_every(cls, data: Any) -> Any:
        if isinstance(data, dict) and not (data.get("every") or data.get("cron")):
            data = {**data, "every": "10s"}
        return data

    @model_validator(mode="after")
    def _declare_tags(self) -> SystemConfig:
        for group, tag in (("disk", "mount"), ("temperature", "sensor")):
            if group in self.include:
                self.tags.setdefault(tag, "")
        return self


class SystemSource(Source):
    """CPU, memory, disk, network and temperature of the gateway itself."""

    Config: ClassVar[type[SystemConfig]] = SystemConfig
    description: ClassVar[str] = "Gateway health: cpu, memory, disk, network, temperatures."
    example: ClassVar[str] = """\
- name: host
  type: system
  every: 30s
  include: [cpu, memory, disk, temperature]
  disks: [/, /data]
"""
    requires: ClassVar[dict[str, str]] = {"psutil": "devices"}

    def __init__(self, config: SystemConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._last_net: tuple[float, int, int] | None = None
        self._last_cpu: tuple[float, Any] | None = None
        """(monotonic time, psutil.cpu_times()) of the previous cpu sample."""

    async def open(self) -> None:
        import psutil

        # The source's own sample, not psutil.cpu_percent(interval=None): psutil keeps that
        # one per thread, and read() runs in whichever worker thread is free, so a sample
        # taken here (or on another tick's thread) was never the one compared with.
        self._last_cpu = (time.monotonic(), psutil.cpu_times())

    def read(self) -> list[dict[str, Any]]:
        import psutil

        now = self.ctx.clock()
        rows: list[dict[str, Any]] = []

        def add(metric: str, value: float | None, **tags: str) -> None:
            if value is not None:
                rows.append(
                    {
                        "metric": metric,
                        "value": float(value),
                        "unit": _UNITS[metric],
                        "ts": now,
                        **tags,
                    }
                )

        include = set(self.config.include)
        sections = [
            ("cpu", lambda: self._cpu(psutil, add, rows, now)),
            ("memory", lambda: self._memory(psutil, add)),
            ("disk", lambda: self._disks(psutil, add)),
            ("network", lambda: rows.extend(self._network(psutil, now))),
            ("temperature", lambda: self._temperatures(psutil, add)),
        ]
        for name, collect in sections:
            if name not in include:
                continue
            try:
                collect()
            except Exception as exc:  # one failing probe costs its section, not the tick
                self.ctx.counters.inc(
                    "system_errors_total", component=self.ctx.component, kind=name
                )
                self.ctx.logger.debug("%s: %s: %r", self.ctx.component, name, exc)
        return rows

    def _cpu(self, psutil: Any, add: Any, rows: list[dict[str, Any]], now: Any) -> None:
        add("cpu_percent", self._cpu_percent(psutil))
        if hasattr(psutil, "getloadavg"):
            for name, load in zip(
                ("load_1m", "load_5m", "load_15m"), psutil.getloadavg(), strict=True
            ):
                rows.append({"metric": name, "value": float(load), "ts": now})

    def _cpu_percent(self, psutil: Any) -> float:
        """Busy share of all CPUs since the previous tick (or since open(), for the first).

        A sample too close to the previous one (the first tick comes right after open())
        would measure nothing, so the first reading waits until ``_MIN_CPU_SPAN`` has passed
        since its reference sample: read() runs in a worker thread, never on the event loop.
        """
        last = self._last_cpu
        if last is None:
            last = (time.monotonic(), psutil.cpu_times())
        wait = _MIN_CPU_SPAN - (time.monotonic() - last[0])
        if wait > 0:
            time.sleep(wait)
        mono, times = time.monotonic(), psutil.cpu_times()
        self._last_cpu = (mono, times)
        total = _cpu_total(times) - _cpu_total(last[1])
        busy = total - _cpu_idle(times) + _cpu_idle(last[1])
        if total <= 0:
            return 0.0
        return round(min(100.0, max(0.0, busy / total * 100)), 1)

    @staticmethod
    def _memory(psutil: Any, add: Any) -> None:
        vm = psutil.virtual_memory()
        add("memory_used_percent", vm.percent)
        add("memory_available_bytes", vm.available)
        add("swap_used_percent", psutil.swap_memory().percent)

    def _disks(self, psutil: Any, add: Any) -> None:
        for mount in self.config.disks:
            try:
                du = psutil.disk_usage(mount)
            except OSError as exc:
                self.ctx.counters.inc(
                    "system_errors_total", component=self.ctx.component, kind="disk"
                )
                self.ctx.logger.debug("disk %s: %s", mount, exc)
                continue
            add("disk_used_percent", du.percent, mount=mount)
            add("disk_free_bytes", du.free, mount=mount)

    @staticmethod
    def _temperatures(psutil: Any, add: Any) -> None:
        if not hasattr(psutil, "sensors_temperatures"):
            return
        try:
            sensors = psutil.sensors_temperatures()
        except (OSError, RuntimeError):
            sensors = {}
        for chip, entries in sensors.items():
            for i, entry in enumerate(entries):
                add("temperature", entry.current, sensor=f"{chip}/{entry.label or i}")

    def _network(self, psutil: Any, now: Any) -> list[dict[str, Any]]:
        per_nic = psutil.net_io_counters(pernic=True)
        sent = sum(c.bytes_sent for nic, c in per_nic.items() if nic != "lo")
        recv = sum(c.bytes_recv for nic, c in per_nic.items() if nic != "lo")
        mono = time.monotonic()
        rows = [
            {"metric": "net_bytes_sent_total", "value": float(sent), "unit": "B", "ts": now},
            {"metric": "net_bytes_recv_total", "value": float(recv), "unit": "B", "ts": now},
        ]
        if self._last_net is not None:
            last_t, last_sent, last_recv = self._last_net
            dt = mono - last_t
            if dt > 0 and sent >= last_sent and recv >= last_recv:
                rows.append(
                    {
                        "metric": "net_bytes_sent_per_s",
                        "value": (sent - last_sent) / dt,
                        "unit": "B/s",
                        "ts": now,
                    }
                )
                rows.append(
                    {
                        "metric": "net_bytes_recv_per_s",
                        "value": (recv - last_recv) / dt,
                        "unit": "B/s",
                        "ts": now,
                    }
                )
        self._last_net = (mono, sent, recv)
        return rows
