"""The guarantees under the Polars-only, log-positions design: kill -9 during a replay loses
nothing and writes nothing twice.

Since issue 19 a replay logs file references (file, fingerprint, row range) instead of the rows
themselves, and the pipeline reads the rows from the file again after a crash. A benchmark that
got faster by giving up a guarantee would not count, so this one checks the guarantee on the
same input as ``benchmarks.throughput`` (its ``generate(rows)`` and ``collector_config``, 10 M
narrow rows by default):

1. ``collector run CFG`` (not ``--once``: a long-running service) in a subprocess, on one data
   dir and lake throughout;
2. SIGKILL at K points (default 5) drawn at random (seeded) over the file: each run is killed
   a random instant (up to ``--jitter``) after the replay position in its device log has
   passed that run's point, which is also proof the run made progress of its own (a point an
   earlier kill overshot is drawn again from what is left); a run whose replay finished first
   is killed anyway and not counted as mid-replay, and no more kills follow. Every other run
   is killed only after it committed a checkpoint of its own, so restarts resume both from the
   log's top and from mid-replay transform state;
3. ``collector run CFG --once`` finishes the job (it must exit 0: no rows left in the spool);
4. the lake is checked against the input: per 1-minute window (ts, device, metric), the
   ``count`` of the lake's row, after complete rows supersede partial ones as ``collector
   export`` does (``lakequery.supersede_partials``), must equal the readings that pass the
   filter; no window may have two complete rows and no ``record_id`` may appear twice.

The lake sink's batch is cut to ``--batch-rows`` aggregate rows (20,000 by default instead of
the throughput config's 1 M) so that lake files are written during the replay and the kills
land between lake writes too, not only before the first one; ``log.checkpoint_every`` is cut
to 250 ms (default 2 s) so that runs of a second or two commit checkpoints and the restarts
resume from them, as a long-running service's would. The process exits 1 when the
guarantee fails.

    python -m benchmarks.replay_kill [--rows 10000000] [--kills 5] [--seed 19]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import OUT, collector_cmd, env, run_measured, table, write_json, write_yaml
from benchmarks.throughput import WHERE, collector_config, expected_readings, generate

POLL_S = 0.01
RUN_TIMEOUT_S = 600.0


@dataclass
class Position:
    """The replay position of the newest data record in the device log."""

    rows: int
    done: bool
    records: int


def logged_position(log_dir: Path) -> Position | None:
    """Read the device log without opening it for writing (no repair, no truncation).

    Opening ``DeviceLog`` would cut a torn tail, which is the collector's own job on its next
    start; this reader only scans, so what the next run finds is exactly what the kill left.
    """
    from collector.runtime.log import SEGMENT_HEADER, Kind, _Rec, _scan

    readings = (Kind.DATA, Kind.REF)  # rows, or a replay's references to rows of its file
    last: dict[str, Any] | None = None
    records = 0
    for path in sorted(glob.glob(str(log_dir / "*.log"))):
        with open(path, "rb") as fh:
            if fh.read(len(SEGMENT_HEADER)) != SEGMENT_HEADER:
                continue
            for rec in _scan(fh):
                if not isinstance(rec, _Rec) or rec.kind not in readings or not rec.meta:
                    continue
                records += 1
                meta = json.loads(rec.meta)
                if isinstance(meta.get("p"), dict) and "rows" in meta["p"]:
                    last = meta["p"]
    if last is None:
        return None
    return Position(int(last["rows"]), bool(last.get("done")), records)


@dataclass
class Kill:
    """One SIGKILL: when, at which logged replay position, and what the lake held then."""

    target_rows: int
    rows_at_start: int
    rows_at_kill: int
    replay_done: bool
    seconds_after_start: float
    lake_files: int
    resumed_after_offset: int | None
    """The log offset this run's checkpoint resumed after (None: no checkpoint yet)."""
    waited_for_checkpoint: bool
    """Killed only after this run had committed a checkpoint of its own."""


def kill_run(
    cfg: Path,
    data: Path,
    lake: Path,
    target: int,
    since: int,
    delay: float,
    work: Path,
    after_checkpoint: bool = False,
) -> Kill:
    """Start the service, wait until its replay position passed ``target`` (and ``since``, the
    position it started from), then ``delay`` seconds more, and SIGKILL it.

    The delay (random, seeded) moves the kill off the instant a log record was appended, so the
    kills land anywhere in a chunk's way through filter, window, spool and lake write. With
    ``after_checkpoint`` the run must also have committed a checkpoint (the state file changed
    since the start), so the next start resumes from mid-replay state, not from the log's top.
    """
    cmd = collector_cmd(cfg, "--data-dir", str(data), "--log-level", "info")
    err_path = work / f"kill-{since}.log"
    stderr = open(err_path, "wb")  # noqa: SIM115 - closed below, after the kill
    checkpoint = data / "state" / "checkpoint"
    stamp0 = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        pos = None
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"collector run exited by itself ({proc.returncode}) before kill")
            if time.monotonic() > deadline:
                raise SystemExit(f"no replay progress past row {target} in {RUN_TIMEOUT_S:.0f} s")
            pos = logged_position(data / "log")
            committed = not after_checkpoint or (
                checkpoint.exists() and checkpoint.stat().st_mtime_ns != stamp0
            )
            if (
                pos is not None
                and committed
                and (pos.done or (pos.rows >= target and pos.rows > since))
            ):
                break
            time.sleep(POLL_S)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        elapsed = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    with open(work / "kills.log", "a") as all_logs:
        all_logs.write(err_path.read_text(errors="replace"))
    after = logged_position(data / "log") or pos
    assert after is not None
    return Kill(
        target_rows=target,
        rows_at_start=since,
        rows_at_kill=after.rows,
        replay_done=after.done,
        seconds_after_start=round(elapsed, 2),
        lake_files=len(list(lake.rglob("*.parquet"))),
        resumed_after_offset=resume_offset(err_path.read_text(errors="replace")),
        waited_for_checkpoint=after_checkpoint,
    )


