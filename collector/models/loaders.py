"""Load user models (scikit-learn/joblib pickles, ONNX files, Python callables) behind one call.

Every loader returns a :class:`LoadedModel` whose ``predict`` takes the Polars feature frame and
returns :class:`Outputs`. Loading also runs the model once on a row of zeros, so a file that is
not a model, or a model trained on a different number of features, fails here (at start-up, or
when a new file is dropped in) instead of in the middle of a run.

scikit-learn, joblib and onnxruntime are imported inside the loaders: a bare install that only
uses the built-in detector never needs them.

Security: a joblib/pickle file runs code when loaded. Only point ``path`` at models you trust.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import polars as pl

Signature = tuple[int, int]
"""(mtime in ns, size) of a model file: a change of either means a new model to load."""

EXTRA_HINT = "pip install 'edge-collector[ml]'"


class ModelLoadError(Exception):
    """A model could not be loaded or failed its smoke test; the message says why."""


class ModelSource(Protocol):
    """The ``model`` block of an ``infer`` config, as far as loading is concerned."""

    kind: str


@dataclass
class Outputs:
    """One value per input row; ``confidence``/``score`` are None when the model has none."""

    prediction: list[Any]
    confidence: list[float | None] | None = None
    score: list[float | None] | None = None


class LoadedModel(Protocol):
    """A loaded model: features in, outputs out."""

    def predict(self, features: pl.DataFrame) -> Outputs: ...


def signature(path: Path) -> Signature | None:
    """The file's change signature, None when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def watched_path(spec: Any) -> Path | None:
    """The file whose change means "reload": the model file, or the Python module's source."""
    if spec.kind in ("sklearn", "onnx"):
        return Path(spec.path)
    if spec.kind == "python":
        module_ref = spec.function.partition(":")[0]
        _add_to_path(spec.path)
        try:
            found = importlib.util.find_spec(module_ref)
        except (ImportError, ValueError):
            return None
        return Path(found.origin) if found and found.origin else None
    return None


def _add_to_path(folder: str | None) -> None:
    """Put the config's code folder on ``sys.path``, like the ``python`` source/transform."""
    if folder is not None:
        resolved = str(Path(folder).expanduser().resolve())
        if resolved not in sys.path:
            sys.path.insert(0, resolved)


def load_model(spec: Any, names: Sequence[str]) -> LoadedModel:
    """Load and smoke-test the model ``spec`` describes for the feature columns ``names``."""
    loaders: dict[str, Callable[[Any, Sequence[str]], LoadedModel]] = {
        "sklearn": _load_sklearn,
        "onnx": _load_onnx,
        "python": _load_python,
    }
    model = loaders[spec.kind](spec, names)
    probe = pl.DataFrame({n: [0.0] for n in names})
    try:
        out = model.predict(probe)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"the model fails on a test row of {list(names)}: {_why(exc)}"
        ) from None
    if len(out.prediction) != 1:
        raise ModelLoadError(
            f"the model returned {len(out.prediction)} predictions for 1 row of features"
        )
    return model


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelLoadError(f"needs the Python package {module!r}: {EXTRA_HINT}") from None


def _existing(path_text: str) -> Path:
    path = Path(path_text)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    return path


# --- scikit-learn ---------------------------------------------------------------------------


class SklearnModel:
    """A fitted estimator or pipeline: ``predict``, plus ``predict_proba``/``decision_function``."""

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator

    def predict(self, features: pl.DataFrame) -> Outputs:
        x = features.to_numpy().astype("float64", copy=False)
        est = self.estimator
        with warnings.catch_warnings():
            # Trained on a pandas frame, fed a matrix in the same column order: not a problem.
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            out = Outputs(prediction=list(est.predict(x)))
            if hasattr(est, "predict_proba"):
                out.confidence = [float(p) for p in est.predict_proba(x).max(axis=1)]
            if hasattr(est, "decision_function"):
                d = est.decision_function(x)
                if d.ndim == 1:
                    out.score = [float(v) for v in d]
        return out


def _load_sklearn(spec: Any, names: Sequence[str]) -> LoadedModel:
    path = _existing(spec.path)
    joblib = _require("joblib")
    _require("sklearn")
    try:
        estimator = joblib.load(path)
    except Exception as exc:
        raise ModelLoadError(f"{str(path)!r} is not a joblib/pickle model: {_why(exc)}") from None
    if not callable(getattr(estimator, "predict", None)):
        raise ModelLoadError(f"{str(path)!r} holds a {type(estimator).__name__}, not a model "
                             "with predict()")
    expected = getattr(estimator, "n_features_in_", None)
    if expected is not None and expected != len(names):
        raise ModelLoadError(
            f"{str(path)!r} was trained on {expected} features; the config builds "
            f"{len(names)}: {list(names)}"
        )
    trained_names = getattr(estimator, "feature_names_in_", None)
    if trained_names is not None and list(trained_names) != list(names):
        raise ModelLoadError(
            f"{str(path)!r} was trained on columns {list(trained_names)}; the config builds "
            f"{list(names)}"
        )
    return SklearnModel(estimator)


