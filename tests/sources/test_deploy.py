"""deploy/: the systemd unit and the Greengrass recipe start a working collector, and AWS
credentials from the Greengrass token exchange service reach a sink with no config.

The unit and recipe commands are run for real: their variables are filled in the way systemd and
the Greengrass nucleus would, with this checkout's venv standing in for the installed one.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from collector.testing import TokenExchange, fake_token_exchange, moto_server
from tests.sources.peers import ROOT, read_lake, stop_process, wait_for

VENV = Path(sys.executable).parent.parent
SIMULATED = """\
device: ${DEVICE_ID:-unset}
data_dir: ./ignored
telemetry: {enabled: false}
sources:
  - {name: room, type: simulated, every: 1s, metrics: {temperature: {min: 0, max: 30}}}
sinks:
  - {name: lake, type: lake, path: "${DATA_DIR:-./ignored}/lake", batch: {max_age: 200ms}}
"""


def run_until_lake(cmd: list[str], env: dict[str, str], lake: Path, log: Path) -> None:
    """Start the deployed command, wait for readings in the lake, stop it like the supervisor."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=fh, cwd=log.parent)
    try:
        wait_for(lambda: read_lake(lake).height > 0 or proc.poll() is not None, 60, "lake")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop_process(proc, signal.SIGTERM)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_greengrass_recipe_runs_the_collector(tmp_path: Path) -> None:
    recipe = yaml.safe_load((ROOT / "deploy" / "greengrass" / "recipe.yaml").read_text())
    assert "aws.greengrass.TokenExchangeService" in recipe["ComponentDependencies"]
    manifest = next(m for m in recipe["Manifests"] if m["Platform"]["os"] == "linux")
    lifecycle = manifest["Lifecycle"]
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]

    work, artifacts = tmp_path / "work", tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "edge-collector").symlink_to(ROOT)
    work.mkdir()
    (work / "venv").symlink_to(VENV)
    config = tmp_path / "device-config.yaml"
    config.write_text(SIMULATED)
    variables = {
        "{work:path}": str(work),
        "{artifacts:decompressedPath}": str(artifacts),
        "{iot:thingName}": "thing-42",
        "{configuration:/configPath}": str(config),
        **{f"{{configuration:/{k}}}": str(v) for k, v in defaults.items() if k != "configPath"},
    }

    def render(text: str) -> str:
        for key, value in variables.items():
            text = text.replace(key, value)
        assert "{" not in text.replace("${", ""), f"unrendered recipe variable in {text!r}"
        return text

    stamp = render("{work:path}/venv/.installed-0.1.0-{configuration:/extras}")
    assert stamp in render(lifecycle["Install"]["Script"])  # reinstall skipped on restart
    env = {"PATH": os.environ["PATH"], **{k: render(v) for k, v in lifecycle["Setenv"].items()}}
    run_until_lake(
        ["sh", "-c", render(lifecycle["Run"]["Script"])],
        env,
        work / "data" / "lake",
        tmp_path / "gg.log",
    )
    df = read_lake(work / "data" / "lake")
    assert set(df["device"]) == {"thing-42"} and set(df["source"]) == {"room"}


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "deploy" / "edge-collector.service")
    return parser


def test_systemd_unit_runs_the_collector(tmp_path: Path) -> None:
    svc = _unit()["Service"]
    assert svc["Restart"] == "always" and svc["KillSignal"] == "SIGTERM"
    state = tmp_path / "state"
    state.mkdir()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.yaml").write_text(SIMULATED)

    def render(cmd: str) -> list[str]:
        cmd = (
            cmd.replace("/opt/edge-collector/venv", str(VENV))
            .replace("/etc/edge-collector", str(etc))
            .replace("${STATE_DIRECTORY}", str(state))
        )
        return cmd.split()

    env = {
        "PATH": os.environ["PATH"],
        "STATE_DIRECTORY": str(state),
        "DEVICE_ID": "gw-unit",
        "DATA_DIR": str(state),
    }
    check = subprocess.run(render(svc["ExecStartPre"]), env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run_until_lake(render(svc["ExecStart"]), env, state / "lake", tmp_path / "unit.log")
    assert set(read_lake(state / "lake")["device"]) == {"gw-unit"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd's own parser; only the binary path is pointed at this venv."""
    unit = tmp_path / "edge-collector.service"
    unit.write_text(
        (ROOT / "deploy" / "edge-collector.service")
        .read_text()
        .replace("/opt/edge-collector/venv", str(VENV))
    )
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if ("edge-collector.service" in line and "Failed to" not in line)
        or "Unknown key" in line
        or "Unknown section" in line
    ]
    assert not problems, out.stdout + out.stderr


# -- Greengrass token exchange service -> botocore's container provider -> S3 sink --------------


@pytest.fixture
def fake_tes() -> Iterator[TokenExchange]:
    with fake_token_exchange(token="gg-tes-token", access_key="ASIAGREENGRASSTES") as tes:
        yield tes


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[str]:
    with moto_server(tmp_path / "moto.log") as url:
        yield url


@pytest.mark.slow
def test_token_exchange_credentials_need_no_config(
    tmp_path: Path, fake_tes: TokenExchange, moto: str
) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    s3.create_bucket(Bucket="lake")
    config = tmp_path / "c.yaml"
    config.write_text(f"""\
device: gg-core
data_dir: {tmp_path / "data"}
telemetry: {{enabled: false}}
sources:
  - {{name: room, type: simulated, every: 1s, metrics: {{temperature: {{min: 0, max: 30}}}}}}
sinks:
  - {{name: cloud, type: s3, bucket: lake, endpoint_url: "{moto}", batch: {{max_age: 200ms}}}}
""")
    # exactly what the nucleus gives a component that depends on the token exchange service
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            **fake_tes.env,
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    log = tmp_path / "collector.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "collector", "run", str(config)],
            env=env,
            stdout=fh,
            stderr=fh,
            cwd=ROOT,
        )
    try:
        wait_for(
            lambda: (
                s3.list_objects_v2(Bucket="lake").get("KeyCount", 0) > 0 or proc.poll() is not None
            ),
            60,
            "an object in S3",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop_process(proc)
    seen = {r["auth"] for r in fake_tes.requests}
    assert fake_tes.requests and seen == {fake_tes.token}
