"""The ``robust`` method of the built-in detector: for real sensor series, with no training.

Real series are not Gaussian around a flat mean: heavy tails, daily and weekly cycles, level
shifts that become the new normal, slow drifts, noise that changes with load. Per series, the
method keeps (all bounded, all plain values the checkpoint codec stores):

- **Seasonal profiles learned online**: the typical deviation of each hour of the day (24 slots)
  and each hour of the week (168 slots) from the series' long-run median, each slot an
  exponentially weighted mean over the last days/weeks. A profile is used only where the data
  has it: once every slot has been seen a few times and the profile explains at least
  ``SEASON_GAIN`` of the deviations (the weekly one must also beat the daily one). A flat signal
  never uses one.
- **A robust local level**: the median of the last ``level_window`` accepted readings, after
  the profile is taken out. A median follows a drift and ignores a lone spike.
- **A robust, tail-aware scale** over a longer history (the last ``history`` accepted residuals):
  the larger of ``1.4826 * median |residual|`` (the MAD: Gaussian sigma, immune to outliers) and
  the 99th percentile of ``|residual|`` / 2.576 (heavy-tailed noise widens the scale instead of
  crying wolf). ``score`` is ``|residual| / scale``.
- **Adaptation after a confirmed shift**: a flagged reading does not enter the statistics, but
  after ``reset_after`` flags in a row the level jumps to the median of those readings and the
  long-run median moves with it; the scale history is kept (the noise did not change), so
  there is no second warm-up.

The alarm logic (hysteresis, minimum duration, one alarm per event, cool-down) is shared with
the other methods and lives in :mod:`collector.models.anomaly`.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

DAY_SLOTS = 24
WEEK_SLOTS = 168
SEASON_WEIGHT = {"day": 0.1, "week": 0.2}
"""Weight of a new reading in its slot: about the last 10 days / 5 weeks count."""
SEASON_VISITS = {"day": 3, "week": 2}
"""Every slot must have been seen on this many distinct days/weeks before the profile is used."""
SEASON_GAIN = 0.2
"""A profile is used when it cuts the mean deviation from the long-run median by this share."""
FIT_WEIGHT = 0.01
GAUSS_MAD = 1.4826
TAIL_Q, TAIL_Z = 0.99, 2.576


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
    fit: float = 0.0
    """Exponentially weighted mean |deviation - profile|: how well the profile explains it."""

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
        centred = self.offset(slot)
        self.fit += FIT_WEIGHT * (abs(deviation - centred) - self.fit)
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

    def quantile(self, q: float) -> float:
        """Linear interpolation between order statistics (numpy's default)."""
        n = len(self.ranked)
        if n == 0:
            return 0.0
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return self.ranked[lo] + (self.ranked[hi] - self.ranked[lo]) * (pos - lo)

    def shift(self, delta: float) -> None:
        """Move every value by ``delta`` (order is unchanged)."""
        self.order = deque(v + delta for v in self.order)
        self.ranked = [v + delta for v in self.ranked]

    def multiply(self, factor: float) -> None:
        """Scale every value by ``factor`` > 0 (order is unchanged)."""
        self.order = deque(v * factor for v in self.order)
        self.ranked = [v * factor for v in self.ranked]

    def __len__(self) -> int:
        return len(self.order)


@dataclass
class RobustState:
    """What the robust method remembers about one series (bounded by ``history``)."""

    history: int = 1000
    level_window: int = 5
    season: str = "auto"
    recent: deque[tuple[float, int | None]] = field(default_factory=deque)
    """(value, hour) of the last ``level_window`` accepted readings: the local level."""
    tail: deque[tuple[float, int | None]] = field(default_factory=deque)
    """(value, hour) of the last ``level_window`` readings, flagged or not: the new level after
    a confirmed shift."""
    long: SortedWindow = field(default_factory=SortedWindow)
    """Accepted raw readings: the long-run median the profiles are learnt against."""
    residuals: SortedWindow = field(default_factory=SortedWindow)
    """|residual| of accepted readings: the scale."""
    day: Profile = field(default_factory=lambda: Profile(DAY_SLOTS))
    week: Profile = field(default_factory=lambda: Profile(WEEK_SLOTS))
    flat_fit: float = 0.0
    """Exponentially weighted mean |deviation from the long-run median|, no profile."""
    in_use: str = "none"

    @classmethod
    def new(cls, history: int, level_window: int, season: str) -> RobustState:
        return cls(
            history=history, level_window=level_window, season=season,
            recent=deque(maxlen=level_window), tail=deque(maxlen=level_window),
            long=SortedWindow(history), residuals=SortedWindow(history),
        )

    # -- scoring -----------------------------------------------------------------------------

    def seasonal(self, hour: int | None) -> float:
        """The profile in use at this hour (0 without one)."""
        if hour is None or self.in_use == "none":
            return 0.0
        profile = self.day if self.in_use == "day" else self.week
        return profile.offset(profile.slot_of(hour)[0])

    def level(self, readings: deque[tuple[float, int | None]] | list[tuple[float, int | None]]
              ) -> float:
        """Median of readings with the profile in use taken out (always the current profile, so
        switching profiles never leaves a stale level behind)."""
        return _median([v - self.seasonal(h) for v, h in readings])

    def residual(self, value: float, hour: int | None) -> float | None:
        """Deviation from the expected value, or None before there is a level."""
        if not self.recent:
            return None
        return value - self.seasonal(hour) - self.level(self.recent)

    def scale(self, floor: float) -> float:
        mad = GAUSS_MAD * self.residuals.quantile(0.5)
        tail = self.residuals.quantile(TAIL_Q) / TAIL_Z
        return max(mad, tail, floor)

    # -- learning ----------------------------------------------------------------------------

    def remember(self, value: float, hour: int | None) -> None:
        """Every reading, flagged or not, goes to the tail a confirmed shift is taken from."""
        self.tail.append((value, hour))

    def learn(self, value: float, hour: int | None, residual: float | None) -> None:
        """Fold an accepted reading into level, scale and profiles."""
        self.recent.append((value, hour))
        if residual is not None:
            self.residuals.add(abs(residual))
        if hour is not None and self.season != "none" and len(self.long) >= 2:
            deviation = value - self.long.quantile(0.5)
            self.flat_fit += FIT_WEIGHT * (abs(deviation) - self.flat_fit)
            for kind, profile in (("day", self.day), ("week", self.week)):
                if self.season in ("auto", kind):
                    slot, period = profile.slot_of(hour)
                    profile.learn(slot, period, deviation, kind)
            self._choose_profile()
        self.long.add(value)

    def adopt_shift(self, streak: int) -> None:
        """A shift confirmed by ``streak`` flags in a row: the new level is the normal now."""
        new = list(self.tail)[-min(streak, len(self.tail)):]
        if not new or not self.recent:
            return
        delta = self.level(new) - self.level(self.recent)
        self.recent.clear()
        self.recent.extend(new)
        self.long.shift(delta)

    def _choose_profile(self) -> None:
        best, best_fit = "none", self.flat_fit * (1 - SEASON_GAIN)
        for kind, profile in (("day", self.day), ("week", self.week)):
            if self.season in ("auto", kind) and profile.ready(kind) and profile.fit < best_fit:
                best, best_fit = kind, profile.fit * (1 - SEASON_GAIN)
        if best != self.in_use:
            # Residuals measured under the old model are as much larger as its fit was worse:
            # rescale them, so the scale fits the new model at once, without a second warm-up.
            fits = {"none": self.flat_fit, "day": self.day.fit, "week": self.week.fit}
            if fits[self.in_use] > 0 and fits[best] > 0:
                self.residuals.multiply(fits[best] / fits[self.in_use])
            self.in_use = best


def hour_of(ts: datetime | None) -> int | None:
    """Hours since the epoch (UTC), the clock the profiles' slots are cut from."""
    return None if ts is None else int(ts.timestamp() // 3600)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2

