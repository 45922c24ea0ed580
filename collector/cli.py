"""The `collector` command: run | check | export | status | catalog | plugins | schema."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from collector import redact
from collector.errors import ConfigError
from collector.runtime.fsutil import private_files

EXIT_CONFIG = 2
EXIT_IO = 1
"""`collector run` creates everything owner-only: readings, spools and logs are nobody else's
business on a shared gateway (folders 0700, files 0600)."""
log = logging.getLogger("collector")


def _console() -> Any:
    """A rich Console for stdout that never cuts a line when stdout is not a terminal.

    Piped or redirected, rich would assume 80 columns and crop or wrap tables (names, times);
    a pipe has no width, so the width is only a bound no line reaches.
    """
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=100_000, soft_wrap=True)


def _setup_logging(level: str) -> None:
    """Rich on a terminal; plain one-line records for files, journald and pipes."""
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, console=Console(stderr=True))
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    # on the handler, so records of every library (botocore, elastic_transport…) pass it too
    handler.addFilter(redact.Filter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in (
        "apscheduler",
        "botocore",
        "aiobotocore",
        "urllib3",
        "elastic_transport",
        "asyncio",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_or_exit(
    path: str, *, import_plugins: bool = True, require_extras: bool = True
) -> Any:
    """The validated config, or its problems on stderr and exit 2.

    ``require_extras=False`` for commands that only read the config (`status`, `catalog`): they
    work without the optional packages of its plugins (psutil, aiobotocore…), which only
    `check` and `run` need.
    """
    from collector import config

    try:
        return config.load(path, import_plugins=import_plugins, require_extras=require_extras)
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(redact.text(str(issue)), err=True)
        n = len(exc.issues)
        click.echo(f"{n} problem{'s' if n != 1 else ''} in {path}", err=True)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edge-collector")
def cli() -> None:
    """Collect sensor readings on an edge device and deliver them, durably, to the cloud.

    \b
    Quick start:
      collector check sample_data/temp.yaml     validate a config (no I/O)
      collector run sample_data/temp.yaml       run it (Ctrl-C stops, flushing everything)
      collector status --data-dir ./data        backlog and errors per sink
      collector export --lake ./data/lake --since -1d --out today.parquet
    """


@cli.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--once",
    is_flag=True,
    help="One tick of every scheduled source (finite streams run to their end), a "
    "full flush, deliver, exit. Exit 1 if rows had to stay in the spool.",
)
@click.option(
    "--for", "duration", metavar="DURATION", help="Run this long (e.g. 30s, 5m), then stop cleanly."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Use DIR as `data_dir`, and set the environment variable DATA_DIR=DIR before the "
    "config is read (and re-read on SIGHUP), so `${DATA_DIR:-./data}` in the config (the lake "
    "path of the samples) resolves inside DIR too.",
)
@click.option(
    "--from-start",
    is_flag=True,
    help="Sources ignore their saved positions: a replay starts its file again.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def run(
    config_file: str,
    once: bool,
    duration: str | None,
    data_dir: str | None,
    from_start: bool,
    log_level: str,
) -> None:
    """Run the collector on CONFIG_FILE.

    SIGINT/SIGTERM stop sources, flush windows and batches and exit 0 (data a sink could not
    take yet stays in the spool for the next start). SIGHUP reloads CONFIG_FILE; an invalid new
    config is logged and the running one kept. Files and folders are created owner-only
    (umask 077).
    """
    # before anything is written: log, spool, status, checkpoint, dead letters, lock
    private_files()
    _setup_logging(log_level)
    root = None
    if data_dir:
        root = Path(data_dir).absolute()
        os.environ["DATA_DIR"] = str(root)  # the one rule: ${DATA_DIR} is --data-dir
    cfg = _load_or_exit(config_file)
    _size_thread_pool(cfg.settings.runtime.threads)
    seconds = None
    if duration:
        from collector.units import parse_duration

        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--for") from None
    code = _run_loop(_run(config_file, cfg, once, seconds, root, from_start))
    # Everything durable is fsynced by now. A plugin thread stuck in a device read must not keep
    # the process alive (interpreter exit would join it forever), so leave directly.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _size_thread_pool(threads: int | None) -> None:
    """Apply `runtime.threads`: Polars sizes its pool from ``POLARS_MAX_THREADS`` once, at
    import, and the config had to be read (with Polars) to know the size, so the process starts
    itself again with the variable set. Costs one more start-up, only when the option is set."""
    if threads is None or os.environ.get("POLARS_MAX_THREADS") == str(threads):
        return
    from collector.runtime import fsutil

    os.environ["POLARS_MAX_THREADS"] = str(threads)
    if fsutil.USER_UMASK is not None:
        os.umask(fsutil.USER_UMASK)  # the new process takes it as the user's umask again
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "collector", *sys.argv[1:]])


def _run_loop(main: Any) -> int:
    """asyncio.run without its final wait on executor threads (a hung read would block it)."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=5))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class _FlushOnStop:
    """Whether the stopping run flushes its open windows, decided when it stops, not when it
    starts: a reload that keeps the transform chain hands the windows on instead (the next
    Runtime restores them from the checkpoint), so a minute is not cut in two rows.

    ``Runtime.run(flush=...)`` tests it with ``if flush:`` at shutdown.
    """

    def __init__(self) -> None:
        self.value = True

    def __bool__(self) -> bool:
        return self.value


