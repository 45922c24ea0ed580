"""What every benchmark shares: the machine it ran on, child-process measurement, JSON output.

A figure without its machine is meaningless on edge hardware (a Pi 4 and a 2-core VM differ by
an order of magnitude), so every JSON file carries :func:`machine` beside the numbers.
Processes are measured by the kernel's own accounting: CPU seconds of exactly that child from
``os.wait4``, peak RSS from its ``VmHWM`` (not ``ru_maxrss``, which Linux carries over from the
parent across ``execve``; see :func:`run_measured`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def machine() -> dict[str, Any]:
    """Cores, RAM, CPU model and library versions: recorded beside every figure."""
    import polars as pl
    import pyarrow as pa

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(_ram_bytes() / 1024**3, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "polars": pl.__version__,
        "pyarrow": pa.__version__,
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line for the README: `2 cores, 23.5 GB RAM, Intel Xeon, Python 3.11`."""
    m = info or machine()
    return (
        f"{m['cores']} cores, {m['ram_gb']} GB RAM, {m['cpu']}, Python {m['python']}, "
        f"Polars {m['polars']}"
    )


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """``benchmarks/out/<name>.json`` with the machine and the time of the run added."""
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        **payload,
    }
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def env() -> dict[str, str]:
    """The child's environment: this checkout first on the path, no stray AWS profile, and
    bytecode cached as on a user's machine (a CI image may forbid it, making every start
    compile the collector's modules again)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH")) if p)
    e.pop("AWS_PROFILE", None)
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    return e


@dataclass
class ProcResult:
    """How one child process ran, as the kernel accounted it."""

    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    """The kernel's high-water mark of the process's RSS (``VmHWM``), read until it exits."""
    peak_anon_mb: float = 0.0
    """Peak of the process's private (anonymous) RSS, polled: RSS minus mapped libraries."""
    sampled_peak_rss_mb: float = 0.0
    """Peak of (process + children) RSS sampled by psutil: a cross-check of ``peak_rss_mb``."""
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_s"] = round(self.cpu_s, 3)
        for k in (
            "wall_s",
            "user_s",
            "sys_s",
            "peak_rss_mb",
            "peak_anon_mb",
            "sampled_peak_rss_mb",
        ):
            d[k] = round(d[k], 3)
        d.pop("extra")
        return d


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 3600.0,
    sample_every: float = 0.0,
    on_start: Callable[[int], None] | None = None,
) -> ProcResult:
    """Run ``cmd`` to its end; wall time and CPU seconds from ``wait4``, peak RSS from VmHWM.

    ``ru_maxrss`` cannot be used for the peak: Linux carries the parent's RSS at fork time over
    ``execve``, so a child of a big benchmark process would report the parent's size. ``VmHWM``
    in ``/proc/<pid>/status`` belongs to the new address space only and is monotonic, so
    polling it until the process exits gives its true peak (minus at most one poll period).
    ``sample_every`` > 0 also sums RSS over the process tree with psutil, as a cross-check.
    ``on_start(pid)`` is called right after the process started (e.g. to sample it later).
    """
    e = env()
    if extra_env:
        e.update(extra_env)
    err_path = OUT / f".stderr-{os.getpid()}-{threading.get_ident()}.log"
    OUT.mkdir(parents=True, exist_ok=True)
    sampled = [0]
    hwm = [0]
    anon = [0]
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=e, stdout=subprocess.DEVNULL, stderr=err)
        if on_start is not None:
            on_start(proc.pid)
        stop = threading.Event()
        sampler = None
        if sample_every > 0:
            sampler = threading.Thread(
                target=_sample_rss, args=(proc.pid, sample_every, stop, sampled), daemon=True
            )
            sampler.start()
        deadline = time.monotonic() + timeout
        status_file = f"/proc/{proc.pid}/status"
        while True:
            now_hwm, now_anon = _vm_status(status_file)
            hwm[0] = max(hwm[0], now_hwm)
            anon[0] = max(anon[0], now_anon)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
        stop.set()
        if sampler is not None:
            sampler.join()
    tail = err_path.read_text(errors="replace")[-4000:]
    err_path.unlink(missing_ok=True)
    return ProcResult(
        returncode=proc.returncode,
        wall_s=wall,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        peak_rss_mb=hwm[0] / 1024,  # KiB
        peak_anon_mb=anon[0] / 1024,
        sampled_peak_rss_mb=sampled[0] / 1024**2,
        stderr_tail=tail,
    )


def _vm_status(status_file: str) -> tuple[int, int]:
    """(VmHWM, RssAnon) in KiB; zeros once the process is gone (or a zombie)."""
    hwm = anon = 0
    try:
        with open(status_file) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return hwm, anon


def _sample_rss(pid: int, every: float, stop: threading.Event, peak: list[int]) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak[0] = max(peak[0], total)
        except psutil.Error:
            return
        stop.wait(every)


def check_ok(result: ProcResult, what: str) -> None:
    """Stop the benchmark with the child's stderr when it failed: a figure of a crash is a lie."""
    if result.returncode != 0:
        sys.stderr.write(result.stderr_tail)
        raise SystemExit(f"{what} exited with {result.returncode}")


