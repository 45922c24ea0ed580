"""The ``robust`` method of the built-in detector: for real sensor series, with no training.

Real series are not Gaussian around a flat mean: heavy tails, daily and weekly cycles, level
shifts that become the new normal, slow drifts, noise that changes with load, smooth signals
whose hour-to-hour changes are small next to their daily range. An operator silences a
detector that cries wolf, so this method spends its effort on *not* alarming on what the
series itself shows to be normal. Per series it keeps (all bounded, all plain values the
checkpoint codec stores):

- **A forecast chosen by its own errors.** The expected value is a seasonal profile (none, hour
  of day, or hour of week; learnt online as exponentially weighted deviations from a trimmed
  mean of the long run) plus either the **median** of the last ``level_window`` accepted
  readings (noisy, steady signals) or the **last** accepted reading (smooth, autocorrelated
  signals such as air quality, where a median lags by hours). Every pair is scored on every 4th
  reading's one-step error, and the best one is used once it is clearly better: a profile is
  used only where it explains the readings, a flat signal never uses one. The profile is chosen
  on readings kept out as odd too, over about four days whatever the step, and those readings
  teach their slot (bounded): so a step that recurs daily (a machine starting) becomes the
  profile's within days instead of alarming every day.
- **A tail-aware scale** over the last ``history`` readings outside events: the larger of
  ``1.4826 * median |residual|`` (the MAD) and the 99th percentile of ``|residual|`` / 2.576.
- **Loudness by hour of day.** Noise that grows with load (busy hours) would otherwise alarm
  every afternoon and hide night-time faults: the residuals are divided by how loud each hour
  usually is (learnt from normal readings, bounded to 1/3..3).
- **The series' own tail.** A single reading alarms only above the level its own tail reaches
  about once in ``1 / TAIL_RATE`` readings, extrapolated from the 90th and 99th percentiles as a
  power law (Gaussian noise: about 5 sd; Student-t noise: much further out). Until the history
  is long, the tail index is pulled towards a heavy one (``TAIL_PRIOR``), so a young series
  does not alarm on the first outliers it has not yet seen the like of.
- **Adaptation after a confirmed shift**: a reading far out does not enter the level, but after
  ``reset_after`` of them in a row the level jumps to the new readings (the long-run level
  follows a lasting shift at its own pace); the scale history is kept (the noise did not
  change), so there is no second warm-up. With the ``last`` forecast a reading is also compared
  with the reading just before, so a jump that the series stays at is seen once, not on every
  later reading.

The evidence accumulation (several moderately odd readings in a row) and the alarm logic
(hysteresis, minimum duration, one alarm per event, cool-down) live in
:mod:`collector.models.anomaly`.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

DAY_SLOTS = 24
WEEK_SLOTS = 168
SEASON_WEIGHT = {"day": 0.1, "week": 0.2}
"""Weight of a new reading in its slot."""
SEASON_VISITS = {"day": 3, "week": 2}
"""Every slot must have been seen on this many distinct days/weeks before the profile is used."""
SEASON_GAIN = 0.1
"""A profile is used when it cuts the root-mean-square one-step error by this share (against
none): it has 24 or 168 free values that also fit noise."""
TRACK_EVERY = 4
"""Forecasts are compared on every 4th accepted reading: a quarter of the cost, same verdict."""
FIT_WEIGHT = 0.04
"""Weight of one comparison in a forecast's mean one-step error (about the last 100 readings)."""
FIT_MIN = 25
"""Comparisons (about 100 readings) a forecast must have before it can be chosen."""
SWITCH_GAIN = 0.1
"""Another predictor takes over when its mean one-step error is this share smaller."""
PROFILE_SWITCH_GAIN = 0.03
"""Another profile takes over when its score is this share smaller: a little hysteresis, on
a score that already remembers days."""
CHOICE_HOURS = TRACK_EVERY / FIT_WEIGHT
"""Hours (about four days) the profile choice's root-mean-square error remembers, whatever the
step: about 100 readings at hourly steps, as the predictor choice; 1,200 at 5-minute steps."""
ODD_CLIP = 5.0
"""A reading kept out of the level moves its profile slot by at most this many scales."""
TRIM = 0.1
"""Share of the long-run readings cut off at either end before their mean is taken."""
PREDICTORS = ("median", "last")
GAUSS_MAD = 1.4826
TAIL_Q, TAIL_Z = 0.99, 2.576
TAIL_RATE = 3e-4
"""A lone reading alarms above the level the series' own tail reaches once in ~3,300 readings."""
TAIL_PRIOR = (2.5, 100)
"""(tail index, weight in readings): until the history is long, assume a heavy tail."""
LOUD_SEEN, LOUD_CLAMP, LOUD_WEIGHT, LOUD_CLIP = 20, 3.0, 0.005, 3.0
"""Loudness by hour is used once every hour has this many readings; bounded to 1/3..3; each
normal reading weighs this much in its hour; |z| is clipped here so one outlier cannot make an
hour loud."""


