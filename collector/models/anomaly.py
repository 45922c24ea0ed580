"""The built-in streaming anomaly detector: rolling z-score or EWMA per series, no training step.

Pure Python (no numpy) so a bare install gets anomaly flags, and every piece of state is a plain
value (dataclasses of floats and deques) that the runtime's checkpoint codec stores as JSON.

Methods: ``zscore`` compares a reading with the mean and standard deviation of the last
``window`` accepted readings (steady signals); ``ewma`` compares it with an exponentially
weighted level that follows the signal at ``alpha``, and with the spread of past one-step errors
averaged over about ``window`` readings (drifting signals such as a random walk).

Three choices make the detector usable on real signals:

- A flagged value does not enter the statistics, so one spike does not inflate the spread and
  hide the next one. After ``reset_after`` flags in a row the series is taken to have moved to a
  new level and the detector warms up again instead of flagging forever.
- The ewma spread is averaged much slower than the level moves: with one fast weight for both,
  the spread would come from two or three points and flag plain noise.
- ``confidence`` is ``1 - exp(-| |z| - threshold |)``: near 1 far from the threshold on either
  side, near 0 for readings right at the boundary, which are the ones worth a human look.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Method = Literal["zscore", "ewma"]


@dataclass(frozen=True)
class DetectorSettings:
    """Knobs of the built-in detector (see the ``infer`` transform's ``model`` options)."""

    method: Method = "zscore"
    window: int = 60
    threshold: float = 4.0
    warmup: int = 30
    alpha: float = 0.1
    reset_after: int = 10
    min_std: float = 1e-9


@dataclass
class Verdict:
    """What the detector says about one reading; ``prediction`` is None during warm-up."""

    prediction: float | None
    confidence: float
    score: float | None
    window: list[float]


@dataclass
class SeriesState:
    """Everything remembered about one (device, source, metric) series."""

    accepted: deque[float] = field(default_factory=deque)
    """zscore: the last ``window`` values that were not flagged."""
    total: float = 0.0
    total_sq: float = 0.0
    anchor: float = 0.0
    """zscore: sums are kept relative to ``anchor`` so large offsets do not cancel precision."""
    updates: int = 0
    level: float = 0.0
    variance: float = 0.0
    seen: int = 0
    """ewma: values folded into ``level``/``variance``; zscore uses ``len(accepted)``."""
    streak: int = 0
    raw: deque[float] = field(default_factory=deque)
    """The last ``window`` raw values, anomalies included: the window a verdict came from."""


def confidence_of(z: float, threshold: float) -> float:
    """How far a reading is from the decision boundary, squashed to 0..1."""
    return 1.0 - math.exp(-abs(abs(z) - threshold))


class StreamingDetector:
    """Per-series anomaly detection over a stream of (key, value) pairs in event-time order."""

    def __init__(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self.series: dict[Hashable, SeriesState] = {}

    def score(self, keys: Sequence[Hashable], values: Sequence[float]) -> list[Verdict]:
        """Verdicts for readings given in time order (any mix of series)."""
        return [self.observe(key, value) for key, value in zip(keys, values, strict=True)]

    def observe(self, key: Hashable, value: float) -> Verdict:
        """Score one reading against its series' past, then learn from it unless it is flagged."""
        s = self.settings
        state = self.series.get(key)
        if state is None:
            state = self.series[key] = SeriesState(
                accepted=deque(maxlen=s.window), raw=deque(maxlen=s.window)
            )
        window = [*state.raw, value]
        state.raw.append(value)
        if s.method == "zscore":
            warm, mean, std = len(state.accepted) >= s.warmup, *_mean_std(state)
        else:
            warm, mean, std = state.seen >= s.warmup, state.level, _ewm_std(state, s.window)
        if not warm:
            self._learn(state, value)
            return Verdict(prediction=None, confidence=0.0, score=None, window=window)
        z = (value - mean) / max(std, s.min_std)
        anomalous = abs(z) > s.threshold
        if anomalous:
            state.streak += 1
            if state.streak >= s.reset_after:
                self.series[key] = SeriesState(
                    accepted=deque(maxlen=s.window), raw=state.raw
                )
        else:
            state.streak = 0
            self._learn(state, value)
        return Verdict(
            prediction=1.0 if anomalous else 0.0,
            confidence=confidence_of(z, s.threshold),
            score=abs(z),
            window=window,
        )

    def _learn(self, state: SeriesState, value: float) -> None:
        if self.settings.method == "ewma":
            if state.seen == 0:
                state.level, state.variance = value, 0.0
            else:
                # The level follows the signal at `alpha`; the spread of the one-step errors is
                # averaged much slower (over ~`window` readings), or a fast-tracking level would
                # come with a spread estimated from two or three points and flag noise.
                diff = value - state.level
                state.level += self.settings.alpha * diff
                b = _spread_weight(self.settings.window)
                state.variance = (1 - b) * state.variance + b * diff * diff
            state.seen += 1
            return
        if not state.accepted:
            state.anchor = value
        if state.accepted.maxlen is not None and len(state.accepted) == state.accepted.maxlen:
            old = state.accepted[0] - state.anchor
            state.total -= old
            state.total_sq -= old * old
        state.accepted.append(value)
        d = value - state.anchor
        state.total += d
        state.total_sq += d * d
        state.updates += 1
        if state.updates % (state.accepted.maxlen or 1) == 0:
            _resum(state)


def _resum(state: SeriesState) -> None:
    """Recompute the running sums exactly, so float drift never accumulates past one window."""
    state.anchor = state.accepted[0]
    state.total = sum(v - state.anchor for v in state.accepted)
    state.total_sq = sum((v - state.anchor) ** 2 for v in state.accepted)


def _spread_weight(window: int) -> float:
    """EWM weight whose centre of mass is about ``window`` / 2 readings back, as in pandas' span."""
    return 2.0 / (window + 1)


def _ewm_std(state: SeriesState, window: int) -> float:
    """Spread of the one-step errors, bias-corrected for the zero it started from (as Adam does)."""
    errors = state.seen - 1
    if errors <= 0:
        return 0.0
    b = _spread_weight(window)
    return math.sqrt(state.variance / (1 - (1 - b) ** errors))


def _mean_std(state: SeriesState) -> tuple[float, float]:
    n = len(state.accepted)
    if n < 2:
        return (state.accepted[0] if n else 0.0), 0.0
    mean_d = state.total / n
    var = max(state.total_sq / n - mean_d * mean_d, 0.0) * n / (n - 1)
    return state.anchor + mean_d, math.sqrt(var)