def table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None
) -> None:
    """Print a rich table (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(*columns, title=title, caption=caption)
    for row in rows:
        t.add_row(*[str(c) for c in row])
    Console(width=max(120, Console().width)).print(t)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def collector_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "collector", "run", str(config), *args]


HEAVY = (
    "pyarrow",
    "boto3",
    "botocore",
    "aiobotocore",
    "elasticsearch",
    "opensearchpy",
    "serial",
    "pymodbus",
    "paho",
    "sklearn",
    "onnxruntime",
    "streamlit",
    "duckdb",
    "psutil",
    "pandas",
    "numpy",
    "scipy",
)
"""Optional libraries a config must name before the collector may import them (each costs
megabytes of RSS and tens of milliseconds of start-up). pyarrow is one since the runtime is
Polars-only: only the sinks and features that need it load it, at their first use."""

_PROBE = """
import json, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
stage = sys.argv[1]
if stage == 'imports':
    import importlib
    for name in sys.argv[2:-1]:
        importlib.import_module(name)
    out = {'imports_mb': rss()}
else:
    import collector.cli
    out = {'import_cli_mb': rss()}
if stage == 'runtime':
    from pathlib import Path
    from collector import config
    from collector.runtime.runner import Runtime
    cfg = config.load(sys.argv[2])
    Runtime(cfg, Path(sys.argv[3]))
    out['runtime_mb'] = rss()
heavy = sys.argv[-1].split(',')
out['heavy_loaded'] = sorted(h for h in heavy if h in sys.modules)
out['modules'] = len(sys.modules)
print(json.dumps(out))
"""


def probe(*args: str) -> dict[str, Any]:
    """RSS and imported heavy modules of a fresh interpreter at a given stage.

    ``probe("cli")``: after ``import collector.cli``; ``probe("runtime", CFG, DATA_DIR)``:
    after loading CFG and building its runtime (nothing run yet); ``probe("imports", *MODULES)``:
    after importing MODULES alone (``imports_mb``).
    """
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args, ",".join(HEAVY)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@dataclass
class ImportTrace:
    """What one real run of a command imported, from ``python -X importtime``."""

    returncode: int
    modules: set[str]
    """Every module imported, dotted names."""
    importers: dict[str, str]
    """Who imported each module first: the enclosing import in the trace's tree."""
    top_level_us: dict[str, int]
    """Cumulative import time (µs) of each package root (``polars``, ``collector``) at its
    first import; nested packages are counted in their importer's figure too."""

    def heavy(self) -> list[str]:
        """The :data:`HEAVY` libraries among the imports."""
        tops = {m.split(".", 1)[0] for m in self.modules}
        return sorted(h for h in HEAVY if h in tops)

    def first_importer(self, package: str, within: str = "collector") -> str | None:
        """The first module of ``within`` on the chain that imported ``package`` (e.g. which
        collector module made ``--help`` load polars), None if ``package`` was not imported."""
        name: str | None = package
        while name is not None and not (name == within or name.startswith(within + ".")):
            name = self.importers.get(name)
        return name if package in self.modules else None

    def slowest(self, n: int = 5) -> list[tuple[str, float]]:
        """The ``n`` top-level packages that took longest to import, in ms."""
        skip = ("site", "encodings")  # the bare interpreter's own, paid by `python -c pass`
        named = {k: v for k, v in self.top_level_us.items() if k not in skip and k[0] != "_"}
        ranked = sorted(named.items(), key=lambda kv: -kv[1])[:n]
        return [(name, round(us / 1000, 1)) for name, us in ranked]


def trace_imports(
    cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 300
) -> ImportTrace:
    """Run ``cmd`` (a ``python …`` command line) once under ``-X importtime``.

    The real process, not an in-process imitation of it: what a config makes the collector load
    is decided by the code paths the run takes (lazy plugin imports, a sink's first write), so
    only the run itself can say. The run is not timed (import tracing slows it down).
    """
    argv = list(cmd)
    if not argv or Path(argv[0]).name != Path(sys.executable).name:
        raise ValueError(f"not a python command line: {argv[:2]}")
    argv = [argv[0], "-X", "importtime", *argv[1:]]
    proc = subprocess.run(
        argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    modules: set[str] = set()
    top: dict[str, int] = {}
    importers: dict[str, str] = {}
    waiting: dict[int, list[str]] = {}  # depth -> modules whose importer comes later (post-order)
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (p.strip() for p in line[len("import time:") :].split("|", 2))
        if not cumulative.isdigit():
            continue  # the header line
        raw = line.rsplit("|", 1)[1]
        depth = (len(raw) - len(raw.lstrip())) // 2
        for child in waiting.pop(depth + 1, []):
            importers.setdefault(child, name)
        waiting.setdefault(depth, []).append(name)
        modules.add(name)
        if "." not in name:  # a package root: its first import carries its whole cost
            top.setdefault(name, int(cumulative))
    return ImportTrace(proc.returncode, modules, importers, top)
