"""Edge inference: score readings with a model on the device and say how sure it is.

Adds ``prediction``, ``confidence`` (0..1) and ``score`` columns, so sinks can route with their
ordinary ``where:``: the confident results to the cloud, the doubtful ones (``confidence < 0.6``)
with their raw readings to an S3 ``retraining/`` prefix.

The model is a built-in streaming anomaly detector (no training, no extra packages), a
scikit-learn/joblib pickle, an ONNX file, an ONNX image classifier (``kind: image``: rows carry
an image file path, see :mod:`collector.models.image`), or a Python ``module:function``. A
model file may live in S3 (``path: s3://bucket/key``, see :mod:`collector.models.remote`): it is
downloaded to ``data_dir/models/`` and its ETag/VersionId checked on the same schedule, so the
local hot swap below covers both. Files are hot-swapped:
every ``reload_every`` the file's mtime/size is compared, a changed file is loaded and
smoke-tested, and a file that fails keeps the previous model running (logged and counted as
``model_reload_failures_total``).

Rules every model kind follows:

- Only readings of the configured metrics are candidates; other rows pass through with nulls
  (or keep what an earlier ``infer`` wrote, so several can be chained).
- A candidate the model cannot score (warm-up, missing history, a null value, a pivot row with a
  metric missing) gets ``prediction`` null and ``confidence`` 0: it is the model being unsure, so
  it routes with the doubtful rows and never falls between two complementary ``where:``s.
- A model that raises on a batch leaves that batch unscored (same rule) and counts
  ``model_errors_total``; the collector keeps running.
- An image that cannot be read (missing, corrupt, not an image) leaves its row unscored (same
  rule) and is kept in ``data_dir/dead-letter/<component>.ndjson`` with the reason; the rest of
  the batch is scored.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import Discriminator, Field, Tag, model_validator

from collector.errors import ConfigError, ConfigIssue, TransformError
from collector.models.anomaly import DetectorSettings, StreamingDetector, Verdict
from collector.models.features import (
    FeatureHistory,
    feature_names,
    history_length,
    key_columns,
    pivot_frame,
)
from collector.models.image import ImageDecodeError, PreprocessConfig, decode
from collector.models.loaders import (
    EXTRA_HINT,
    ModelLoadError,
    Outputs,
    Signature,
    load_model,
    signature,
    watched_path,
)
from collector.models.remote import FetchError, RemoteModel, S3Settings, is_remote, split_s3
from collector.plugin import Context, Model, Transform, TransformConfig
from collector.sources.python import FUNCTION_PATTERN
from collector.units import Duration

ROW = "__infer_row"
_TMP = {"prediction": "__infer_prediction", "confidence": "__infer_confidence",
        "score": "__infer_score", "window": "__infer_window", "alarm": "__infer_alarm",
        "event": "__infer_event", "top": "__infer_top"}
_CANONICAL = {"ts", "device", "source", "metric", "value", "unit"}


class BuiltinModelConfig(Model):
    """The built-in streaming anomaly detector: flags readings far from their series' usual.

    ``score`` is how far a reading is from what the series makes expected, in robust standard
    deviations (``|z|`` for zscore/ewma); ``confidence`` is ``1 - exp(-| score - threshold |)``;
    ``prediction`` is 1.0 for every reading of an anomaly event and 0.0 otherwise; ``alarm`` is
    true on an event's first reading only, and ``event_id`` names the event on all its readings.
    """

    kind: Literal["builtin"] = Field(default="builtin", description="Model kind.")
    method: Literal["robust", "zscore", "ewma"] = Field(
        default="robust",
        description="`robust`: median level, daily/weekly profiles learnt online and a "
        "heavy-tail-aware scale over `history` readings (real sensor series); `zscore`: mean/std "
        "of the last `window` readings (steady, Gaussian signals); `ewma`: exponentially "
        "weighted level and spread (drifting signals, e.g. a random walk).",
    )
    window: int = Field(
        default=60, ge=2,
        description="zscore: readings in the rolling window; ewma: readings the spread is "
        "averaged over; all: previous readings kept in `window_column`.",
    )
    threshold: float = Field(
        default=4.0, gt=0,
        description="Sensitivity: zscore/ewma flag a reading whose |z| is above this; robust "
        "(score in robust standard deviations) alarms on a run of readings whose excess over "
        "threshold/2 adds up to 1.5 x threshold, or on a lone reading beyond both threshold and "
        "its series' own noise tail (x threshold/4). Higher: fewer alarms.",
    )
    warmup: int = Field(
        default=30, ge=2, description="Readings per series before it is scored (null until then)."
    )
    alpha: float = Field(
        default=0.1, gt=0, le=1, description="ewma: weight of the newest reading (0 < alpha ≤ 1)."
    )
    reset_after: int = Field(
        default=10, ge=1,
        description="After this many anomalies in a row the series has moved for good: accept "
        "the new level (robust: at once, keeping its scale; zscore/ewma: by warming up again).",
    )
    history: int = Field(
        default=1000, ge=10, le=100_000,
        description="robust: accepted readings per series the scale and the long-run median "
        "are taken over (memory per series is about 2 x this many floats).",
    )
    level_window: int = Field(
        default=5, ge=1, le=1000,
        description="robust: accepted readings whose median is the expected level (small: "
        "follows drifts and random walks; larger: smoother on noisy steady signals).",
    )
    season: Literal["auto", "day", "week", "none"] = Field(
        default="auto",
        description="robust: hour-of-day / hour-of-week profiles learnt online (UTC hours); "
        "`auto` uses whichever the data shows, if any.",
    )
    hysteresis: float | None = Field(
        default=None, gt=0, le=1,
        description="An open event stays open while the score is above threshold x this "
        "(default: robust 0.5, zscore/ewma 1).",
    )
    min_duration: int | None = Field(
        default=None, ge=1,
        description="Readings in a row above threshold before an event opens (default 1).",
    )
    spike_threshold: float | None = Field(
        default=None, gt=0,
        description="A single reading scoring above this opens an event even when "
        "`min_duration` asks for more (default: zscore/ewma: threshold; robust: none, a lone "
        "reading alarms when beyond both threshold and the series' own noise tail).",
    )
    cooldown: int | None = Field(
        default=None, ge=0,
        description="A new trigger within this many readings of an event's end continues that "
        "event: same `event_id`, no new alarm (default: robust 12, zscore/ewma 0).",
    )
    incidents: bool | None = Field(
        default=None,
        description="One alarm per device incident: an event that opens while another series "
        "of the same device/source is in an event joins it (no second alarm, that incident's "
        "`event_id`; `prediction` unchanged). Default: robust true, zscore/ewma false.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> BuiltinModelConfig:
        if self.method == "zscore" and self.warmup > self.window:
            raise ValueError(f"warmup ({self.warmup}) cannot exceed window ({self.window})")
        return self

    def settings(self) -> DetectorSettings:
        robust = self.method == "robust"
        return DetectorSettings(
            method=self.method, window=self.window, threshold=self.threshold,
            warmup=self.warmup, alpha=self.alpha, reset_after=self.reset_after,
            history=self.history, level_window=self.level_window, season=self.season,
            hysteresis=_default(self.hysteresis, ROBUST_HYSTERESIS if robust else 1.0),
            min_duration=_default(self.min_duration, ROBUST_MIN_DURATION if robust else 1),
            cooldown=_default(self.cooldown, ROBUST_COOLDOWN if robust else 0),
            incidents=_default(self.incidents, robust),
            # robust: lone readings are judged against each series' own tail (no fixed cap).
            spike_threshold=(
                self.spike_threshold if robust else _default(self.spike_threshold, self.threshold)
            ),
        )


ROBUST_HYSTERESIS = 0.5
ROBUST_MIN_DURATION = 1
ROBUST_COOLDOWN = 12


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _needs(modules: tuple[str, ...], kind: str) -> None:
    """The same check `collector check` does for `requires`, for the chosen kind only."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"model kind {kind!r} needs the Python package {module!r}: "
                             f"{EXTRA_HINT}")


