"""What `collector run` writes is private (0700 folders, 0600 files), stays inside its data dir,
and a data dir that cannot be created is one clear line, not a traceback."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, read_lake, run_cli, write_config

TEMP = ROOT / "sample_data" / "temp.yaml"


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=180, env={"PYTHONPATH": str(ROOT), **(env or {})})


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".git" not in p.parts}


@pytest.mark.parametrize("private", [False, True])
def test_run_creates_its_files_owner_only_and_the_lake_per_the_umask(
    tmp_path: Path, private: bool
) -> None:
    data = tmp_path / "data"
    lake = {"name": "lake", "type": "lake", "path": str(data / "lake"), "private": private}
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "data_dir": str(data),
            "sources": [{"name": "room", "type": "simulated", "every": "1s"}],
            "transforms": [{"type": "window", "every": "1m", "aggs": ["mean"]}],
            "sinks": [lake],
        },
    )
    old = os.umask(0o022)  # the user's umask, inherited by the collector
    try:
        res = run("run", str(cfg), "--once", cwd=tmp_path)
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr
    seen = {"log": False, "spool": False, "status.json": False, "lake": False}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for p in data.rglob("*"):
        mode = stat.S_IMODE(p.lstat().st_mode)
        top = p.relative_to(data).parts[0]
        if top in seen:
            seen[top] = True
        if top == "lake" and not private:
            assert mode == (0o755 if p.is_dir() else 0o644), f"{p}: {mode:o}"
        else:
            assert mode == (0o700 if p.is_dir() else 0o600), f"{p}: {mode:o}"
    assert all(seen.values()), seen
    assert read_lake(data / "lake").height > 0


def test_an_open_existing_data_dir_is_used_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "data_dir": str(data),
            "sources": [{"name": "room", "type": "simulated", "every": "1s"}],
            "sinks": [{"name": "c", "type": "console"}],
        },
    )
    res = run("run", str(cfg), "--once", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"data dir {data} is open to other users (mode 755): chmod 700" in res.stderr
    assert stat.S_IMODE((data / "status.json").stat().st_mode) == 0o600


def test_data_dir_option_moves_every_data_dir_reference_of_the_config(tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    target = tmp_path / "D"
    before_repo, before_cwd = tree(ROOT), tree(elsewhere)
    res = run("run", str(TEMP), "--data-dir", str(target), "--once", cwd=elsewhere,
              env={"DATA_DIR": "/nonexistent/should-be-overridden"})
    assert res.returncode == 0, res.stderr
    assert tree(elsewhere) == before_cwd  # no ./data in the working directory
    new_in_repo = {p for p in tree(ROOT) - before_repo if "data" in p or "lake" in p}
    assert not new_in_repo
    assert read_lake(target / "lake").height > 0  # ${DATA_DIR:-./data}/lake resolved to D
    assert (target / "status.json").exists()


def test_help_states_the_data_dir_rule_and_from_start(tmp_path: Path) -> None:
    res = run("run", "--help", cwd=tmp_path)
    text = " ".join(res.stdout.split())
    assert "set the environment variable DATA_DIR=DIR before the config is read" in text
    assert "--from-start" in text and "a replay starts its file again" in text


def one_error_line(res: subprocess.CompletedProcess[str], fragment: str) -> str:
    assert res.returncode in (1, 2), res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and fragment in errors[0], res.stderr
    return errors[0]


def test_a_data_dir_that_cannot_be_created_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file where a folder should be")
    data_dir = blocker / "data"
    res = run("run", str(TEMP), "--data-dir", str(data_dir), "--once", cwd=tmp_path)
    one_error_line(res, f"cannot use data dir {data_dir}: Not a directory")
    res = run("run", str(TEMP), "--data-dir", str(blocker), "--once", cwd=tmp_path)
    assert res.returncode == 2 and "is a file" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A tiny tmpfs, filled up; skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    opts = "size=64k,nr_inodes=16,mode=0700"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_fresh_data_dir_on_a_full_disk_is_one_clear_line(full_disk: Path) -> None:
    data = full_disk / "data"
    res = run("run", str(TEMP), "--data-dir", str(data), "--once", cwd=full_disk.parent)
    one_error_line(res, str(data))
    assert "No space left on device" in res.stderr


def test_a_full_disk_with_no_inodes_left_is_one_clear_line(full_disk: Path) -> None:
    for i in range(64):  # use up the inodes too: mkdir itself fails
        try:
            (full_disk / f"d{i}").mkdir()
        except OSError:
            break
    data = full_disk / "data"
    res = run("run", str(TEMP), "--data-dir", str(data), "--once", cwd=full_disk.parent)
    one_error_line(res, f"cannot use data dir {data}: No space left on device")