@dataclass
class Profile:
    """Mean deviation from the long-run median per hour-of-day or hour-of-week slot."""

    slots: int = DAY_SLOTS
    mean: list[float] = field(default_factory=list)
    visits: list[int] = field(default_factory=list)
    """Distinct periods (days or weeks) each slot was seen in."""
    last_period: list[int] = field(default_factory=list)
    total: float = 0.0
    """Sum of ``mean``, so centring costs nothing per reading."""

    def __post_init__(self) -> None:
        if not self.mean:
            self.mean = [0.0] * self.slots
            self.visits = [0] * self.slots
            self.last_period = [-1] * self.slots

    def slot_of(self, hours: int) -> tuple[int, int]:
        """(slot, period number) of an hour count since the epoch: hour of day or of week, UTC."""
        if self.slots == DAY_SLOTS:
            return hours % DAY_SLOTS, hours // DAY_SLOTS
        # 1970-01-01 was a Thursday: shift so a week starts on Monday 00:00.
        hours += 3 * DAY_SLOTS
        return hours % WEEK_SLOTS, hours // WEEK_SLOTS

    def ready(self, kind: str) -> bool:
        return min(self.visits) >= SEASON_VISITS[kind]

    def offset(self, slot: int) -> float:
        """The slot's deviation, centred so the profile itself has no level."""
        return self.mean[slot] - self.total / self.slots

    def learn(self, slot: int, period: int, deviation: float, kind: str) -> None:
        old = self.mean[slot]
        if self.visits[slot] == 0:
            self.mean[slot] = deviation
        else:
            self.mean[slot] += SEASON_WEIGHT[kind] * (deviation - old)
        self.total += self.mean[slot] - old
        if self.last_period[slot] != period:
            self.last_period[slot] = period
            self.visits[slot] += 1
            if slot == 0:
                self.total = sum(self.mean)  # no float drift over a year of updates


@dataclass
class SortedWindow:
    """The last ``size`` values in arrival order and sorted: order statistics in O(log n)."""

    size: int = 1000
    order: deque[float] = field(default_factory=deque)
    ranked: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        if len(self.order) >= self.size:
            old = self.order.popleft()
            del self.ranked[bisect.bisect_left(self.ranked, old)]
        self.order.append(value)
        bisect.insort(self.ranked, value)

    def trimmed_mean(self, cut: float) -> float:
        """Mean of the values between the ``cut`` and ``1 - cut`` quantiles."""
        n = len(self.ranked)
        k = int(n * cut)
        mid = self.ranked[k : n - k] or self.ranked
        return sum(mid) / len(mid) if mid else 0.0

    def quantile(self, q: float) -> float:
        """Linear interpolation between order statistics (numpy's default)."""
        n = len(self.ranked)
        if n == 0:
            return 0.0
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return self.ranked[lo] + (self.ranked[hi] - self.ranked[lo]) * (pos - lo)

    def multiply(self, factor: float) -> None:
        """Scale every value by ``factor`` > 0 (order is unchanged)."""
        self.order = deque(v * factor for v in self.order)
        self.ranked = [v * factor for v in self.ranked]

    def __len__(self) -> int:
        return len(self.order)