class FileModelConfig(Model):
    """Where a model file comes from: a local path, or ``s3://bucket/key`` and how to reach S3.

    The S3 fields are the AWS sinks' (same names, same default credential chain), so a device
    that uploads with the ``s3`` sink downloads its model the same way.
    """

    region: str | None = Field(
        default=None, description="s3:// models: AWS region; default: botocore's chain."
    )
    endpoint_url: str | None = Field(
        default=None,
        description="s3:// models: endpoint override (moto, MinIO, a VPC endpoint).",
    )
    profile: str | None = Field(
        default=None, description="s3:// models: shared-config profile; default: the default "
        "credential chain (env, profile, Greengrass token exchange, instance role).",
    )

    @model_validator(mode="after")
    def _s3_url(self) -> FileModelConfig:
        path = getattr(self, "path", "")
        if is_remote(path):
            split_s3(path)
            _needs(("boto3",), "s3:// models (the `aws` extra)")
        return self

    def s3_settings(self) -> S3Settings:
        return S3Settings(region=self.region, endpoint_url=self.endpoint_url,
                          profile=self.profile)


class SklearnModelConfig(FileModelConfig):
    """A scikit-learn estimator or pipeline saved with ``joblib.dump``."""

    kind: Literal["sklearn"] = Field(description="Model kind.")
    path: str = Field(
        min_length=1, description="The .joblib/.pkl file (trusted: loading a pickle runs code)."
    )

    @model_validator(mode="after")
    def _installed(self) -> SklearnModelConfig:
        _needs(("sklearn", "joblib"), "sklearn")
        return self