def _prepare_data_dir(root: Path) -> None:
    """Create the data dir owner-only; warn when an existing one is open to other users."""
    if not root.exists():
        root.mkdir(mode=0o700, parents=True)
        return
    mode = root.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "data dir %s is open to other users (mode %o): chmod 700 %s to keep readings "
            "private", root, mode, root,
        )


async def _run(
    path: str,
    cfg: Any,
    once: bool,
    duration: float | None,
    data_dir: Path | None,
    from_start: bool = False,
) -> int:
    import asyncio

    from collector import config
    from collector.runtime.runner import Runtime, pid_lock

    root = data_dir or Path(cfg.settings.data_dir)
    try:
        _prepare_data_dir(root)
        lock = pid_lock(root)
    except OSError as exc:
        log.error("cannot use data dir %s: %s", root, exc.strerror or exc)
        return EXIT_IO
    if lock is None:
        log.error("another collector is running on %s (see %s)", root, root / ".lock")
        return EXIT_CONFIG
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopping = {"signal": False}
    reload_to: dict[str, Any] = {}
    reloading: set[asyncio.Task[None]] = set()
    flush = _FlushOnStop()
    totals = _Totals()

    def on_stop() -> None:
        if stopping["signal"]:
            # a second Ctrl-C: leave now; the log and spools are durable, the next start
            # replays from the last checkpoint
            log.warning("second stop signal: exiting without waiting for the sinks")
            logging.shutdown()
            os._exit(1)
        stopping["signal"] = True
        reload_to.pop("cfg", None)  # a stop wins over a pending reload
        flush.value = True
        log.info("stopping: flushing windows and batches (again to exit at once)")
        stop.set()

    async def reload() -> None:
        # Parsed in a thread, within the same size/alias/depth limits as `check`: a hostile
        # or huge file costs a thread, never the event loop (ingestion and SIGTERM go on).
        try:
            new = await asyncio.to_thread(config.load, path)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config:\n%s", exc)
            return
        except Exception as exc:  # never let a reload take the collector down
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        if stopping["signal"] or stop.is_set():
            return  # a stop signal came while parsing: stop, do not reload
        if data_dir is None and Path(new.settings.data_dir) != Path(cfg.settings.data_dir):
            log.error(
                "reload rejected: data_dir changed (%s -> %s); restart the collector to move it",
                cfg.settings.data_dir,
                new.settings.data_dir,
            )
            return
        _warn_exposed(new)
        if new.settings.runtime.threads != cfg.settings.runtime.threads:
            log.warning("runtime.threads changed: the thread pool keeps its size until a restart")
        reload_to["cfg"] = new
        flush.value = new.transforms_fingerprint != cfg.transforms_fingerprint
        log.info(
            "reloading %s (%s)",
            path,
            "transforms changed: open windows are flushed"
            if flush.value
            else "transforms unchanged: open windows carry on",
        )
        stop.set()

    def on_hup() -> None:
        if reloading:
            log.warning("SIGHUP ignored: the previous reload is still being read")
            return
        task = loop.create_task(reload())
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    previous = None
    _warn_exposed(cfg)
    try:
        while True:
            try:
                runtime = Runtime(cfg, data_dir, from_start=from_start)
            except ConfigError as exc:
                for issue in exc.issues:
                    issue.file = issue.file or path
                    log.error("%s", issue)
                if previous is None:
                    return EXIT_CONFIG
                log.error("new config cannot start; going back to the running one")
                cfg, previous = previous, None
                continue
            except OSError as exc:
                log.error(
                    "cannot start in data dir %s: %s%s",
                    root,
                    exc.strerror or exc,
                    f" ({exc.filename})" if exc.filename else "",
                )
                return EXIT_IO
            from_start = False  # a reload continues where this run got to
            previous = cfg
            log.info(
                "collector %s: %d source(s), %d transform(s), %d sink(s), data in %s",
                cfg.settings.device,
                len(cfg.sources),
                len(cfg.transforms),
                len(cfg.sinks),
                runtime.data_dir,
            )
            flush.value = True
            code = await runtime.run(
                once=once, duration=duration, stop=stop, flush=flush  # type: ignore[arg-type]
            )
            totals.add(runtime)
            if "cfg" not in reload_to:
                log.info("%s", totals.stopped_line(runtime, code))
                return code
            if runtime.pipeline_still_running:  # two pipelines on one log would collide
                log.error(
                    "cannot reload while the old pipeline is still busy; exiting so the "
                    "service manager starts the collector again with the new config"
                )
                log.info("%s", totals.stopped_line(runtime, 1))
                return 1
            cfg = reload_to.pop("cfg")
            stop.clear()
    finally:
        lock.close()


