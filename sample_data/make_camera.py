"""The offline image sample: a digits classifier (ONNX) and a folder of "camera" pictures.

The talk's second demo needs a model trained "in the cloud" and pictures taken on the device.
Both come from scikit-learn's bundled 8x8 digits (no download), so the sample runs anywhere:

- ``sample_data/models/digits.onnx``: a logistic regression trained on 75 % of the digits,
  exported with skl2onnx (input: 64 floats 0..16 per image; outputs: label, probabilities).
  Logistic regression because its probabilities are honest: blurred or mixed digits come out
  unsure, which is what the doubtful-images loop is about.
- ``sample_data/camera/``: PNGs (64x64 grayscale, light ink on black like the digits set) of
  held-out digits the model never saw, a few deliberately ambiguous ones (two digits blended,
  off-centre, heavy noise) so some confidences are low, and one truncated file that is not an
  image, to show the dead letter.

Run ``python -m sample_data.make_camera`` (needs the `ml` and `dev` extras); the same seed always
gives the same files. The tests import :func:`split` to score the model on the held-out part.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = HERE / "models" / "digits.onnx"
CAMERA = HERE / "camera"
SEED = 7
PIXEL = 255 / 16
"""Digits pixels are 0..16; PNGs store them as 0..255 (``preprocess.scale: 16/255`` undoes it)."""
UPSCALE = 8
"""8x8 digits are written as 64x64 pictures (``preprocess.size: [8, 8]`` with a box filter)."""


def split() -> tuple[Any, Any, Any, Any]:
    """(train X, train y, held-out X, held-out y) of the digits set, fixed by ``SEED``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def train(x: Any, y: Any) -> Any:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=0.01, max_iter=5000)
    model.fit(x.astype(np.float32), y)
    return model


def export(model: Any, path: Path) -> None:
    """ONNX with a plain probability tensor (``zipmap: False``), float input [rows, 64]."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        model,
        initial_types=[("pixels", FloatTensorType([None, 64]))],
        options={id(model): {"zipmap": False}},
        target_opset=17,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())


def to_png(pixels: Any, path: Path) -> None:
    """An 8x8 digit (0..16) as a 64x64 8-bit grayscale PNG."""
    from PIL import Image

    img = np.clip(np.rint(np.asarray(pixels, dtype=np.float64).reshape(8, 8) * PIXEL), 0, 255)
    big = np.kron(img, np.ones((UPSCALE, UPSCALE))).astype(np.uint8)
    Image.fromarray(big, mode="L").save(path, optimize=False)


def write_camera(folder: Path, x_test: Any, y_test: Any, clean: int = 30) -> list[Path]:
    """Clean held-out digits, blends of two digits, noisy ones and one corrupt file."""
    rng = np.random.default_rng(SEED)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    written = []
    picks = rng.choice(len(x_test), size=clean, replace=False)
    for n, i in enumerate(picks):
        path = folder / f"img-{n:03d}-digit{int(y_test[i])}.png"
        to_png(x_test[i], path)
        written.append(path)
    n = clean
    for a, b in ((3, 8), (1, 7), (4, 9), (5, 6), (0, 6), (2, 7)):
        xa = x_test[np.flatnonzero(y_test == a)[0]]
        xb = x_test[np.flatnonzero(y_test == b)[1]]
        path = folder / f"img-{n:03d}-blend{a}{b}.png"
        to_png(0.5 * xa + 0.5 * xb, path)
        written.append(path)
        n += 1
    for digit in (1, 4, 7):
        x = x_test[np.flatnonzero(y_test == digit)[3]].reshape(8, 8)
        path = folder / f"img-{n:03d}-shifted{digit}.png"
        to_png(np.roll(x, 2, axis=1), path)  # the object off-centre in the frame
        written.append(path)
        n += 1
    for digit in (2, 5, 8, 9):
        x = x_test[np.flatnonzero(y_test == digit)[2]]
        noisy = np.clip(0.6 * x + rng.uniform(0, 9, size=64), 0, 16)
        path = folder / f"img-{n:03d}-noisy{digit}.png"
        to_png(noisy, path)
        written.append(path)
        n += 1
    full = (folder / written[0].name).read_bytes()
    broken = folder / f"img-{n:03d}-corrupt.png"
    broken.write_bytes(full[: len(full) // 3])  # a camera that died mid-write
    written.append(broken)
    return written


def main(argv: list[str]) -> int:
    x_train, y_train, x_test, y_test = split()
    model = train(x_train, y_train)
    print(f"held-out accuracy (sklearn): {model.score(x_test.astype(np.float32), y_test):.3f}")
    export(model, MODEL)
    files = write_camera(CAMERA, x_test, y_test)
    print(
        f"wrote {MODEL.relative_to(HERE.parent)} ({MODEL.stat().st_size} bytes) and "
        f"{len(files)} files in {CAMERA.relative_to(HERE.parent)}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