class OnnxModelConfig(FileModelConfig):
    """An ONNX model with one float input of shape [rows, features]."""

    kind: Literal["onnx"] = Field(description="Model kind.")
    path: str = Field(min_length=1, description="The .onnx file, or `s3://bucket/key.onnx`.")

    @model_validator(mode="after")
    def _installed(self) -> OnnxModelConfig:
        _needs(("onnxruntime",), "onnx")
        return self


class ImageModelConfig(FileModelConfig):
    """An ONNX image classifier: each row names an image file, the model labels the image.

    ``prediction`` is the class label (from ``labels``, else the model's own label output, else
    the class index), ``confidence`` the top-1 probability, and with ``top_k`` a list column of
    the k best ``{label, confidence}``.
    """

    kind: Literal["image"] = Field(description="Model kind.")
    path: str = Field(min_length=1, description="The .onnx file, or `s3://bucket/key.onnx`.")
    image_column: str = Field(
        default="path",
        description="Column holding the image file's absolute path (the `files` source's "
        "`path`: its copy in the blob store).",
    )
    labels: list[str] | None = Field(
        default=None, min_length=2,
        description="Class names in the model's output order (default: the model's own label "
        "output, else the class index).",
    )
    top_k: int = Field(
        default=0, ge=0, le=100,
        description="Also write the k most likely classes to `top_k_column` (0: off).",
    )
    softmax: bool | None = Field(
        default=None,
        description="Softmax the class scores (true for logits); default: when they are not "
        "already probabilities (a negative value, or rows not summing to 1).",
    )
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig,
        description="resize, colour, scale, mean/std, layout and dtype of the input tensor.",
    )
    image_roots: list[str] | None = Field(
        default=None, min_length=1,
        description="Folders images may be read from (image paths come from data, so they "
        "are confined); default: the collector's data dir, where the blob store lives.",
    )
    max_pixels: int = Field(
        default=50_000_000, gt=0, description="Larger images are refused (decompression bombs)."
    )

    @model_validator(mode="after")
    def _installed(self) -> ImageModelConfig:
        _needs(("onnxruntime", "PIL", "numpy"), "image")
        return self


class PythonModelConfig(Model):
    """User code: ``function(features: pl.DataFrame)`` returns predictions."""

    kind: Literal["python"] = Field(description="Model kind.")
    function: str = Field(
        pattern=FUNCTION_PATTERN,
        description="`module:function`; returns a frame/dict with `prediction` (and optionally "
        "`confidence`, `score`) or a sequence of predictions.",
    )
    path: str | None = Field(
        default=None, description="Folder added to `sys.path` before importing the module."
    )


def _kind_of(value: Any) -> str:
    kind = value.get("kind", "builtin") if isinstance(value, dict) else getattr(value, "kind", None)
    return str(kind or "builtin")


ModelConfig = Annotated[
    Annotated[BuiltinModelConfig, Tag("builtin")]
    | Annotated[SklearnModelConfig, Tag("sklearn")]
    | Annotated[OnnxModelConfig, Tag("onnx")]
    | Annotated[ImageModelConfig, Tag("image")]
    | Annotated[PythonModelConfig, Tag("python")],
    Discriminator(
        _kind_of,
        custom_error_type="model_kind",
        custom_error_message="model kind must be one of builtin, sklearn, onnx, image, python",
    ),
]


class FeaturesConfig(Model):
    """How the model's input frame is built from the readings."""

    metrics: list[str] | None = Field(
        default=None, min_length=1,
        description="Score only readings of these metrics (default: every reading).",
    )
    value_column: str = Field(
        default="value", description="Column the features come from (`mean` after a window)."
    )
    lags: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Add `lag_K`: the K-th previous reading of the same device/source/metric.",
    )
    rolling: list[Annotated[int, Field(ge=2)]] = Field(
        default_factory=list,
        description="Add `mean_N` and `std_N` over the N previous readings of the series.",
    )
    pivot: list[str] | None = Field(
        default=None, min_length=1,
        description="One model row per (device, ts) with these metrics as columns, in this "
        "order; each reading gets its row's prediction.",
    )

    @model_validator(mode="after")
    def _one_shape(self) -> FeaturesConfig:
        if self.pivot and (self.lags or self.rolling or self.metrics):
            raise ValueError("`pivot` builds its own rows: do not combine it with "
                             "`metrics`, `lags` or `rolling`")
        return self