def resume_offset(stderr: str) -> int | None:
    """The offset of the runner's "resuming after log offset N" line, if it logged one."""
    m = re.search(r"resuming after log offset (\d+)", stderr)
    return int(m.group(1)) if m else None


def expected_windows(src: Path) -> Any:
    """Readings per (ts, device, metric) 1-minute window that pass the filter, from the input."""
    import polars as pl

    return (
        pl.scan_parquet(src)
        .filter(pl.col("value").is_between(-40, 85))
        .group_by(pl.col("ts").dt.truncate("1m"), "device", "metric")
        .agg(pl.len().cast(pl.Int64).alias("want"))
        .collect()
    )


def verify(src: Path, lake: Path) -> dict[str, Any]:
    """Compare the lake with the input, window by window."""
    import polars as pl

    from collector.lakequery import supersede_partials

    if not any(lake.rglob("*.parquet")):
        return {"ok": False, "why": "the lake is empty"}
    # A glob, not the folder: a kill in the middle of a lake write leaves its hidden
    # `.part-….parquet.<pid>-….tmp` behind, and Polars refuses a folder of mixed extensions.
    lf = pl.scan_parquet(str(lake / "**" / "*.parquet"), hive_partitioning=True)
    rows = lf.collect()
    keys = ["ts", "device", "metric"]
    complete = rows.filter(~pl.col("partial").fill_null(False))
    twice = complete.group_by(keys).len().filter(pl.col("len") > 1).height
    ids_twice = rows.height - rows.get_column("record_id").n_unique()
    got = (
        supersede_partials(lf)
        .group_by(keys)
        .agg(pl.col("count").sum().alias("got"), pl.len().alias("rows"))
        .collect()
    )
    want = expected_windows(src)
    both = want.join(got, on=keys, how="full", coalesce=True)
    missing = both.filter(pl.col("got").is_null()).height
    extra = both.filter(pl.col("want").is_null()).height
    wrong = both.filter(pl.col("got").is_not_null() & (pl.col("got") != pl.col("want"))).height
    readings = int(got.get_column("got").sum())
    expected = int(want.get_column("want").sum())
    partial_rows = rows.height - complete.height
    ok = twice == 0 and ids_twice == 0 and missing == 0 and extra == 0 and wrong == 0
    ok = ok and readings == expected
    return {
        "ok": ok,
        "lake_rows": rows.height,
        "lake_files": len(list(lake.rglob("*.parquet"))),
        "lake_tmp_files_left": len(list(lake.rglob(".*.tmp"))),
        "complete_rows": complete.height,
        "partial_rows": partial_rows,
        "windows_expected": want.height,
        "windows_in_lake": got.height,
        "windows_twice": twice,
        "record_ids_twice": ids_twice,
        "windows_missing": missing,
        "windows_unexpected": extra,
        "windows_wrong_count": wrong,
        "readings_expected": expected,
        "readings_in_lake": readings,
        "readings_all_rows": int(rows.get_column("count").sum()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="input rows (default 10M)")
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs during the replay")
    ap.add_argument("--seed", type=int, default=19, help="seed of the kill points")
    ap.add_argument(
        "--batch-rows",
        type=int,
        default=20_000,
        help="lake sink batch.max_rows, so lake files are written between kills",
    )
    ap.add_argument("--chunk-rows", type=int, default=None, help="replay chunk_rows")
    ap.add_argument(
        "--checkpoint-every",
        default="250ms",
        help="log.checkpoint_every (default 250ms, not 2s: so the seconds-long runs between "
        "kills commit checkpoints, as a long-running service does, and restarts resume "
        "from them instead of only from the log's start)",
    )
    ap.add_argument(
        "--jitter",
        type=float,
        default=0.05,
        help="largest random delay (s) between passing a kill point and the kill (about one "
        "chunk's time at full speed)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (path printed)")
    args = ap.parse_args(argv)

    src = generate(args.rows)
    want = expected_readings(src)
    rng = random.Random(args.seed)
    targets = sorted(int(rng.uniform(0.05, 0.95) * args.rows) for _ in range(args.kills))
    work = Path(tempfile.mkdtemp(prefix="bench-replay-kill-"))
    lake, data = work / "lake", work / "data"
    conf = collector_config(src, lake, args.chunk_rows)
    conf["sinks"][0]["batch"]["max_rows"] = args.batch_rows
    conf["log"] = {"checkpoint_every": args.checkpoint_every}
    cfg = write_yaml(work / "replay-kill.yaml", conf)
    kills: list[Kill] = []
    t0 = time.perf_counter()
    try:
        since = 0
        for target in targets:
            if kills and kills[-1].replay_done:
                print(f"replay finished before kill {len(kills) + 1}: no more kills")
                break
            if target <= since:  # an earlier kill overshot this point: aim past it again
                target = since + int(rng.uniform(0.05, 0.5) * (args.rows - since))
            delay = rng.uniform(0, args.jitter)
            # every other kill waits for a checkpoint of its run: restarts from mid-replay
            # state as well as from the log's top
            wait_cp = len(kills) % 2 == 1
            k = kill_run(cfg, data, lake, target, since, delay, work, after_checkpoint=wait_cp)
            kills.append(k)
            since = max(since, k.rows_at_kill)
            print(
                f"kill {len(kills)}: at row {k.rows_at_kill:,} of {args.rows:,} "
                f"(aimed {target:,}){' (replay done)' if k.replay_done else ''}, "
                f"{k.seconds_after_start:.2f} s after start, {k.lake_files} lake files",
                flush=True,
            )
        final = run_measured(
            collector_cmd(cfg, "--once", "--data-dir", str(data), "--log-level", "info"), cwd=work
        )
        wall = time.perf_counter() - t0
        check = verify(src, lake)
        check["ok"] = check["ok"] and final.returncode == 0
        log_lines = (work / "kills.log").read_text(errors="replace").splitlines()
        notable = [
            ln
            for ln in [*log_lines, *final.stderr_tail.splitlines()]
            if " WARNING " in ln or " ERROR " in ln or "continuing" in ln
        ]
    finally:
        failed = "check" not in locals() or not check["ok"]
        if args.keep or failed:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    mid = sum(1 for k in kills if not k.replay_done)
    result: dict[str, Any] = {
        "rows": args.rows,
        "filter": WHERE,
        "readings_after_filter": want,
        "seed": args.seed,
        "kills_planned": args.kills,
        "jitter_s": args.jitter,
        "batch_rows": args.batch_rows,
        "checkpoint_every": args.checkpoint_every,
        "chunk_rows": args.chunk_rows,
        "kills": len(kills),
        "mid_replay_kills": mid,
        "restarts_from_checkpoint": sum(1 for k in kills if k.resumed_after_offset),
        "final_resumed_after_offset": resume_offset(final.stderr_tail),
        "kill_points": [asdict(k) for k in kills],
        "final_run": {k: v for k, v in final.as_dict().items() if k != "stderr_tail"},
        "final_exit": final.returncode,
        "wall_s": round(wall, 2),
        "check": check,
        "log_notable": notable[-40:],
        "verdict": "held" if check["ok"] else "FAILED",
        "work_dir_kept": None if check["ok"] and not args.keep else str(work),
    }
    write_json("replay_kill", result)
    c = check
    table(
        f"kill -9 during a {args.rows:,}-row replay: {len(kills)} kills ({mid} mid-replay), "
        "then `collector run --once`",
        ["measure", "value"],
        [
            ("kills (mid-replay)", f"{len(kills)} ({mid})"),
            ("kill points (rows logged)", ", ".join(f"{k.rows_at_kill:,}" for k in kills)),
            (
                "runs resumed after log offset",
                ", ".join(str(k.resumed_after_offset or 0) for k in kills)
                + f", final {result['final_resumed_after_offset'] or 0}",
            ),
            ("final --once", f"exit {final.returncode}, {final.wall_s:.1f} s"),
            ("wall, first start to end", f"{wall:.1f} s"),
            (
                "readings in the lake / expected",
                f"{c.get('readings_in_lake', 0):,} / {c.get('readings_expected', want):,}",
            ),
            (
                "windows in the lake / expected",
                f"{c.get('windows_in_lake', 0):,} / {c.get('windows_expected', 0):,}",
            ),
            (
                "windows missing / wrong count",
                f"{c.get('windows_missing')} / {c.get('windows_wrong_count')}",
            ),
            (
                "windows twice / record_ids twice",
                f"{c.get('windows_twice')} / {c.get('record_ids_twice')}",
            ),
            ("partial rows (superseded or final)", f"{c.get('partial_rows')}"),
            ("temporary files left in the lake", f"{c.get('lake_tmp_files_left')}"),
            ("verdict", result["verdict"]),
        ],
    )
    if not check["ok"]:
        print(f"!! guarantee failed: {json.dumps(check)}")
        if final.returncode != 0:
            print(final.stderr_tail)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("POLARS_MAX_THREADS", "2")
    main()