@dataclass
class RobustState:
    """What the robust method remembers about one series (bounded by ``history``).

    Fields added after the first release default to None or a class-level value and are created
    on first use, so a checkpoint written by an older version still restores.
    """

    history: int = 1000
    level_window: int = 5
    season: str = "auto"
    recent: deque[tuple[float, int | None]] = field(default_factory=deque)
    """(value, hour) of the last ``level_window`` accepted readings: the local level."""
    tail: deque[tuple[float, int | None]] = field(default_factory=deque)
    """(value, hour) of the last ``level_window`` readings, flagged or not: the new level after
    a confirmed shift, and the reading just before for the ``last`` forecast."""
    long: SortedWindow = field(default_factory=SortedWindow)
    """Accepted raw readings: the long-run median the profiles are learnt against."""
    residuals: SortedWindow = field(default_factory=SortedWindow)
    """|residual| / loudness of the readings outside events: the scale and the tail."""
    day: Profile = field(default_factory=lambda: Profile(DAY_SLOTS))
    week: Profile = field(default_factory=lambda: Profile(WEEK_SLOTS))
    in_use: str = "none"
    """The profile in use: ``none``, ``day`` or ``week``."""
    predictor: str = "median"
    """The forecast in use: ``median`` of the recent accepted readings or the ``last`` one."""
    fits: dict[str, list[float]] | None = None
    """[mean |one-step error|, readings scored] of each ``predictor/profile`` pair (a running
    mean, then exponentially weighted over about the last 1 / FIT_WEIGHT readings)."""
    loud: list[float] | None = None
    """Exponentially weighted mean clipped |z| per hour of day (normal readings only)."""
    loud_seen: list[int] | None = None
    evidence: float = 0.0
    """Accumulated excess |z| of the current run of odd readings (see ``anomaly``)."""
    accepted: int = 0
    """Readings accepted so far (which of them the forecasts are compared on)."""
    odd: int = 0
    """Readings kept out of the level so far (which of them score the profile choice)."""
    choice: dict[str, list[float]] | None = None
    """[mean squared one-step error, readings scored] of each ``predictor/profile`` pair over
    accepted and kept-out readings alike, remembered for about ``CHOICE_HOURS`` hours: which
    profile is used."""
    odd_seen: list[list[float]] | None = None
    """Per hour-of-week slot: [week, deviation] of its kept-out readings this week and the
    week before (see ``_recurs``)."""
    per_hour: float | None = None
    """Readings per clock hour, as the series' own steps show (the choice memory's clock)."""
    clock: list[int] | None = None
    """[hour, readings seen in it] of the clock hour being counted."""

    @classmethod
    def new(cls, history: int, level_window: int, season: str) -> RobustState:
        return cls(
            history=history, level_window=level_window, season=season,
            recent=deque(maxlen=level_window), tail=deque(maxlen=level_window),
            long=SortedWindow(history), residuals=SortedWindow(history),
        )

    # -- scoring -----------------------------------------------------------------------------

    def seasonal(self, hour: int | None, kind: str | None = None) -> float:
        """The profile in use (or ``kind``) at this hour (0 without one)."""
        kind = self.in_use if kind is None else kind
        if hour is None or kind == "none":
            return 0.0
        profile = self.day if kind == "day" else self.week
        return profile.offset(profile.slot_of(hour)[0])

    def level(self, readings: deque[tuple[float, int | None]] | list[tuple[float, int | None]],
              kind: str | None = None) -> float:
        """Median of readings with the profile taken out (always the current profile, so
        switching profiles never leaves a stale level behind)."""
        return _median([v - self.seasonal(h, kind) for v, h in readings])

    def expected(self, predictor: str, kind: str | None = None) -> float:
        """The deseasonalised value the forecast expects next."""
        if predictor == "last":
            v, h = self.recent[-1]
            return v - self.seasonal(h, kind)
        return self.level(self.recent, kind)

    def residual(self, value: float, hour: int | None) -> tuple[float, float] | None:
        """(news, departure): how far the reading is from what was expected given everything
        up to the reading before, and how far from the accepted level; None before there is a
        level.

        They differ only with the ``last`` forecast after a reading that was kept out: that one
        was a spike (then this reading is close to the last accepted) or the start of a new
        level (then it is close to the one before). The *news* is what neither explains, so a
        jump the series stays at is news once, not on every later reading against a stale
        reference; the *departure* says whether the series is still away from where it was,
        which is what keeps an event open and what a minimum duration counts.
        """
        if not self.recent:
            return None
        base = value - self.seasonal(hour)
        departure = base - self.expected(self.predictor)
        news = departure
        if self.predictor == "last" and self.tail and self.tail[-1] != self.recent[-1]:
            v, h = self.tail[-1]
            r_prev = base - (v - self.seasonal(h))
            if abs(r_prev) < abs(departure):
                news = r_prev
        return news, departure

    def loudness(self, hour: int | None) -> float:
        """How much louder than usual the noise is at this hour of the day (1 without a clock or
        before every hour has been heard often enough)."""
        if hour is None or self.loud is None or self.loud_seen is None:
            return 1.0
        if min(self.loud_seen) < LOUD_SEEN:
            return 1.0
        mean = sum(self.loud) / DAY_SLOTS
        if mean <= 0:
            return 1.0
        return min(max(self.loud[hour % DAY_SLOTS] / mean, 1 / LOUD_CLAMP), LOUD_CLAMP)

    def scale(self, floor: float) -> float:
        mad = GAUSS_MAD * self.residuals.quantile(0.5)
        tail = self.residuals.quantile(TAIL_Q) / TAIL_Z
        return max(mad, tail, floor)

    def tail_level(self, rate: float = TAIL_RATE) -> float:
        """|residual| / loudness the series' own tail exceeds about once in ``1 / rate``
        readings: a power law through the 90th and 99th percentiles, extrapolated. Percentiles
        (not the largest values) so a few past anomalies do not move it."""
        n = len(self.residuals)
        q90 = self.residuals.quantile(0.90)
        q99 = self.residuals.quantile(0.99)
        if n < 100 or q90 <= 0 or q99 <= q90 * 1.05:
            return q99  # bounded noise (or too little history): the threshold floor decides
        alpha = math.log(10) / math.log(q99 / q90)
        prior, weight = TAIL_PRIOR
        alpha = (n * alpha + weight * prior) / (n + weight)
        return q99 * (0.01 / rate) ** (1 / alpha)

    # -- learning ----------------------------------------------------------------------------

    def remember(self, value: float, hour: int | None) -> None:
        """Every reading, flagged or not, goes to the tail a confirmed shift is taken from."""
        self.tail.append((value, hour))

    def learn(self, value: float, hour: int | None) -> None:
        """Fold an accepted reading into level, forecasts and profiles."""
        self.accepted += 1
        self._tick(hour)
        if self.recent and self.accepted % TRACK_EVERY == 0:
            self._track_models(value, hour)
        self.recent.append((value, hour))
        if hour is not None and self.season != "none" and len(self.long) >= 2:
            self._learn_profiles(value, hour, math.inf)
        self.long.add(value)

    def note_odd(self, value: float, hour: int | None) -> None:
        """A reading kept out of the level still says what the series does at this hour.

        A daily step (a machine starting at 08:00) is kept out of the level every morning and
        adopted as a shift after ``reset_after`` readings, so if only accepted readings taught
        the profiles its slot would never learn it, and a forecast without a profile would
        never be charged for missing it: the detector would alarm at that hour every day. So
        the reading scores the profile choice (not the predictor choice, which, like the
        scale, stays with the accepted readings) and moves its slot, by at most ``ODD_CLIP``
        scales: a one-off fault moves it by a fraction of the slot weight, a step repeated day
        after day teaches it in a few days.
        """
        self._tick(hour)
        if not self.recent:
            return
        self.odd += 1
        weight = self._choice_weight(odd=True)
        if self.odd % TRACK_EVERY == 0 and weight > 0:
            self._score_choice(self._errors(value, hour, self._kinds(hour)), weight)
        if hour is not None and self.season != "none" and len(self.long) >= 2:
            self._learn_profiles(value, hour, ODD_CLIP * self.scale(0.0))

    def _learn_profiles(self, value: float, hour: int, clip: float) -> None:
        """Move the reading's slots towards its deviation from the long-run level, by at most
        ``clip`` (infinite for an accepted reading).

        A kept-out reading (finite ``clip``) teaches the hour-of-week slot only when that slot
        had a similar kept-out reading a week before: a weekly pattern repeats, a fault does
        not. Without that, a Saturday fault (which a weekday-shaped day profile would pass)
        became the slot's normal and alarmed again 7 and 14 days later.
        """
        deviation = value - self._long_level()
        for kind, profile in (("day", self.day), ("week", self.week)):
            if self.season not in ("auto", kind):
                continue
            slot, period = profile.slot_of(hour)
            odd = clip < math.inf
            if kind == "week" and odd and not self._recurs(slot, period, deviation, clip):
                continue
            cur = profile.mean[slot] if profile.visits[slot] else deviation
            profile.learn(slot, period, cur + min(max(deviation - cur, -clip), clip), kind)

    def _recurs(self, slot: int, period: int, deviation: float, clip: float) -> bool:
        """Note a kept-out reading in its hour-of-week slot; whether the slot had one within
        ``clip`` of it in the week before."""
        if self.odd_seen is None:
            self.odd_seen = [[-9, 0.0, -9, 0.0] for _ in range(WEEK_SLOTS)]
        seen = self.odd_seen[slot]
        if seen[0] != period:
            seen[2], seen[3] = seen[0], seen[1]
            seen[0], seen[1] = period, deviation
        else:
            seen[1] += 0.2 * (deviation - seen[1])
        return seen[2] == period - 1 and abs(deviation - seen[3]) <= clip

    def _long_level(self) -> float:
        """The level the profiles learn against: a trimmed mean, not the median (see
        ``TRIM``). Recomputed on every reading: caching it for a few readings changed which
        air-quality windows were found (7 of 360 fewer over five seeds)."""
        return self.long.trimmed_mean(TRIM)

    def note_normal(self, residual: float, hour: int | None, z: float, gate: float) -> None:
        """A reading outside any event: its size goes to the scale history, and (if it is not
        itself odd) to its hour's loudness."""
        loud = self.loudness(hour)
        self.residuals.add(abs(residual) / loud)
        if hour is None or abs(z) > gate:
            return
        if self.loud is None or self.loud_seen is None:
            self.loud, self.loud_seen = [0.0] * DAY_SLOTS, [0] * DAY_SLOTS
        slot = hour % DAY_SLOTS
        self.loud_seen[slot] += 1
        w = max(1.0 / self.loud_seen[slot], LOUD_WEIGHT)
        self.loud[slot] += w * (min(abs(z), LOUD_CLIP) * loud - self.loud[slot])

    def adopt_shift(self, streak: int) -> None:
        """A shift confirmed by ``streak`` odd readings in a row: the new level is the normal.

        Only the recent level moves. The long-run level the profiles learn against does not
        (it follows a lasting shift as its own readings come in): a step that comes back at
        the same hour every day (a machine starting) is adopted as a shift every morning, and
        moving the long-run level with it left that hour's slot nothing to learn.
        """
        new = list(self.tail)[-min(streak, len(self.tail)):]
        if not new or not self.recent:
            return
        self.recent.clear()
        self.recent.extend(new)

    def _kinds(self, hour: int | None) -> list[str]:
        """The profiles that can be used at this reading: none, and those ready."""
        kinds = ["none"]
        if hour is not None:
            kinds += [k for k, p in (("day", self.day), ("week", self.week))
                      if self.season in ("auto", k) and p.ready(k)]
        return kinds

    def _track_models(self, value: float, hour: int | None) -> None:
        """Score every (forecast, profile) pair on this reading's one-step error; switch to the
        best when it is clearly better than the one in use.

        The profile is chosen first, on ``choice`` (see ``_profile_score``); the predictor
        within it, and the rescaling of the history on a switch, on the mean absolute error
        of the accepted readings (``fits``), which follows a smooth series' changes of
        character within a day."""
        if self.fits is None:
            self.fits = {}
        kinds = self._kinds(hour)
        errors = self._errors(value, hour, kinds)
        for name, err in errors.items():
            _fold(self.fits, name, abs(err), FIT_WEIGHT)
        self._score_choice(errors, self._choice_weight(odd=False))
        current = f"{self.predictor}/{self.in_use}"
        # A newcomer (a profile just ready) must have been scored on FIT_MIN readings, so it
        # cannot win on its first few lucky ones.
        ready = [n for n, (_, count) in self.fits.items()
                 if n.split("/")[1] in kinds and count >= FIT_MIN]
        if current not in self.fits or not ready:
            return
        kind = self.in_use
        best_kind = min({n.split("/")[1] for n in ready}, key=self._profile_score)
        if kind not in kinds or self._profile_score(best_kind) < self._profile_score(kind) * (
            1 - PROFILE_SWITCH_GAIN
        ):
            kind = best_kind
        best = min((n for n in ready if n.endswith(f"/{kind}")), key=lambda n: self.fits[n][0])  # type: ignore[index]
        now = self.fits[current][0]
        if best != current and now > 0 and (
            kind != self.in_use or self.fits[best][0] < now * (1 - SWITCH_GAIN)
        ):
            # Residuals measured under the old forecast are as much larger as its errors were:
            # rescale them, so the scale fits the new one at once, without a second warm-up.
            self.residuals.multiply(self.fits[best][0] / now)
            self.predictor, self.in_use = best.split("/")

    def _errors(self, value: float, hour: int | None, kinds: list[str]) -> dict[str, float]:
        """Each ``predictor/profile`` pair's one-step error on this reading."""
        errors = {}
        for kind in kinds:
            base = value - self.seasonal(hour, kind)
            for predictor in PREDICTORS:
                errors[f"{predictor}/{kind}"] = base - self.expected(predictor, kind)
        return errors

    def _choice_weight(self, odd: bool) -> float:
        """Weight of one reading in ``choice``: about ``CHOICE_HOURS`` hours of memory."""
        per_hour = max(1.0, self.per_hour or 1.0)
        weight = FIT_WEIGHT / per_hour
        if odd:
            # At hourly steps a kept-out reading is mostly a real event, not a daily step in
            # the making: counting it there cost air-quality windows (146 -> 125 of 360).
            weight *= 1 - 1 / per_hour
        return weight

    def _score_choice(self, errors: dict[str, float], weight: float) -> None:
        """Fold this reading's squared one-step errors into each pair's ``choice`` score."""
        if self.choice is None:
            self.choice = {}
        for name, err in errors.items():
            _fold(self.choice, name, err**2, weight)

    def _profile_score(self, kind: str) -> float:
        """The root-mean-square one-step error of the profile's best forecast, over accepted
        and kept-out readings alike, remembered for about ``CHOICE_HOURS`` hours whatever the
        step. Kept-out readings count, so going without a profile is charged for the daily
        step it misses; squared, so a few large misses weigh more than many small
        differences; hours, not readings, so at 5-minute steps the choice does not flip with
        the time of day (about a hundred readings is eight hours there, four days at hourly
        steps). A profile has 24 or 168 free values that also fit noise: it must earn its
        keep by cutting the error by ``SEASON_GAIN`` more than going without."""
        choice = self.choice or {}
        errs = [fit[0] for name, fit in choice.items() if name.endswith(f"/{kind}")]
        if not errs:
            return math.inf
        err = math.sqrt(min(errs))
        return err if kind == "none" else err / (1 - SEASON_GAIN)

    def _tick(self, hour: int | None) -> None:
        """Count the readings in each clock hour: how many readings an hour of memory is."""
        if hour is None:
            return
        if self.clock is None:
            self.clock = [hour, 0]
        if hour != self.clock[0]:
            if hour == self.clock[0] + 1:  # a whole hour was seen (not a gap or a restart)
                n = float(self.clock[1])
                self.per_hour = n if self.per_hour is None else self.per_hour + 0.1 * (
                    n - self.per_hour)
            self.clock = [hour, 0]
        self.clock[1] += 1


def _fold(scores: dict[str, list[float]], name: str, value: float, weight: float) -> None:
    """An exponentially weighted mean (``[mean, count]``) that is a plain mean until it has
    ``1 / weight`` values, so a young score is not pulled towards 0."""
    fit = scores.setdefault(name, [0.0, 0])
    fit[1] += 1
    fit[0] += max(1.0 / fit[1], weight) * (value - fit[0])


def hour_of(ts: datetime | None) -> int | None:
    """Hours since the epoch (UTC), the clock the profiles' slots are cut from."""
    return None if ts is None else int(ts.timestamp() // 3600)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