class InferConfig(TransformConfig):
    """Config of the `infer` transform."""

    type: Literal["infer"] = Field(default="infer", description="Plugin name.")
    model: ModelConfig = Field(
        default_factory=BuiltinModelConfig,
        description="`kind: builtin` (default), `sklearn`, `onnx`, `image` or `python`, and "
        "its options.",
    )
    features: FeaturesConfig = Field(
        default_factory=FeaturesConfig, description="How the model input is built."
    )
    reload_every: Duration | None = Field(
        default=30.0, ge=0,
        description="Check the model file for changes this often (0: every batch, null: never).",
    )
    prediction_column: str = Field(default="prediction", description="Output column name.")
    prediction_type: Literal["float", "string"] = Field(
        default="float", description="`float` (numbers, 0/1 labels) or `string` class labels."
    )
    confidence_column: str = Field(
        default="confidence", description="Output column: 0..1, how sure the model is."
    )
    score_column: str = Field(
        default="score", description="Output column: the model's raw score, when it has one."
    )
    window_column: str | None = Field(
        default=None,
        description="Also add a list column with the raw readings behind each verdict "
        "(for retraining uploads); off by default because it multiplies row size.",
    )
    alarm_column: str = Field(
        default="alarm",
        description="builtin: output column, true on the first reading of an anomaly event "
        "(route alerts with `where: alarm`), false on others, null when unscored.",
    )
    event_column: str = Field(
        default="event_id",
        description="builtin: output column naming the event a reading belongs to "
        "(`device/source/metric@<first ts>`), null outside events.",
    )
    top_k_column: str = Field(
        default="top_k",
        description="image with `top_k`: output list column of the k best "
        "`{label, confidence}`, most likely first.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> InferConfig:
        f = self.features
        if isinstance(self.model, ImageModelConfig):
            self._image_defaults()
        if self.model.kind == "builtin" and (f.pivot or f.lags or f.rolling):
            raise ValueError("the builtin detector keeps its own window per series: `features` "
                             "takes only `metrics` and `value_column` with it")
        outputs = [self.prediction_column, self.confidence_column, self.score_column]
        if self.model.kind == "builtin":
            outputs += [self.alarm_column, self.event_column]
        if self.window_column:
            outputs.append(self.window_column)
        if isinstance(self.model, ImageModelConfig) and self.model.top_k:
            outputs.append(self.top_k_column)
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"output column names must differ: {outputs}")
        inputs = {f.value_column}
        if isinstance(self.model, ImageModelConfig):
            inputs.add(self.model.image_column)
        clash = sorted(set(outputs) & (_CANONICAL | inputs))
        if clash:
            raise ValueError(f"output columns {clash} would overwrite the readings")
        return self

    def _image_defaults(self) -> None:
        """Image rows: the `image` metric by default, string labels, no numeric features."""
        f = self.features
        if f.pivot or f.lags or f.rolling or self.window_column:
            raise ValueError("an image model reads the image file: `features` takes only "
                             "`metrics` with it, and `window_column` does not apply")
        if f.metrics is None:
            f.metrics = ["image"]
        if "prediction_type" in self.model_fields_set and self.prediction_type != "string":
            raise ValueError("an image model predicts class labels: `prediction_type` is "
                             "`string`")
        self.prediction_type = "string"


