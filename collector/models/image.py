"""Image classification for ``infer``: decode the file a row points at, preprocess, run ONNX.

Rows of an image source (the ``files`` source) carry the image as a file path, not as a value,
so the image model reads pixels itself. The split between this module and the transform:

- :func:`decode` turns one path into a preprocessed array, or a reason why it cannot (missing,
  outside the allowed folders, not an image, truncated, too large). One bad file costs only its
  own row: the transform marks it unsure and dead-letters it, the rest of the batch is scored.
- :class:`ImageModel` runs a batch of decoded arrays through an ONNX classifier and reads its
  outputs: probabilities (a ``[rows, classes]`` tensor, softmaxed when they are logits, or
  skl2onnx's ZipMap dicts) and, when the graph has one, its own label output.

Pillow, numpy and onnxruntime are imported inside functions: a bare install never needs them.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from collector.plugin import Model

Layout = Literal["auto", "NCHW", "NHWC", "flat"]
RESAMPLE = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")


class PreprocessConfig(Model):
    """How a decoded image becomes the model's input tensor, in this order.

    resize -> colour mode -> float ``pixel * scale`` -> ``(x - mean) / std`` per channel ->
    layout -> dtype. Whatever is not set is read from the model's input shape where it can be.
    """

    size: tuple[int, int] | None = Field(
        default=None,
        description="[width, height] to resize to; default: the model input's static size "
        "(a flat [rows, N] input takes a square of sqrt(N / channels)).",
    )
    resample: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"] = Field(
        default="bilinear", description="Pillow resampling filter for the resize."
    )
    color: Literal["rgb", "grayscale"] = Field(
        default="rgb", description="`rgb` (3 channels) or `grayscale` (1 channel)."
    )
    invert: bool = Field(
        default=False,
        description="Use 255 - pixel (models trained on light ink on a dark background, "
        "fed photos of dark ink on paper).",
    )
    scale: float = Field(
        default=1 / 255, description="Pixels (0..255) are multiplied by this first."
    )
    mean: list[float] | None = Field(
        default=None,
        description="Subtracted per channel after scaling (one value, or one per channel), "
        "e.g. ImageNet [0.485, 0.456, 0.406].",
    )
    std: list[float] | None = Field(
        default=None,
        description="Divided per channel after the mean (one value, or one per channel).",
    )
    layout: Layout = Field(
        default="auto",
        description="`NCHW`, `NHWC` or `flat` ([rows, H*W*C], e.g. a scikit-learn model); "
        "`auto`: flat for a 2-D input, NCHW when the input's dim 1 is 1 or 3, else NHWC.",
    )
    dtype: Literal["auto", "float32", "float64", "uint8"] = Field(
        default="auto", description="Input tensor type; `auto`: the model input's type."
    )

    @model_validator(mode="after")
    def _channels(self) -> PreprocessConfig:
        channels = 1 if self.color == "grayscale" else 3
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, channels):
                raise ValueError(
                    f"`{name}` takes 1 or {channels} values for `color: "
                    f"{self.color}`, got {len(values)}"
                )
        if self.std is not None and any(v == 0 for v in self.std):
            raise ValueError("`std` values must not be 0")
        if self.size is not None and min(self.size) < 1:
            raise ValueError("`size` must be positive [width, height]")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color == "grayscale" else 3


class ImageDecodeError(Exception):
    """One image cannot be used; the message is the dead-letter reason."""


@dataclass(frozen=True)
class Plan:
    """The preprocessing resolved against the model: every ``auto`` decided."""

    width: int
    height: int
    layout: Literal["NCHW", "NHWC", "flat"]
    dtype: str
    config: PreprocessConfig
    roots: tuple[Path, ...] = ()
    max_pixels: int = 50_000_000


def plan_for(
    config: PreprocessConfig,
    input_shape: Sequence[Any],
    input_type: str,
    roots: Sequence[Path] = (),
    max_pixels: int = 50_000_000,
) -> Plan:
    """Decide size, layout and dtype from the config, falling back on the model's input."""
    static = [d if isinstance(d, int) and d > 0 else None for d in input_shape]
    layout = config.layout
    if layout == "auto":
        if len(static) == 2:
            layout = "flat"
        elif len(static) == 4 and static[1] in (1, 3):
            layout = "NCHW"
        elif len(static) == 4:
            layout = "NHWC"
        else:
            raise ValueError(
                f"the model input has shape {list(input_shape)}: set "
                "`preprocess.layout` (NCHW, NHWC or flat)"
            )
    expected_rank = 2 if layout == "flat" else 4
    if len(static) != expected_rank:
        raise ValueError(
            f"`layout: {layout}` needs a {expected_rank}-D model input; this "
            f"model takes {list(input_shape)}"
        )
    c = config.channels
    if layout == "NCHW" and static[1] not in (None, c):
        raise ValueError(f"the model takes {static[1]} channels; `color: {config.color}` gives {c}")
    if layout == "NHWC" and static[3] not in (None, c):
        raise ValueError(f"the model takes {static[3]} channels; `color: {config.color}` gives {c}")
    if config.size is not None:
        width, height = config.size
    elif layout == "NCHW" and static[2] and static[3]:
        height, width = static[2], static[3]
    elif layout == "NHWC" and static[1] and static[2]:
        height, width = static[1], static[2]
    elif (
        layout == "flat"
        and static[1]
        and static[1] % c == 0
        and math.isqrt(static[1] // c) ** 2 == static[1] // c
    ):
        width = height = math.isqrt(static[1] // c)
    else:
        raise ValueError(
            f"cannot tell the image size from the model input "
            f"{list(input_shape)}: set `preprocess.size: [width, height]`"
        )
    if layout == "flat" and static[1] not in (None, width * height * c):
        raise ValueError(
            f"the model takes {static[1]} values per row; {width}x{height}x{c} "
            f"gives {width * height * c}"
        )
    dtype = config.dtype
    if dtype == "auto":
        dtype = {
            "tensor(float)": "float32",
            "tensor(double)": "float64",
            "tensor(uint8)": "uint8",
        }.get(input_type, "")
        if not dtype:
            raise ValueError(
                f"the model takes {input_type}; only float, double and uint8 image inputs are fed"
            )
    return Plan(
        width=width,
        height=height,
        layout=layout,
        dtype=dtype,
        config=config,
        roots=tuple(roots),
        max_pixels=max_pixels,
    )


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    if not roots:
        return True
    resolved = path.resolve()
    return any(resolved.is_relative_to(r.resolve()) for r in roots)


def decode(path_text: Any, plan: Plan) -> Any:
    """One image file as a preprocessed float array of shape (H, W, C); ImageDecodeError if not.

    The path comes from data, so it is untrusted: it must lie under ``plan.roots`` (the data dir
    by default: where the files source's blob store is), and Pillow's decompression-bomb
    warning is an error, so a tiny file claiming a gigapixel image cannot exhaust memory.
    """
    import numpy as np
    from PIL import Image

    if path_text is None or str(path_text) == "":
        raise ImageDecodeError("the row has no image path")
    path = Path(str(path_text))
    if not path.is_absolute():
        raise ImageDecodeError(f"image path {str(path_text)!r} is not absolute")
    if not _inside(path, plan.roots):
        raise ImageDecodeError(f"image path {str(path_text)!r} is outside the allowed folders")
    cfg = plan.config
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > plan.max_pixels:
                    raise ImageDecodeError(
                        f"image is {img.width}x{img.height}, over {plan.max_pixels} pixels"
                    )
                img.load()
                converted = img.convert("L" if cfg.color == "grayscale" else "RGB")
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"image file {str(path)!r} does not exist") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except Exception as exc:  # UnidentifiedImageError, truncated data, bad palette, ...
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ImageDecodeError(f"not a readable image: {type(exc).__name__}: {first}") from None
    if converted.size != (plan.width, plan.height):
        resample = getattr(Image.Resampling, cfg.resample.upper())
        converted = converted.resize((plan.width, plan.height), resample=resample)
    pixels = np.asarray(converted, dtype=np.float64)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if cfg.invert:
        pixels = 255.0 - pixels
    return pixels


def to_tensor(images: Sequence[Any], plan: Plan) -> Any:
    """Stack decoded (H, W, C) arrays into the model's input tensor."""
    import numpy as np

    cfg = plan.config
    x = np.stack(images).astype(np.float64) * cfg.scale
    if cfg.mean is not None:
        x = x - np.asarray(cfg.mean, dtype=np.float64)
    if cfg.std is not None:
        x = x / np.asarray(cfg.std, dtype=np.float64)
    if plan.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    elif plan.layout == "flat":
        x = x.reshape(len(images), -1)
    if plan.dtype == "uint8":
        x = np.clip(np.rint(x), 0, 255)
    return np.ascontiguousarray(x.astype(plan.dtype))


@dataclass
class Classified:
    """Per image: label, top-1 probability and the top-k (label, probability) pairs."""

    prediction: list[str | None] = field(default_factory=list)
    confidence: list[float | None] = field(default_factory=list)
    top: list[list[tuple[str, float]]] = field(default_factory=list)


def _softmax(x: Any) -> Any:
    import numpy as np

    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ImageModel:
    """An ONNX image classifier with its preprocessing plan.

    Output reading: a float ``[rows, classes]`` output (or a ZipMap list of dicts) is the class
    probabilities; rows that are not already probabilities (negative, or not summing to 1) are
    softmaxed, unless ``softmax`` says otherwise. A 1-D int/string output is the model's own
    label. The label is ``labels[argmax]`` when a ``labels`` list is configured, else the
    model's label output, else the class index (or ZipMap key).
    """

    def __init__(
        self,
        session: Any,
        input_name: str,
        plan: Plan,
        labels: list[str] | None,
        top_k: int,
        softmax: bool | None,
    ) -> None:
        self.session = session
        self.input_name = input_name
        self.plan = plan
        self.labels = labels
        self.top_k = top_k
        self.softmax = softmax

    def classify(self, images: Sequence[Any]) -> Classified:
        import numpy as np

        out = Classified()
        if not images:
            return out
        n = len(images)
        results = self.session.run(None, {self.input_name: to_tensor(images, self.plan)})
        probs: Any = None
        names: list[str] | None = None
        own_labels: list[Any] | None = None
        for r in results:
            if isinstance(r, list) and r and isinstance(r[0], dict):
                names = [str(k) for k in r[0]]
                probs = np.asarray([[float(d[k]) for k in r[0]] for d in r])
            elif (
                hasattr(r, "ndim")
                and r.ndim == 2
                and r.shape[0] == n
                and r.shape[1] >= 2
                and r.dtype.kind == "f"
                and probs is None
            ):
                probs = r.astype(np.float64)
            elif (
                hasattr(r, "ndim")
                and r.ndim == 1
                and r.shape[0] == n
                and own_labels is None
                and r.dtype.kind in "iuUSO"
            ):
                own_labels = list(r)
        if probs is None:
            raise ValueError("the model has no [rows, classes] probability/score output")
        want_softmax = self.softmax
        if want_softmax is None:
            want_softmax = bool(
                (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
            )
        if want_softmax:
            probs = _softmax(probs)
        classes = probs.shape[1]
        if self.labels is not None:
            if len(self.labels) != classes:
                raise ValueError(
                    f"`labels` has {len(self.labels)} names; the model scores {classes} classes"
                )
            names = list(self.labels)
        elif names is None:
            names = [str(i) for i in range(classes)]
        best = probs.argmax(axis=1)
        k = min(self.top_k, classes)
        order = np.argsort(-probs, axis=1)[:, :k] if k else None
        for i in range(n):
            j = int(best[i])
            if self.labels is None and own_labels is not None:
                label = own_labels[i]
                label = label.decode() if isinstance(label, bytes) else label
                out.prediction.append(str(label.item() if hasattr(label, "item") else label))
            else:
                out.prediction.append(names[j])
            out.confidence.append(float(probs[i, j]))
            if order is not None:
                out.top.append([(names[int(c)], float(probs[i, int(c)])) for c in order[i]])
        return out

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("an ONNX session does not pickle; reload it from its path")


def load_image_model(
    path: Path,
    preprocess: PreprocessConfig,
    labels: list[str] | None,
    top_k: int,
    softmax: bool | None,
    roots: Sequence[Path] = (),
    max_pixels: int = 50_000_000,
) -> ImageModel:
    """Load the ONNX file and smoke-test it on a blank image of the planned size.

    Raises ``ValueError``/``ImportError`` with the reason; the caller turns them into its own
    load error, so a wrong file is refused at start-up or at a hot swap, not mid-run.
    """
    import numpy as np

    ort = importlib.import_module("onnxruntime")
    importlib.import_module("PIL")
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{str(path)!r} is not a loadable ONNX model: {type(exc).__name__}: {first}"
        ) from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"{str(path)!r} has {len(inputs)} inputs; an image model takes one")
    plan = plan_for(preprocess, inputs[0].shape, inputs[0].type, roots, max_pixels)
    model = ImageModel(session, inputs[0].name, plan, labels, top_k, softmax)
    blank = np.zeros((plan.height, plan.width, preprocess.channels))
    try:
        probe = model.classify([blank])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"the model fails on a blank {plan.width}x{plan.height} image: "
            f"{type(exc).__name__}: {first}"
        ) from None
    if len(probe.prediction) != 1:
        raise ValueError("the model returned no prediction for one image")
    return model
