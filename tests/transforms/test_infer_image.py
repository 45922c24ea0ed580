"""Image models in `infer`: the sample digits model, preprocessing, corrupt files, config.

Rows look like the `files` source's (canonical columns, metric `image`, value null, plus `path`
to the image), built here by hand so these tests do not depend on that source.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from pydantic import ValidationError

from collector.errors import ConfigError
from collector.models.image import PreprocessConfig, decode, plan_for, to_tensor
from collector.plugin import Context
from collector.transforms.infer import InferConfig, InferTransform, validate_model_file
from sample_data import make_camera

from .conftest import T0

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_MODEL = ROOT / "sample_data" / "models" / "digits.onnx"
CANONICAL = ["ts", "device", "source", "metric", "value", "unit"]


def image_rows(paths: list[Path | str | None], metric: str = "image") -> pl.DataFrame:
    """What the files source hands the pipeline: one row per image, `path` absolute."""
    n = len(paths)
    return pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=i) for i in range(n)],
            "device": ["d1"] * n,
            "source": ["camera"] * n,
            "metric": [metric] * n,
            "value": [None] * n,
            "unit": [None] * n,
            "path": [None if p is None else str(p) for p in paths],
            "file": [None if p is None else Path(p).name for p in paths],
        },
        schema_overrides={"value": pl.Float64, "unit": pl.String, "ts": pl.Datetime("us", "UTC")},
    )


def sample_infer(**overrides: Any) -> dict[str, Any]:
    """The `infer` block of sample_data/camera.yaml, with the model path made absolute."""
    doc = yaml.safe_load((ROOT / "sample_data" / "camera.yaml").read_text())
    block = next(t for t in doc["transforms"] if t["type"] == "infer")
    block["model"]["path"] = str(SAMPLE_MODEL)
    block["model"].update(overrides.pop("model", {}))
    block.update(overrides)
    return block


def transform(block: dict[str, Any], ctx: Context) -> InferTransform:
    t = InferTransform(InferConfig.model_validate(block), ctx)
    t.open()
    return t


def test_sample_model_accuracy_on_held_out_digits(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    """The committed model, fed PNGs of digits it never saw through the sample's preprocessing."""
    _, _, x_test, y_test = make_camera.split()
    folder = tmp_path / "held-out"
    folder.mkdir()
    paths = []
    for i, pixels in enumerate(x_test):
        path = folder / f"{i:04d}.png"
        make_camera.to_png(pixels, path)
        paths.append(path)
    t = transform(sample_infer(), make_ctx("digits"))
    rows = image_rows(paths)
    out = pl.concat([t.apply(rows.slice(i, 64)) for i in range(0, rows.height, 64)])
    truth = [str(int(y)) for y in y_test]
    accuracy = float(np.mean([p == y for p, y in zip(out["prediction"], truth, strict=True)]))
    print(
        f"\nsample digits model: held-out accuracy {accuracy:.3f} on {len(truth)} images "
        f"(PNG -> infer image pipeline)"
    )
    assert accuracy >= 0.9
    assert out.height == len(paths) and out["confidence"].min() > 0
    assert out.select(CANONICAL).equals(rows.select(CANONICAL))
    # top-3 lists, most likely first, led by the prediction
    first = out["top_k"].to_list()[0]
    assert len(first) == 3 and first[0]["label"] == out["prediction"][0]
    assert first[0]["confidence"] >= first[1]["confidence"] >= first[2]["confidence"]


def test_sample_camera_folder_has_doubtful_images_and_a_corrupt_one(
    make_ctx: Callable[[str], Context], tmp_path: Path
) -> None:
    files = sorted((ROOT / "sample_data" / "camera").glob("*.png"))
    assert len(files) >= 30
    ctx = make_ctx("digits")
    block = sample_infer(model={"image_roots": [str(ROOT / "sample_data" / "camera")]})
    out = transform(block, ctx).apply(image_rows(files))
    clean = out.filter(pl.col("file").str.contains("digit"))
    correct = (clean["prediction"] == clean["file"].str.extract(r"digit(\d)")).mean()
    assert correct >= 0.9
    doubtful = out.filter(pl.col("confidence") < 0.6)
    assert 4 <= doubtful.height <= out.height // 2, doubtful.select("file", "confidence")
    tricky = out.filter(pl.col("file").str.contains("blend|noisy|shifted"))
    assert tricky["confidence"].mean() < clean["confidence"].mean()
    corrupt = out.filter(pl.col("file").str.contains("corrupt"))
    assert corrupt["prediction"].to_list() == [None] and corrupt["confidence"].to_list() == [0.0]
    dead = (tmp_path / "dead-letter" / "digits.ndjson").read_text().splitlines()
    assert len(dead) == 1 and "truncated" in json.loads(dead[0])["reason"]