class InferTransform(Transform):
    """Runs a model per micro-batch; the model file is reloaded when it changes."""

    Config = InferConfig
    description = "Edge inference: anomaly flags or a trained model's prediction and confidence."
    example = """\
- type: infer
  model: {kind: builtin, method: zscore, window: 60, threshold: 4}
  features: {metrics: [temperature]}
  window_column: window_values
"""
    requires = {}

    def __init__(self, config: InferConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        # Constructing loads nothing: `collector check` builds transforms without any I/O.
        self._detector: StreamingDetector | None = None
        self._history: FeatureHistory | None = None
        if isinstance(config.model, BuiltinModelConfig):
            self._detector = StreamingDetector(config.model.settings())
        elif history_length(config.features):
            self._history = FeatureHistory(config.features)
        self._model: Any = None  # LoadedModel, or ImageModel for `kind: image`
        self._loaded_sig: Signature | None = None
        self._failed_sig: Signature | None = None
        self._next_check: datetime | None = None
        self._last_error: str | None = None
        self._remote: RemoteModel | None = None
        self._last_fetch_error: str | None = None

    # -- model lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Load the model at start-up, so a bad file stops the start with a clear reason."""
        if self._detector is not None or self._model is not None:
            return
        try:
            self._load_now()
        except ModelLoadError as exc:
            raise ConfigError([ConfigIssue(
                path="model", message=f"{self.ctx.component}: cannot load model: {exc}"
            )]) from None

    @classmethod
    def validate_model_file(cls, config: InferConfig) -> str | None:
        """Why the configured model cannot be used, or None (loads it: for `check --deep`)."""
        return validate_model_file(config)

    def _remote_model(self) -> RemoteModel | None:
        """The S3 object behind ``model.path: s3://…`` (created on first use: no I/O)."""
        spec = self.config.model
        if not isinstance(spec, FileModelConfig) or not is_remote(spec.path):
            return None
        if self._remote is None:
            self._remote = RemoteModel(spec.path, self.ctx.data_dir, self.ctx.component,
                                       spec.s3_settings())
        return self._remote

    def _local_path(self) -> Path | None:
        remote = self._remote_model()
        return remote.local if remote is not None else watched_path(self.config.model)

    def _fetch(self, starting: bool) -> None:
        """Bring the local copy of an S3 model up to date; S3 trouble never stops the device.

        At start-up with no local copy yet, there is nothing to run on: that is the one case
        that raises (ModelLoadError). Otherwise a failure is counted and logged (once per
        distinct reason) and the last good copy keeps serving.
        """
        remote = self._remote_model()
        if remote is None:
            return
        try:
            version = remote.refresh(lambda p: _load(self.config, p, self.ctx.data_dir))
        except FetchError as exc:
            self.ctx.counters.inc("model_fetch_failures_total", component=self.ctx.component)
            message = str(exc)
            if starting and not remote.local.is_file():
                raise ModelLoadError(f"cannot download {remote.url} and no earlier copy in "
                                     f"{remote.local.parent}: {message}") from None
            if message != self._last_fetch_error:
                self._log(logging.WARNING, "cannot check %s, running on the last downloaded "
                          "model %s: %s", remote.url, remote.local, message)
            self._last_fetch_error = message
            return
        except ValueError as exc:
            self.ctx.counters.inc("model_reload_failures_total", component=self.ctx.component)
            if starting and not remote.local.is_file():
                raise ModelLoadError(str(exc)) from None
            self._log(logging.WARNING, "new model not used, keeping the previous one: %s", exc)
            return
        if self._last_fetch_error is not None:
            self._log(logging.INFO, "%s reachable again", remote.url)
        self._last_fetch_error = None
        if version is not None:
            self.ctx.counters.inc("model_downloads_total", component=self.ctx.component)
            self._log(logging.INFO, "downloaded %s (%s) to %s", remote.url, version.describe(),
                      remote.local)

    def _load_now(self) -> None:
        self._fetch(starting=True)
        path = self._local_path()
        sig = signature(path) if path else None
        self._model = _load(self.config, self._remote.local if self._remote else None,
                            self.ctx.data_dir)
        self._loaded_sig = sig
        self._next_check = self._now() + timedelta(seconds=self.config.reload_every or 0)

    def _now(self) -> datetime:
        return self.ctx.clock()

    def _model_for_batch(self) -> Any:
        if self._model is None:
            try:
                self._load_now()
            except ModelLoadError as exc:
                raise TransformError(f"cannot load model: {exc}") from None
            assert self._model is not None
            return self._model
        every = self.config.reload_every
        now = self._now()
        if every is not None and (self._next_check is None or now >= self._next_check):
            self._next_check = now + timedelta(seconds=every)
            self._maybe_swap()
        return self._model

    def _maybe_swap(self) -> None:
        self._fetch(starting=False)
        path = self._local_path()
        if path is None:
            return
        sig = signature(path)
        if sig is None or sig in (self._loaded_sig, self._failed_sig):
            return
        try:
            model = _load(self.config, self._remote.local if self._remote else None,
                          self.ctx.data_dir)
        except ModelLoadError as exc:
            self._failed_sig = sig
            self.ctx.counters.inc("model_reload_failures_total", component=self.ctx.component)
            self._log(logging.WARNING, "new model in %s not loaded, keeping the previous one: %s",
                      path, exc)
            return
        self._model, self._loaded_sig, self._failed_sig = model, sig, None
        self.ctx.counters.inc("model_reloads_total", component=self.ctx.component)
        self._log(logging.INFO, "loaded new model from %s", path)

    def _log(self, level: int, msg: str, *args: Any) -> None:
        self.ctx.logger.log(level, "%s: " + msg, self.ctx.component, *args)

    def __getstate__(self) -> dict[str, Any]:
        # A loaded model is not state: it is reloaded from its path after a restart.
        state = super().__getstate__()
        for name in ("_model", "_loaded_sig", "_failed_sig", "_next_check", "_remote",
                     "_last_fetch_error"):
            state[name] = None
        return state

    # -- scoring -----------------------------------------------------------------------------

    def apply(self, df: pl.DataFrame) -> pl.DataFrame:
        self._require_columns(df)
        frame = df.with_row_index(ROW)
        candidates = self._candidates(frame)
        if candidates.height == 0:
            results = self._empty_results(frame)
        elif self._detector is not None:
            results = self._score_builtin(candidates)
        elif isinstance(self.config.model, ImageModelConfig):
            results = self._score_images(candidates)
        elif self.config.features.pivot:
            results = self._score_pivot(candidates)
        else:
            results = self._score_rows(candidates)
        return self._merge(frame, results)

    def _require_columns(self, df: pl.DataFrame) -> None:
        f = self.config.features
        needed = {"ts", f.value_column}
        if isinstance(self.config.model, ImageModelConfig):
            needed = {"ts", self.config.model.image_column}
        if f.metrics or f.pivot:
            needed.add("metric")
        if f.pivot:
            needed.add("device")
        missing = sorted(needed - set(df.columns))
        if missing:
            raise ValueError(f"infer needs column(s) {missing}; the input has {df.columns}")

    def _candidates(self, frame: pl.DataFrame) -> pl.DataFrame:
        metrics = self.config.features.metrics or self.config.features.pivot
        if metrics:
            return frame.filter(pl.col("metric").is_in(list(metrics)))
        return frame

    def _score_builtin(self, candidates: pl.DataFrame) -> pl.DataFrame:
        assert self._detector is not None
        v = self.config.features.value_column
        scored = candidates.filter(pl.col(v).is_not_null()).sort("ts", maintain_order=True)
        key_cols = [scored[c].to_list() for c in key_columns(scored)]
        keys = list(zip(*key_cols, strict=True)) if key_cols else [()] * scored.height
        times = scored["ts"].to_list() if scored.schema["ts"] == pl.Datetime else None
        verdicts = self._detector.score(keys, scored[v].cast(pl.Float64).to_list(), times)
        windows = None
        if self.config.window_column:
            windows = pl.DataFrame({
                ROW: scored[ROW],
                _TMP["window"]: pl.Series([vd.window for vd in verdicts],
                                          dtype=pl.List(pl.Float64)),
            })
        preds = self._frame_of(_outputs_of(verdicts), scored.height).with_columns(
            pl.Series(_TMP["alarm"], [vd.alarm for vd in verdicts], dtype=pl.Boolean),
            pl.Series(_TMP["event"], [vd.event_id for vd in verdicts], dtype=pl.String),
        )
        return self._results(candidates, scored[ROW], preds, windows)

    def _score_images(self, candidates: pl.DataFrame) -> pl.DataFrame:
        """Decode each row's image; unreadable ones are dead-lettered, the rest classified."""
        spec = self.config.model
        assert isinstance(spec, ImageModelConfig)
        model = self._model_for_batch()
        images: list[Any] = []
        rows: list[int] = []
        for row in candidates.iter_rows(named=True):
            try:
                images.append(decode(row[spec.image_column], model.plan))
            except ImageDecodeError as exc:
                self._reject_image(row, str(exc))
                continue
            rows.append(row[ROW])
        n = len(images)
        top: list[Any] = []
        try:
            result = model.classify(images)
            outputs = Outputs(prediction=list(result.prediction),
                              confidence=list(result.confidence))
            top = [[{"label": lbl, "confidence": p} for lbl, p in pairs]
                   for pairs in result.top]
        except Exception as exc:
            self._model_failed(exc, n)
            outputs = Outputs(prediction=[None] * n)
        preds = self._frame_of(outputs, n)
        if spec.top_k:
            preds = preds.with_columns(pl.Series(_TMP["top"], top or [None] * n,
                                                 dtype=_TOP_DTYPE))
        row_ids = pl.Series(ROW, rows, dtype=candidates.schema[ROW])
        return self._results(candidates, row_ids, preds, None)

    def _reject_image(self, row: dict[str, Any], reason: str) -> None:
        """Keep the row of an unreadable image in the dead letter, with the reason."""
        self.ctx.counters.inc("image_errors_total", component=self.ctx.component)
        record = {k: v for k, v in row.items() if k != ROW}
        self.ctx.reject(json.dumps(record, default=str), reason)
        self._log(logging.WARNING, "image left unscored (dead-lettered): %s", reason)

    def _model_failed(self, exc: Exception, n: int) -> None:
        self.ctx.counters.inc("model_errors_total", component=self.ctx.component)
        message = f"{type(exc).__name__}: {exc}"
        if message != self._last_error:
            self._log(logging.WARNING, "model failed on %d rows, left unscored: %s", n, message)
        self._last_error = message

    def _score_rows(self, candidates: pl.DataFrame) -> pl.DataFrame:
        spec = self.config.features
        names = feature_names(spec)
        win = self.config.window_column
        present = candidates.filter(pl.col(spec.value_column).is_not_null())
        if self._history is not None:
            built = self._history.build(present, spec, win, ROW)
        else:
            built = present.with_columns(pl.col(spec.value_column).cast(pl.Float64))
            if win:
                built = built.with_columns(pl.concat_list(spec.value_column).alias(win))
        complete = built.drop_nulls(names)
        preds = self._predict(complete.select(names))
        # Rows short of history still carry their window: they are the ones retraining wants.
        windows = built.select(ROW, pl.col(win).alias(_TMP["window"])) if win else None
        return self._results(candidates, complete[ROW], preds, windows)

    def _score_pivot(self, candidates: pl.DataFrame) -> pl.DataFrame:
        spec = self.config.features
        names = feature_names(spec)
        wide = pivot_frame(candidates, spec)
        complete = wide.drop_nulls(names)
        preds = self._predict(complete.select(names))
        per_key = complete.select("device", "ts").hstack(preds)
        if self.config.window_column:
            # The raw vector of the (device, ts) row, also when a metric is missing from it.
            per_key = wide.select("device", "ts", pl.concat_list(names).alias(_TMP["window"])
                                  ).join(per_key, on=["device", "ts"], how="left")
        joined = candidates.select(ROW, "device", "ts").join(
            per_key, on=["device", "ts"], how="left", maintain_order="left"
        )
        return joined.drop("device", "ts")

    def _predict(self, features: pl.DataFrame) -> pl.DataFrame:
        """The model's outputs as typed columns; a model error leaves the batch unscored.

        A model that fails on one batch (an input it cannot take, a bug in user code) must not
        stop the collector: its rows come out unscored (confidence 0, so they route with the
        doubtful ones), the failure is counted as ``model_errors_total`` and logged once per
        distinct message. Only a model that never loaded is an error.
        """
        n = features.height
        if n == 0:
            return self._frame_of(Outputs(prediction=[]), 0)
        model = self._model_for_batch()
        try:
            preds = self._frame_of(model.predict(features), n)
        except Exception as exc:
            self.ctx.counters.inc("model_errors_total", component=self.ctx.component)
            message = f"{type(exc).__name__}: {exc}"
            if message != self._last_error:
                self._log(logging.WARNING, "model failed on %d rows, left unscored: %s", n,
                          message)
            self._last_error = message
            return self._frame_of(Outputs(prediction=[None] * n), n)
        self._last_error = None
        return preds

    def _frame_of(self, outputs: Outputs, n: int) -> pl.DataFrame:
        if len(outputs.prediction) != n:
            raise ValueError(f"the model returned {len(outputs.prediction)} predictions for "
                             f"{n} rows")
        return pl.DataFrame([
            _series(outputs.prediction, self._prediction_dtype()).alias(_TMP["prediction"]),
            _series(outputs.confidence, pl.Float64(), n).alias(_TMP["confidence"]),
            _series(outputs.score, pl.Float64(), n).alias(_TMP["score"]),
        ])

    def _prediction_dtype(self) -> pl.DataType:
        return pl.String() if self.config.prediction_type == "string" else pl.Float64()

    def _results(
        self,
        candidates: pl.DataFrame,
        rows: pl.Series,
        preds: pl.DataFrame,
        windows: pl.DataFrame | None,
    ) -> pl.DataFrame:
        """Outputs of the scored rows, joined onto every candidate (unscored ones get nulls).

        ``windows`` (row id, window list) may cover more rows than were scored.
        """
        scored = preds.with_columns(rows.alias(ROW))
        out = candidates.select(ROW).join(scored, on=ROW, how="left", maintain_order="left")
        if self.config.window_column:
            if windows is None:
                windows = pl.DataFrame(schema={ROW: rows.dtype,
                                               _TMP["window"]: pl.List(pl.Float64())})
            out = out.join(windows, on=ROW, how="left", maintain_order="left")
        return out

    def _empty_results(self, frame: pl.DataFrame) -> pl.DataFrame:
        schema: dict[str, pl.DataType] = {
            ROW: frame.schema[ROW],
            _TMP["prediction"]: self._prediction_dtype(),
            _TMP["confidence"]: pl.Float64(),
            _TMP["score"]: pl.Float64(),
        }
        if self._detector is not None:
            schema[_TMP["alarm"]] = pl.Boolean()
            schema[_TMP["event"]] = pl.String()
        if self.config.window_column:
            schema[_TMP["window"]] = pl.List(pl.Float64())
        if self._top_k():
            schema[_TMP["top"]] = _TOP_DTYPE
        return pl.DataFrame(schema=schema)

    def _top_k(self) -> int:
        spec = self.config.model
        return spec.top_k if isinstance(spec, ImageModelConfig) else 0

    def _merge(self, frame: pl.DataFrame, results: pl.DataFrame) -> pl.DataFrame:
        """Input rows in input order, with the output columns; non-candidates keep old values."""
        cfg = self.config
        results = results.with_columns(
            pl.when(pl.col(_TMP["prediction"]).is_null())
            .then(pl.lit(0.0))
            .otherwise(pl.col(_TMP["confidence"]))
            .alias(_TMP["confidence"]),
            pl.lit(True).alias("__infer_candidate"),
        )
        out = frame.join(results, on=ROW, how="left", maintain_order="left")
        targets = {
            cfg.prediction_column: _TMP["prediction"],
            cfg.confidence_column: _TMP["confidence"],
            cfg.score_column: _TMP["score"],
        }
        if self._detector is not None:
            targets[cfg.alarm_column] = _TMP["alarm"]
            targets[cfg.event_column] = _TMP["event"]
        if cfg.window_column:
            targets[cfg.window_column] = _TMP["window"]
        if self._top_k():
            targets[cfg.top_k_column] = _TMP["top"]
        is_candidate = pl.col("__infer_candidate").fill_null(False)
        exprs = []
        for name, tmp in targets.items():
            new = pl.col(tmp)
            if name in frame.columns:
                new = pl.when(is_candidate).then(new).otherwise(
                    pl.col(name).cast(out.schema[tmp], strict=False)
                )
            exprs.append(new.alias(name))
        out = out.with_columns(exprs)
        return out.drop(ROW, "__infer_candidate", *targets.values())


def _outputs_of(verdicts: list[Verdict]) -> Outputs:
    return Outputs(
        prediction=[v.prediction for v in verdicts],
        confidence=[v.confidence for v in verdicts],
        score=[v.score for v in verdicts],
    )


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones, so Polars builds a typed column."""
    return value.item() if hasattr(value, "item") else value


def _series(values: list[Any] | None, dtype: pl.DataType, n: int | None = None) -> pl.Series:
    if values is None:
        return pl.Series(values=[None] * (n or 0), dtype=dtype)
    plain = [_plain(v) for v in values]
    if dtype == pl.String:
        return pl.Series(values=[None if v is None else str(v) for v in plain], dtype=dtype)
    try:
        return pl.Series(values=plain, dtype=dtype, strict=True)
    except (TypeError, ValueError, pl.exceptions.PolarsError):
        sample = next((v for v in plain if v is not None), None)
        raise ModelLoadError(
            f"the model predicts {type(sample).__name__} values like {sample!r}; set "
            "`prediction_type: string` for class labels"
        ) from None


_TOP_DTYPE = pl.List(pl.Struct({"label": pl.String(), "confidence": pl.Float64()}))


def _load(config: InferConfig, path: Path | None = None, data_dir: Path | None = None) -> Any:
    """Load and smoke-test the configured model, including the output type conversion.

    ``path`` replaces ``model.path`` (the local copy of an s3:// model); ``data_dir`` is the
    default folder image paths are confined to.
    """
    spec = config.model
    if path is not None:
        spec = spec.model_copy(update={"path": str(path)})
    if isinstance(spec, ImageModelConfig):
        return _load_image(spec, data_dir)
    if isinstance(spec, FileModelConfig) and is_remote(getattr(spec, "path", "")):
        raise ModelLoadError(f"{spec.path!r} is not downloaded yet")  # type: ignore[attr-defined]
    names = feature_names(config.features)
    model = load_model(spec, names)
    probe = model.predict(pl.DataFrame({n: [0.0] for n in names}))
    dtype = pl.String() if config.prediction_type == "string" else pl.Float64()
    _series(probe.prediction, dtype)
    return model


def _load_image(spec: ImageModelConfig, data_dir: Path | None) -> Any:
    from collector.models.image import load_image_model

    if is_remote(spec.path):
        raise ModelLoadError(f"{spec.path!r} is not downloaded yet")
    roots = [Path(r).expanduser() for r in spec.image_roots] if spec.image_roots else (
        [data_dir] if data_dir is not None else [])
    try:
        return load_image_model(Path(spec.path), spec.preprocess, spec.labels, spec.top_k,
                                spec.softmax, roots, spec.max_pixels)
    except ImportError as exc:
        raise ModelLoadError(f"needs the Python package {exc.name!r}: {EXTRA_HINT}") from None
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def validate_model_file(config: InferConfig) -> str | None:
    """Why the model of an ``infer`` config cannot be loaded, or None when it can.

    This is I/O (it reads and runs the model once; an s3:// model is downloaded to a temp
    folder), so it is for ``collector check --deep`` and start-up, never for the plain, I/O-free
    ``collector check``.
    """
    if isinstance(config.model, BuiltinModelConfig):
        return None
    spec = config.model
    try:
        if isinstance(spec, FileModelConfig) and is_remote(getattr(spec, "path", "")):
            with tempfile.TemporaryDirectory() as tmp:
                remote = RemoteModel(spec.path, Path(tmp), "check",  # type: ignore[attr-defined]
                                     spec.s3_settings())
                remote.refresh(lambda p: _load(config, p, Path(tmp)))
        else:
            _load(config)
    except (FetchError, ValueError) as exc:
        return str(exc)
    except ModelLoadError as exc:
        return str(exc)
    return None
