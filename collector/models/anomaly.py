"""The built-in streaming anomaly detector: robust, z-score or EWMA per series, no training step.

Pure Python (no numpy) so a bare install gets anomaly flags, and every piece of state is a plain
value (dataclasses of floats and deques) that the runtime's checkpoint codec stores as JSON.

Methods: ``robust`` (the default; :mod:`collector.models.robust`) compares a reading with a
median level, learnt daily/weekly profiles and a tail-aware scale over a long history, for real
sensor series; ``zscore`` compares a reading with the mean and standard deviation of the last
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

On top of the per-reading score sits the **alarm logic**, the same for every method: an event
opens after ``min_duration`` readings in a row *trigger* (its first reading carries ``alarm``),
stays open while the score stays above ``threshold * hysteresis``, and a new trigger within
``cooldown`` readings of its end continues the same event (same ``event_id``, no second
alarm). ``prediction`` is 1 for every reading of an open event. For zscore/ewma a reading
triggers when its score is above ``threshold``; with ``hysteresis: 1``, ``min_duration: 1`` and
``cooldown: 0`` (their defaults) events are exactly the runs of flagged readings.

With ``incidents`` (robust's default) the alarm is per **device incident**: an event that opens
while another series of the same device and source is in one joins it (``alarm`` false, the
incident's ``event_id``; ``prediction`` is unchanged). Several sensors of one station going odd
in the same hour are one thing happening to the station; on the air-quality benchmark they were
8 of robust's 27 false-alarm events. Its state is one (event id, time) per device.

For ``robust`` a reading triggers on either of two kinds of evidence, because on real series a
lone reading a little past a fixed threshold is far more often the noise's own tail than a
fault, while a fault usually shows as several odd readings:

- **accumulated evidence** (a one-sided CUSUM on ``|z|``, so it sees a shift either way and a
  burst of noise alike): ``evidence = max(0, evidence + min(|z|, 1.25 t) - 0.5 t)`` with ``t`` the
  threshold, triggering above ``1.5 t``: three readings at 1.25 t in a row, or four at t, or
  seven at 0.75 t; it is reset when an event opens or closes, so each event is counted once;
- **a lone reading beyond the series' own tail**: above ``threshold`` and above the level the
  series' own noise reaches about once in 3,300 readings (see :mod:`collector.models.robust`),
  so a Student-t sensor does not alarm on every tail reading while a Gaussian one still alarms
  on a 7-sd spike (its tail level is about 5.3 sd).

A reading above ``0.625 t`` is kept out of the level (as a flagged one is for zscore/ewma), so
a slow burst cannot drag the level along and hide itself.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from collector.models.robust import RobustState, hour_of

Method = Literal["robust", "zscore", "ewma"]
ROBUST_GATE = 0.625
"""robust: a reading above this share of ``threshold`` does not enter the level."""
ROBUST_DRIFT, ROBUST_CAP, ROBUST_DECIDE = 0.5, 1.25, 1.5
"""robust: the evidence accumulator's allowance, per-reading cap and decision level, as shares
of ``threshold`` (so ``threshold`` stays the one sensitivity knob)."""
ROBUST_TAIL_AT = 4.0
"""robust: at this ``threshold`` (the default) a lone reading alarms beyond the series' own tail
level; the level moves in proportion to ``threshold``."""
Season = Literal["auto", "day", "week", "none"]


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
    history: int = 1000
    """robust: accepted readings the scale (and the long-run median) is taken over."""
    level_window: int = 5
    """robust: accepted readings whose median is the local level."""
    season: Season = "auto"
    hysteresis: float = 1.0
    """An open event stays open while the score is above ``threshold * hysteresis``."""
    min_duration: int = 1
    spike_threshold: float | None = None
    """A single reading scoring above this opens an event whatever ``min_duration`` says (and,
    for robust, whatever the series' own tail says)."""
    cooldown: int = 0
    incidents: bool = False
    """One alarm per device incident: an event that opens while another series of the same
    device and source is in one joins it (no second alarm, the incident's ``event_id``)."""


@dataclass
class Verdict:
    """What the detector says about one reading; ``prediction`` is None during warm-up."""

    prediction: float | None
    confidence: float
    score: float | None
    window: list[float]
    alarm: bool | None = None
    """True on the first reading of an event: the one to notify on."""
    event_id: str | None = None


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
    robust: RobustState | None = None
    events: EventState = field(default_factory=lambda: EventState())


@dataclass
class EventState:
    """Where a series is in the alarm logic."""

    above: int = 0
    """Readings in a row above the threshold (while no event is open)."""
    open: bool = False
    event_id: str | None = None
    """The open event, or the last one (continued by a trigger within the cool-down)."""
    quiet: int = 0
    """Readings since the last event closed."""
    closing: bool = False
    """The reading being scored is the open event's last (a confirmed shift was adopted)."""
    last_ts: datetime | None = None
    """Time of the series' previous scored reading: an incident of its device still going on
    at or after it is going on now (whatever order same-time readings of the device come in)."""


@dataclass
class Incident:
    """The latest alarmed event of one device/source, and until when any of its series was in
    an event: the notification every event of its series joins while it lasts."""

    event_id: str
    until: datetime


def confidence_of(z: float, threshold: float) -> float:
    """How far a reading is from the decision boundary, squashed to 0..1."""
    return 1.0 - math.exp(-abs(abs(z) - threshold))


class StreamingDetector:
    """Per-series anomaly detection over a stream of (key, value) pairs in event-time order."""

    incidents: dict[Hashable, Incident] | None = None
    """Per device/source (``key[:-1]``), with ``settings.incidents``; a class-level default so
    a checkpoint written before incidents existed still restores."""

    def __init__(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self.series: dict[Hashable, SeriesState] = {}

    def score(
        self,
        keys: Sequence[Hashable],
        values: Sequence[float],
        times: Sequence[datetime | None] | None = None,
    ) -> list[Verdict]:
        """Verdicts for readings given in time order (any mix of series)."""
        stamps = times if times is not None else [None] * len(values)
        return [self.observe(k, v, t) for k, v, t in zip(keys, values, stamps, strict=True)]

    def observe(self, key: Hashable, value: float, ts: datetime | None = None) -> Verdict:
        """Score one reading against its series' past, then learn from it unless it is flagged."""
        s = self.settings
        state = self.series.get(key)
        if state is None:
            state = self.series[key] = self._new_state(deque(maxlen=s.window))
        window = [*state.raw, value]
        state.raw.append(value)
        if s.method == "robust":
            return self._robust_verdict(key, state, value, ts, window)
        z = self._classic_z(key, state, value)
        if z is None:
            return Verdict(prediction=None, confidence=0.0, score=None, window=window)
        events = self.series[key].events
        in_event, alarm, event_id = _alarm_step(events, s, abs(z), abs(z) > s.threshold, key, ts)
        alarm, event_id = self._incident(key, events, in_event, alarm, event_id, ts)
        return Verdict(
            prediction=1.0 if in_event else 0.0,
            confidence=confidence_of(z, s.threshold),
            score=abs(z),
            window=window,
            alarm=alarm,
            event_id=event_id,
        )

    def _new_state(self, raw: deque[float], events: EventState | None = None) -> SeriesState:
        s = self.settings
        state = SeriesState(accepted=deque(maxlen=s.window), raw=raw,
                            events=events or EventState())
        if s.method == "robust":
            state.robust = RobustState.new(s.history, s.level_window, s.season)
        return state

    def _classic_z(self, key: Hashable, state: SeriesState, value: float) -> float | None:
        s = self.settings
        if s.method == "zscore":
            warm, mean, std = len(state.accepted) >= s.warmup, *_mean_std(state)
        else:
            warm, mean, std = state.seen >= s.warmup, state.level, _ewm_std(state, s.window)
        if not warm:
            self._learn(state, value)
            return None
        z = (value - mean) / max(std, s.min_std)
        if abs(z) > s.threshold:
            state.streak += 1
            if state.streak >= s.reset_after:
                self.series[key] = self._new_state(state.raw, state.events)
        else:
            state.streak = 0
            self._learn(state, value)
        return z

    def _robust_verdict(
        self, key: Hashable, state: SeriesState, value: float, ts: datetime | None,
        window: list[float],
    ) -> Verdict:
        s = self.settings
        r = state.robust
        assert r is not None
        hour = hour_of(ts)
        both = r.residual(value, hour)
        r.remember(value, hour)
        if state.seen < s.warmup or both is None:
            state.seen += 1
            r.learn(value, hour)
            if both is not None:
                r.residuals.add(abs(both[0]))
            return Verdict(prediction=None, confidence=0.0, score=None, window=window)
        residual, departure = both
        scale = r.scale(s.min_std)
        loud = scale * r.loudness(hour)
        z = residual / loud
        score, away, gate = abs(z), abs(departure) / loud, ROBUST_GATE * s.threshold
        if away > gate:
            # Kept out of the level: a burst must not drag the level along and hide itself.
            state.streak += 1
            r.note_odd(value, hour)
            if state.streak >= s.reset_after:
                r.adopt_shift(state.streak)
                state.streak = 0
                r.evidence = 0.0
                state.events.closing = True  # the shift is the new normal: its event ends here
        else:
            state.streak = 0
            state.seen += 1
            r.learn(value, hour)
        t = s.threshold
        r.evidence = max(0.0, r.evidence + min(score, ROBUST_CAP * t) - ROBUST_DRIFT * t)
        trigger = r.evidence > ROBUST_DECIDE * t
        if not trigger and score > t:
            trigger = score > r.tail_level() / scale * t / ROBUST_TAIL_AT
        was_open = state.events.open
        in_event, alarm, event_id = _alarm_step(state.events, s, away, trigger, key, ts)
        alarm, event_id = self._incident(key, state.events, in_event, alarm, event_id, ts)
        if state.events.open != was_open or (in_event and trigger):
            r.evidence = 0.0  # each event is counted once; a new one needs new evidence
        if not in_event:
            r.note_normal(residual, hour, z, gate)  # an event's readings never widen the scale
        return Verdict(
            prediction=1.0 if in_event else 0.0,
            confidence=confidence_of(z, s.threshold),
            score=score,
            window=window,
            alarm=alarm,
            event_id=event_id,
        )

    def _incident(
        self, key: Hashable, ev: EventState, in_event: bool, alarm: bool, event_id: str | None,
        ts: datetime | None,
    ) -> tuple[bool, str | None]:
        """(alarm, event id) once the device is taken into account: an event opening while
        another series of the same device/source is in one joins that incident.

        Several sensors of one station going odd in the same hour are one thing happening to
        the station (a pollution episode, a power dip, a failing board), and the operator wants
        one notification for it, not five. The event itself is unchanged (``prediction`` is 1
        for its readings); only its alarm is folded into the incident's, and it carries the
        incident's ``event_id`` so all its readings can be pulled up together.
        """
        prev, ev.last_ts = ev.last_ts, ts
        if not (self.settings.incidents and ts is not None and isinstance(key, tuple)
                and len(key) > 1):
            return alarm, event_id
        if self.incidents is None:
            self.incidents = {}
        group = key[:-1]
        incident = self.incidents.get(group)
        if alarm and incident is not None and prev is not None and incident.until >= prev:
            alarm, event_id = False, incident.event_id
            ev.event_id = event_id  # a continuation within the cool-down keeps the incident
        if in_event:
            if incident is None or alarm:
                assert event_id is not None
                self.incidents[group] = Incident(event_id, ts)
            elif ts > incident.until:
                incident.until = ts
        return alarm, event_id

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


def _alarm_step(
    ev: EventState, s: DetectorSettings, score: float, trigger: bool, key: Hashable,
    ts: datetime | None,
) -> tuple[bool, bool, str | None]:
    """(in an event, raises the alarm, event id) for one scored reading.

    ``trigger`` says whether the reading, on its own method's terms, calls for an event; a run
    towards ``min_duration`` starts on a trigger and goes on while ``score`` (how far the
    series is from its usual) stays above ``threshold``; an open event stays open while it
    stays above ``threshold * hysteresis``.
    """
    if ev.open:
        if ev.closing:
            ev.open, ev.closing, ev.quiet = False, False, 0
            return True, False, ev.event_id
        if score > s.threshold * s.hysteresis:
            return True, False, ev.event_id
        ev.open, ev.quiet = False, 0
    ev.closing = False
    ev.above = ev.above + 1 if (trigger or (ev.above and score > s.threshold)) else 0
    spike = s.spike_threshold is not None and score > s.spike_threshold
    if ev.above < s.min_duration and not spike:
        ev.quiet += 1
        return False, False, None
    ev.open, ev.above = True, 0
    if ev.event_id is not None and ev.quiet < s.cooldown:
        return True, False, ev.event_id  # the same event again within the cool-down
    ev.event_id = event_id_of(key, ts)
    return True, True, ev.event_id


def event_id_of(key: Hashable, ts: datetime | None) -> str:
    """``device/source/metric@<first reading's time>``: the same on every replay."""
    parts = key if isinstance(key, tuple) else (key,)
    when = ts.isoformat().replace("+00:00", "Z") if ts is not None else "?"
    return "/".join(str(p) for p in parts) + "@" + when


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
