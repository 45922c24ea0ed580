"""`infer` config: mistakes are `collector check` errors with a line number, and no I/O."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from collector.plugin import Context
from collector.schema import empty_readings
from collector.transforms.infer import InferConfig, InferTransform

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": {"kind": "sklearn"}}, "path"),
        ({"model": {"kind": "python", "function": "no colon"}}, "pattern"),
        ({"model": {"kind": "tensorflow"}}, "model kind must be one of"),
        ({"model": {"method": "zscore", "window": 10, "warmup": 20}}, "cannot exceed window"),
        ({"model": {"kind": "sklearn", "path": "m.joblib", "method": "ewma"}}, "Extra inputs"),
        ({"features": {"lags": [1]}}, "keeps its own window"),
        ({"model": {"kind": "onnx", "path": "m.onnx"},
          "features": {"pivot": ["a", "b"], "lags": [1]}}, "do not combine"),
        ({"features": {"lags": [0]}, "model": {"kind": "onnx", "path": "m.onnx"}},
         "greater than or equal to 1"),
        ({"confidence_column": "value"}, "overwrite the readings"),
        ({"score_column": "prediction"}, "must differ"),
    ],
)
def test_config_mistakes_are_rejected(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InferConfig.model_validate({"type": "infer", **config})


def test_defaults_are_the_builtin_detector() -> None:
    cfg = InferConfig.model_validate({"type": "infer"})
    assert cfg.model.kind == "builtin" and cfg.model.method == "robust"
    assert cfg.reload_every == 30.0


def test_empty_frame_gives_the_output_schema_without_loading(tmp_path: Path) -> None:
    cfg = InferConfig.model_validate({
        "type": "infer", "model": {"kind": "sklearn", "path": str(tmp_path / "absent.joblib")},
        "features": {"rolling": [5]}, "window_column": "window_values",
    })
    out = InferTransform(cfg, Context("d", "c", tmp_path)).apply(empty_readings(["site"]))
    assert out.schema["prediction"] == pl.Float64
    assert out.schema["confidence"] == pl.Float64
    assert out.schema["window_values"] == pl.List(pl.Float64)
    assert out.columns[:7] == [*empty_readings(["site"]).columns]


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "infer.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "collector", "check", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


PIPELINE = """\
device: edge-01
data_dir: {data}
sources:
  - name: room
    type: simulated
    every: 5s
transforms:
  - type: infer
    model: {model}
sinks:
  - name: unsure
    type: lake
    path: {data}/lake
    where: "{where}"
"""


def test_collector_check_reports_the_line(tmp_path: Path) -> None:
    done = check(tmp_path, PIPELINE.format(data=tmp_path, model="{kind: onnx}",
                                           where="confidence < 0.6"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "infer.yaml:9 transforms[0].model" in done.stdout + done.stderr
    assert "path" in done.stdout + done.stderr


def test_collector_check_types_where_on_the_outputs_and_reads_no_model(tmp_path: Path) -> None:
    missing = f"{{kind: sklearn, path: {tmp_path}/not-there.joblib}}"
    ok = check(tmp_path, PIPELINE.format(data=tmp_path, model=missing, where="confidence < 0.6"))
    assert ok.returncode == 0, ok.stdout + ok.stderr  # no I/O: the file is looked at on start
    typo = check(tmp_path, PIPELINE.format(data=tmp_path, model=missing, where="confidnce < 0.6"))
    assert typo.returncode == 2
    assert "sinks[0].where" in typo.stdout + typo.stderr