class _Totals:
    """Rows read and delivered over the whole `collector run`, reloads included."""

    def __init__(self) -> None:
        self.rows_in = 0.0
        self.delivered: dict[str, float] = {}

    def add(self, runtime: Any) -> None:
        for (name, labels), value in runtime.counters.snapshot():
            if name == "rows_in_total":
                self.rows_in += value
            elif name == "delivered_rows_total":
                sink = dict(labels).get("sink", "?")
                self.delivered[sink] = self.delivered.get(sink, 0) + value

    def stopped_line(self, runtime: Any, code: int) -> str:
        """``collector stopped: 120 rows in, delivered lake=24 console=24 (exit 0)``."""
        delivered = " ".join(
            f"{name}={self.delivered.get(name, 0):,.0f}" for name in runtime.sinks
        )
        left = sum(r.spool.backlog_rows for r in runtime.sinks.values())
        return (
            f"collector stopped: {self.rows_in:,.0f} rows in, delivered "
            f"{delivered or 'nothing (no sinks)'}"
            + (f", {left:,} rows left in the spool" if left else "")
            + f" (exit {code})"
        )


def _warn_exposed(cfg: Any) -> None:
    from collector.config import is_loopback

    tele = cfg.settings.telemetry
    if tele.enabled and not is_loopback(tele.host):
        log.warning(
            "telemetry.expose: /metrics and /health listen on %s:%s, reachable from the "
            "network without authentication",
            tele.host,
            tele.port,
        )


@cli.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--estimate",
    is_flag=True,
    help="Also print Firehose records, calls and billable bytes per day for the "
    "config's rates, against one record per reading.",
)
def check(config_file: str, estimate: bool) -> None:
    """Validate CONFIG_FILE without touching network or devices.

    Errors print as FILE:LINE path.to.field: message; the exit code is 2. A
    `type: package.module:Class` plugin is located but not imported (importing runs its code);
    `collector run` imports it and checks its own fields at start.
    """
    cfg = _load_or_exit(config_file, import_plugins=False)
    click.echo(
        f"{config_file}: OK ({len(cfg.sources)} source(s), {len(cfg.transforms)} "
        f"transform(s), {len(cfg.sinks)} sink(s))"
    )
    for comp in (*cfg.sources, *cfg.transforms, *cfg.sinks):
        if not comp.imported:
            click.echo(
                f"  {comp.kind}[{comp.index}] {comp.config.type}: found, not imported; its own "
                "fields are checked when `collector run` starts"
            )
    if estimate:
        from collector.commands.estimate import print_estimate

        print_estimate(cfg)


@cli.command()
def schema() -> None:
    """Print the JSON schema of the config file (for editors and CI)."""
    from collector.config import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@cli.command()