def test_corrupt_missing_and_foreign_images_are_dead_lettered_the_rest_classified(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    _, _, x_test, y_test = make_camera.split()
    good = []
    for i in range(3):
        make_camera.to_png(x_test[i], tmp_path / f"good{i}.png")
        good.append(tmp_path / f"good{i}.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:40])
    text = tmp_path / "notes.png"
    text.write_text("hello")
    outside = ROOT / "sample_data" / "camera" / "img-000-digit7.png"  # exists, not allowed
    paths: list[Path | str | None] = [
        good[0],
        garbage,
        good[1],
        truncated,
        tmp_path / "gone.png",
        None,
        "relative.png",
        text,
        outside,
        good[2],
    ]
    ctx = make_ctx("digits")
    rows = image_rows(paths)
    rows = pl.concat(
        [
            rows,
            image_rows([good[0]], metric="temperature").with_columns(pl.lit(21.5).alias("value")),
        ]
    )
    out = transform(sample_infer(), ctx).apply(rows)

    assert out.height == rows.height  # nothing stopped, nothing dropped
    scored = out.filter(pl.col("prediction").is_not_null())
    assert scored["path"].to_list() == [str(p) for p in good]
    assert scored["prediction"].to_list() == [str(int(y)) for y in y_test[:3]]
    unsure = out.filter((pl.col("metric") == "image") & pl.col("prediction").is_null())
    assert unsure.height == 7 and set(unsure["confidence"].to_list()) == {0.0}
    other = out.filter(pl.col("metric") == "temperature")  # not an image row: untouched
    assert other["prediction"].to_list() == [None] and other["value"].to_list() == [21.5]

    dead = [
        json.loads(line)
        for line in (tmp_path / "dead-letter" / "digits.ndjson").read_text().splitlines()
    ]
    reasons = {json.loads(d["raw"])["path"]: d["reason"] for d in dead}
    assert len(dead) == 7
    assert "not a readable image" in reasons[str(garbage)]
    assert "truncated" in reasons[str(truncated)]
    assert "does not exist" in reasons[str(tmp_path / "gone.png")]
    assert "not absolute" in reasons["relative.png"]
    assert "not a readable image" in reasons[str(text)]
    assert "outside the allowed folders" in reasons[str(outside)]
    assert any("no image path" in d["reason"] for d in dead)
    assert all(d["component"] == "digits" for d in dead)
    assert ctx.counters.get("image_errors_total", component="digits") == 7


# --- preprocessing ------------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray, mode: str) -> Path:
    from PIL import Image

    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)
    return path


def test_preprocess_resize_colour_scale_normalize_layout_dtype(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)  # height 4, width 6
    rgb[:, :, 0] = 200
    rgb[:, :, 2] = 100
    path = _png(tmp_path / "rgb.png", rgb, "RGB")

    nchw = PreprocessConfig(mean=[0.5, 0.5, 0.5], std=[0.25], layout="NCHW")
    plan = plan_for(nchw, ["N", 3, 2, 3], "tensor(float)")
    assert (plan.width, plan.height, plan.layout, plan.dtype) == (3, 2, "NCHW", "float32")
    x = to_tensor([decode(path, plan)], plan)
    assert x.shape == (1, 3, 2, 3) and x.dtype == np.float32
    np.testing.assert_allclose(
        x[0, :, 0, 0], [(200 / 255 - 0.5) / 0.25, -2.0, (100 / 255 - 0.5) / 0.25], rtol=1e-5
    )

    nhwc = plan_for(PreprocessConfig(scale=1.0), [None, 5, 5, 3], "tensor(double)")
    x = to_tensor([decode(path, nhwc)], nhwc)
    assert nhwc.layout == "NHWC" and x.shape == (1, 5, 5, 3) and x.dtype == np.float64
    assert x[0, 2, 2].tolist() == [200.0, 0.0, 100.0]

    gray = PreprocessConfig(
        color="grayscale", scale=1.0, size=(2, 2), resample="box", dtype="uint8"
    )
    plan = plan_for(gray, [None, 4], "tensor(float)")
    assert plan.layout == "flat"
    x = to_tensor([decode(path, plan), decode(path, plan)], plan)
    luma = round(200 * 0.299 + 100 * 0.114)  # Pillow's L conversion
    assert x.shape == (2, 4) and x.dtype == np.uint8 and abs(int(x[0, 0]) - luma) <= 1

    inverted = plan_for(
        PreprocessConfig(color="grayscale", invert=True, scale=1.0),
        [None, 1, 4, 6],
        "tensor(float)",
    )
    x = to_tensor([decode(path, inverted)], inverted)
    assert abs(float(x[0, 0, 0, 0]) - (255 - luma)) <= 1

    flat = plan_for(PreprocessConfig(color="grayscale"), [None, 64], "tensor(float)")
    assert (flat.width, flat.height) == (8, 8)  # a square from a flat input


def test_preprocess_config_and_plan_errors() -> None:
    with pytest.raises(ValidationError, match="1 or 3 values"):
        PreprocessConfig(mean=[0.1, 0.2])
    with pytest.raises(ValidationError, match="must not be 0"):
        PreprocessConfig(std=[0.0])
    with pytest.raises(ValueError, match="takes 3 channels"):
        plan_for(PreprocessConfig(color="grayscale"), [None, 3, 8, 8], "tensor(float)")
    with pytest.raises(ValueError, match=r"set `preprocess\.size"):
        plan_for(PreprocessConfig(), [None, 3, "h", "w"], "tensor(float)")
    with pytest.raises(ValueError, match="values per row"):
        plan_for(PreprocessConfig(size=(4, 4)), [None, 64], "tensor(float)")
    with pytest.raises(ValueError, match="only float"):
        plan_for(PreprocessConfig(), [None, 3, 8, 8], "tensor(int64)")


def colour_model(path: Path, layout: str) -> Path:
    """A hand-built ONNX "colour classifier": logits = mean of each RGB channel."""
    import onnx
    from onnx import TensorProto, helper

    if layout == "NCHW":
        inp = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 4, 4])
        nodes = [helper.make_node("GlobalAveragePool", ["img"], ["pooled"])]
    else:
        inp = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 4, 4, 3])
        nodes = [
            helper.make_node("Transpose", ["img"], ["chw"], perm=[0, 3, 1, 2]),
            helper.make_node("GlobalAveragePool", ["chw"], ["pooled"]),
        ]
    nodes.append(helper.make_node("Flatten", ["pooled"], ["logits"], axis=1))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(nodes, "colours", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_labels_softmax_top_k_with_an_rgb_model(
    tmp_path: Path, make_ctx: Callable[[str], Context], layout: str
) -> None:
    model = colour_model(tmp_path / f"colours-{layout}.onnx", layout)
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    paths = []
    for name, rgb in colours.items():
        array = np.zeros((16, 16, 3))
        array[:, :] = rgb
        paths.append(_png(tmp_path / f"{name}.png", array, "RGB"))
    block = {
        "type": "infer",
        "model": {
            "kind": "image",
            "path": str(model),
            "labels": list(colours),
            "top_k": 2,
            "preprocess": {"scale": 4 / 255},
        },
    }
    out = transform(block, make_ctx("colours")).apply(image_rows(paths))
    assert out["prediction"].to_list() == ["red", "green", "blue"]
    # logits (4, 0, 0) softmaxed: e^4 / (e^4 + 2)
    np.testing.assert_allclose(out["confidence"].to_list(), [np.e**4 / (np.e**4 + 2)] * 3)
    top = out["top_k"].to_list()
    assert [t[0]["label"] for t in top] == ["red", "green", "blue"] and len(top[0]) == 2


def test_image_config_contract(tmp_path: Path) -> None:
    cfg = InferConfig.model_validate(
        {"type": "infer", "model": {"kind": "image", "path": "m.onnx"}}
    )
    assert cfg.features.metrics == ["image"] and cfg.prediction_type == "string"
    assert cfg.model.image_column == "path"  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="only `metrics`"):
        InferConfig.model_validate(
            {
                "type": "infer",
                "features": {"lags": [1]},
                "model": {"kind": "image", "path": "m.onnx"},
            }
        )
    with pytest.raises(ValidationError, match="prediction_type"):
        InferConfig.model_validate(
            {
                "type": "infer",
                "prediction_type": "float",
                "model": {"kind": "image", "path": "m.onnx"},
            }
        )
    with pytest.raises(ValidationError, match="would overwrite"):
        InferConfig.model_validate(
            {
                "type": "infer",
                "prediction_column": "path",
                "model": {"kind": "image", "path": "m.onnx"},
            }
        )
    with pytest.raises(ValidationError, match="s3://bucket/key"):
        InferConfig.model_validate(
            {"type": "infer", "model": {"kind": "image", "path": "s3://only-bucket"}}
        )
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    block = {"type": "infer", "model": {"kind": "image", "path": str(bad)}}
    assert "not a loadable ONNX model" in (
        validate_model_file(InferConfig.model_validate(block)) or ""
    )
    ctx = Context(device="d1", component="img", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a loadable ONNX model"):
        InferTransform(InferConfig.model_validate(block), ctx).open()
    wrong = {
        "type": "infer",
        "model": {
            "kind": "image",
            "path": str(SAMPLE_MODEL),
            "labels": ["a", "b"],
            "preprocess": {"color": "grayscale"},
        },
    }
    with pytest.raises(ConfigError, match="`labels` has 2 names"):
        InferTransform(InferConfig.model_validate(wrong), ctx).open()


def test_checkpoint_drops_the_image_model_and_reloads_it(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    """State is checkpointed without the ONNX session; a restart reloads it from its path."""
    from collector.testing import checkpoint_bytes, restart_transform

    _, _, x_test, y_test = make_camera.split()
    paths = []
    for i in range(4):
        make_camera.to_png(x_test[i], tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    t = transform(sample_infer(), make_ctx("digits"))
    before = t.apply(image_rows(paths))
    assert b"onnx" not in checkpoint_bytes(t).lower()
    again = restart_transform(t, make_ctx("digits"))
    after = again.apply(image_rows(paths))
    assert (
        after["prediction"].to_list()
        == before["prediction"].to_list()
        == [str(int(y)) for y in y_test[:4]]
    )