# --- ONNX -----------------------------------------------------------------------------------


class OnnxModel:
    """An ONNX graph with one 2-D input; outputs read as label, then probabilities or scores.

    The first output is the prediction. A later output with one column per class (a tensor, or
    skl2onnx's ZipMap list of dicts) gives ``confidence`` = the largest probability; one with a
    single value per row gives ``score``.
    """

    def __init__(self, session: Any, input_name: str, float32: bool) -> None:
        self.session = session
        self.input_name = input_name
        self.float32 = float32

    def predict(self, features: pl.DataFrame) -> Outputs:
        x = features.to_numpy().astype("float32" if self.float32 else "float64")
        results = self.session.run(None, {self.input_name: x})
        first = results[0]
        prediction = list(first.reshape(len(x), -1)[:, 0]) if first.ndim > 1 else list(first)
        out = Outputs(prediction=prediction)
        for extra in results[1:]:
            if isinstance(extra, list):
                out.confidence = [float(max(d.values())) for d in extra]
            elif extra.ndim == 2 and extra.shape[1] >= 2:
                out.confidence = [float(v) for v in extra.max(axis=1)]
            elif extra.size == len(x):
                out.score = [float(v) for v in extra.reshape(-1)]
        return out

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("an ONNX session does not pickle; reload it from its path")


def _load_onnx(spec: Any, names: Sequence[str]) -> LoadedModel:
    path = _existing(spec.path)
    ort = _require("onnxruntime")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"{str(path)!r} is not a loadable ONNX model: {_why(exc)}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(
            f"{str(path)!r} has {len(inputs)} inputs; the infer transform feeds one "
            f"[rows, {len(names)}] tensor"
        )
    shape = inputs[0].shape
    width = shape[-1] if len(shape) == 2 else None
    if isinstance(width, int) and width != len(names):
        raise ModelLoadError(
            f"{str(path)!r} takes {width} features; the config builds {len(names)}: {list(names)}"
        )
    if inputs[0].type not in ("tensor(float)", "tensor(double)"):
        raise ModelLoadError(f"{str(path)!r} takes {inputs[0].type}; only float inputs are fed")
    return OnnxModel(session, inputs[0].name, inputs[0].type == "tensor(float)")


# --- Python callable --------------------------------------------------------------------------


class PythonModel:
    """``function(features: pl.DataFrame)`` returning predictions in one of a few shapes.

    Accepted results: a frame or dict with a ``prediction`` column (and optionally ``confidence``
    and ``score``), or a sequence/Series of predictions.
    """

    def __init__(self, function: Callable[[pl.DataFrame], Any], ref: str) -> None:
        self.function = function
        self.ref = ref

    def predict(self, features: pl.DataFrame) -> Outputs:
        result = self.function(features)
        if isinstance(result, pl.DataFrame):
            result = {c: result[c].to_list() for c in result.columns}
        if isinstance(result, dict):
            if "prediction" not in result:
                raise ValueError(f"{self.ref} returned columns {sorted(result)} without "
                                 "'prediction'")
            out = Outputs(
                prediction=list(result["prediction"]),
                confidence=_opt_list(result.get("confidence")),
                score=_opt_list(result.get("score")),
            )
        else:
            out = Outputs(prediction=list(result))
        for name in ("prediction", "confidence", "score"):
            values = getattr(out, name)
            if values is not None and len(values) != features.height:
                raise ValueError(
                    f"{self.ref} returned {len(values)} {name} values for {features.height} rows"
                )
        return out


def _opt_list(values: Any) -> list[Any] | None:
    return None if values is None else list(values)


def _load_python(spec: Any, names: Sequence[str]) -> LoadedModel:
    module_ref, _, attr = spec.function.partition(":")
    _add_to_path(spec.path)
    try:
        module = _import_fresh(module_ref)
    except Exception as exc:
        raise ModelLoadError(f"cannot import {module_ref!r}: {_why(exc)}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ModelLoadError(f"{module_ref!r} has no callable {attr!r}")
    return PythonModel(function, spec.function)


def _import_fresh(module_ref: str) -> ModuleType:
    """Import a module, or re-import it when it was loaded before (a hot swap of its source)."""
    if module_ref in sys.modules:
        importlib.invalidate_caches()
        return importlib.reload(sys.modules[module_ref])
    return importlib.import_module(module_ref)