@click.option(
    "--kind", type=click.Choice(["sources", "transforms", "sinks"]), help="Only this kind."
)
def plugins(kind: str | None) -> None:
    """List plugins with a one-line description and an example.

    On a terminal the examples are highlighted; piped or redirected, the output is plain text
    with every example line whole (indented by two spaces: paste it under `sources:`).
    """
    from collector import registry

    if not sys.stdout.isatty():
        _plugins_plain(registry, kind)
        return
    from rich.console import Console
    from rich.syntax import Syntax

    console = Console()
    for k in ("sources", "transforms", "sinks"):
        if kind and k != kind:
            continue
        console.rule(f"[bold]{k}")
        for name in sorted(registry.available(k)):  # type: ignore[arg-type]
            try:
                cls = registry.load(k, name)  # type: ignore[arg-type]
            except Exception as exc:
                console.print(f"[bold]{name}[/]  (cannot load: {exc})")
                continue
            console.print(f"[bold cyan]{name}[/]  {cls.description}")
            if cls.example:
                console.print(
                    Syntax(cls.example.strip(), "yaml", padding=(0, 2), word_wrap=True)
                )


def _plugins_plain(registry: Any, kind: str | None) -> None:
    first = True
    for k in ("sources", "transforms", "sinks"):
        if kind and k != kind:
            continue
        if not first:
            click.echo()
        first = False
        click.echo(f"=== {k} ===")
        for name in sorted(registry.available(k)):
            click.echo()
            try:
                cls = registry.load(k, name)
            except Exception as exc:
                click.echo(f"{name}  (cannot load: {exc})")
                continue
            click.echo(f"{name}  {cls.description}".rstrip())
            if cls.example:
                click.echo()
                for line in cls.example.strip("\n").splitlines():
                    click.echo(f"  {line}".rstrip())


@cli.command()
@click.option(
    "--data-dir",
    default="./data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="The collector's data_dir.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Take data_dir from this config instead.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(data_dir: str, config_file: str | None, as_json: bool) -> None:
    """Backlog, oldest data, last success and last error per sink.

    Works while the collector runs and after it stopped or died: it reads the status file the
    collector keeps and looks at the spool folders directly.
    """
    from rich.table import Table

    from collector.runtime.telemetry import fmt_time, read_status

    if config_file:
        cfg = _load_or_exit(config_file, import_plugins=False, require_extras=False)
        data_dir = str(cfg.settings.data_dir)
    if not Path(data_dir).is_dir():
        what = "is not a folder" if Path(data_dir).exists() else "does not exist"
        click.echo(
            f"data dir {data_dir} {what}: no collector has run there (give the `data_dir` of "
            "the config with --data-dir DIR, or --config FILE)",
            err=True,
        )
        sys.exit(EXIT_IO)
    st = read_status(Path(data_dir))
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    console = _console()
    piped = not sys.stdout.isatty()
    state = "running" if st.get("alive") else "not running"
    if not st.get("sinks") and not st.get("updated_at"):
        click.echo(f"no collector has run with data dir {data_dir} (no status.json, no spool)")
        return
    click.echo(
        f"collector in {data_dir}: {state} (status written {fmt_time(st.get('updated_at'))})"
    )
    table = Table()
    for header in (
        "sink",
        "backlog",
        "oldest",
        "delivered",
        "dead-lettered",
        "dropped",
        "last success",
        "last error",
    ):  # fold, never hide: a cut sink name or time is useless
        table.add_column(header, overflow="fold")
    for name, s in sorted(st.get("sinks", {}).items()):
        dropped = s.get("dropped_rows") or {}
        age = s.get("oldest_file_age_s")
        table.add_row(
            name,
            f"{s.get('backlog_files', 0)} files / {s.get('backlog_bytes', 0):,} B",
            "-" if age is None else f"{age:.0f}s",
            f"{s.get('delivered_rows', 0):,.0f}",
            f"{s.get('dead_lettered_rows', 0):,.0f} ({s.get('dead_letter_files', 0)} files)",
            ", ".join(f"{k}={v:,.0f}" for k, v in dropped.items()) or "0",
            fmt_time(s.get("last_success")),
            _one_line(s.get("last_error") or "-", None if piped else 80),
        )
    console.print(table)


def _one_line(text: str, limit: int | None) -> str:
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Print the DDL of every s3 sink in this config.",
)
@click.option("--s3", "s3_url", metavar="s3://BUCKET/PREFIX", help="Or: a lake location.")
@click.option(
    "--firehose",
    "firehose_url",
    metavar="s3://BUCKET/PREFIX",
    help="Or: the S3 destination of a Firehose delivery stream (NDJSON objects under "
    "Firehose's YYYY/MM/DD/HH/ prefixes).",
)
@click.option(
    "--partition-by",
    default="metric,date",
    show_default=True,
    help="With --s3: the partition keys, outermost first.",
)
@click.option("--database", help="Glue database to create the table in.")
@click.option("--table", help="Table name (default: the sink's name, or `readings`).")
def catalog(
    config_file: str | None,
    s3_url: str | None,
    firehose_url: str | None,
    partition_by: str,
    database: str | None,
    table: str | None,
) -> None:
    """Print Athena/Glue DDL for the S3 lake (partition projection: no crawler, no MSCK).

    The documented replacement for IoT Analytics datastores: paste the output into Athena.
    Column types follow the files (lists are array<…>, structs struct<…>). A comment explains
    record_id (<device slug>-<instance id>-<first offset>-<last offset>[-<part>]:<row>);
    Firehose tables (at least once) get a `<table>_dedup` view, one row per record_id.

    \b
      collector catalog --config collector.yaml
      collector catalog --s3 s3://my-sensor-lake/readings --partition-by device,date,hour
    """
    from collector.commands import catalog as cat

    if sum(map(bool, (config_file, s3_url, firehose_url))) != 1:
        raise click.UsageError("give exactly one of --config, --s3 and --firehose")
    try:
        if config_file:
            cfg = _load_or_exit(config_file, import_plugins=False, require_extras=False)
            columns = None
            if cfg.output is not None:  # the columns the sinks really receive
                columns = {
                    **cat.columns_from_schema(cfg.output.to_arrow().schema),
                    "record_id": "string",
                }
            click.echo(cat.ddl_for_config(cfg, columns=columns, table=table, database=database))
        elif firehose_url:
            click.echo(
                cat.ddl_firehose_json(
                    firehose_url, table=table or "readings_stream", database=database
                )
            )
        else:
            parts = [p.strip() for p in partition_by.split(",") if p.strip()]
            click.echo(cat.ddl(s3_url, parts, None, table or "readings", database))  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command("export")
@click.option(
    "--lake",
    required=True,
    help="Lake root: a folder or s3://bucket/prefix; or one sink's spool folder "
    "(DATA_DIR/spool/SINK, detected by its *.arrow files or inflight/ folder): the rows not "
    "uploaded yet.",
)
@click.option(
    "--since",
    help="Start, inclusive: 2024-06-01, 2024-06-01T12:00Z, now, today, yesterday, -1d, -2h30m.",
)
@click.option("--until", help="End, exclusive; same forms as --since.")
@click.option("--device", "devices", multiple=True, help="Only this device (repeatable).")
@click.option("--metric", "metrics", multiple=True, help="Only this metric (repeatable).")
@click.option("--source", "sources", multiple=True, help="Only this source (repeatable).")
@click.option("--where", help="Polars SQL condition on the rows, e.g. 'max > 28'.")
@click.option("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL).")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="FILE.parquet or FILE.csv (format from the suffix).",
)
@click.option(
    "--keep-partial",
    is_flag=True,
    help="Also the partial window rows a stop wrote (by default a window's complete row "
    "supersedes them: one row per window).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def export_cmd(
    lake: str,
    since: str | None,
    until: str | None,
    devices: tuple[str, ...],
    metrics: tuple[str, ...],
    sources: tuple[str, ...],
    where: str | None,
    endpoint_url: str | None,
    out: Path,
    keep_partial: bool,
    no_progress: bool,
) -> None:
    """Write lake (or spool) rows matching the filters to Parquet or CSV.

    Only the partitions the filters can match are read (partition pruning), so a day out of a
    year-long lake is quick. A spool folder (a sink's batches not uploaded yet: ready and in
    flight, not its dead letters) is read with the same filters. Examples:

    \b
      collector export --lake ./data/lake --since -1d --metric temperature --out today.parquet
      collector export --lake ./data/spool/bulk --out pending.csv
    """
    from collector.commands.export import run_export

    try:
        n = run_export(
            lake,
            out,
            since=since,
            until=until,
            devices=devices,
            metrics=metrics,
            sources=sources,
            where=where,
            endpoint_url=endpoint_url,
            progress=not no_progress,
            keep_partial=keep_partial,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{n} rows -> {out}")


def main() -> None:
    # Pydantic looks for its own plugins (observability hooks) in the metadata of every
    # installed package when the first model is built: 25 ms of each start on a small device,
    # for hooks a collector does not use. Set the variable to anything else to keep them.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    cli(prog_name="collector")


if __name__ == "__main__":
    main()
