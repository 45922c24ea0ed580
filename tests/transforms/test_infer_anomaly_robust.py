"""The robust detector's behaviour on the shapes real sensor series have (issue 18).

Each test is one thing a reliability engineer leaving the detector running for a year would
check: heavy-tailed noise does not cry wolf, a clear spike still alarms, a jump a smooth series
stays at alarms once, noisy busy hours are not anomalies, and state from a checkpoint (also one
written before these fields existed) keeps working.
"""

from __future__ import annotations

import datetime as dt
import math
import random

from collector.models.anomaly import DetectorSettings, StreamingDetector, Verdict
from collector.runtime.statecodec import decode, encode

START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def _run(values: list[float], step_minutes: int = 5, **settings: object
         ) -> tuple[StreamingDetector, list[Verdict]]:
    det = StreamingDetector(DetectorSettings(**{"method": "robust", "hysteresis": 0.5,
                                                "cooldown": 12, **settings}))  # type: ignore[arg-type]
    step = dt.timedelta(minutes=step_minutes)
    return det, [det.observe("s", v, START + step * i) for i, v in enumerate(values)]


def _alarms(verdicts: list[Verdict]) -> list[int]:
    return [i for i, v in enumerate(verdicts) if v.alarm]


def _student_t3(rng: random.Random) -> float:
    chi2 = sum(rng.gauss(0, 1) ** 2 for _ in range(3))
    return rng.gauss(0, 1) / math.sqrt(chi2 / 3)


def test_heavy_tailed_noise_does_not_cry_wolf() -> None:
    rng = random.Random(3)
    values = [50.0 + _student_t3(rng) for _ in range(6000)]
    _, robust = _run(values)
    zscore = StreamingDetector(DetectorSettings(method="zscore")).score(
        ["s"] * len(values), values
    )
    # Student-t noise (3 d.o.f.) has readings at 10+ sd every few thousand: the old default
    # alarms on dozens of them, robust learns the series' tail and alarms on very few.
    assert len(_alarms(zscore)) > 30
    assert len(_alarms(robust)) <= 3


def test_a_clear_spike_in_gaussian_noise_still_alarms() -> None:
    rng = random.Random(5)
    values = [20.0 + rng.gauss(0, 1) for _ in range(3000)]
    values[2500] += 7.0  # 7 sd: beyond what Gaussian noise does in a lifetime of readings
    _, verdicts = _run(values)
    assert 2500 in _alarms(verdicts)
    assert len(_alarms(verdicts)) <= 2


def test_a_burst_is_one_event_for_its_duration() -> None:
    rng = random.Random(7)
    values = [20.0 + rng.gauss(0, 1) for _ in range(2000)]
    for i in range(1500, 1512):
        values[i] += 4.5  # no single reading is beyond a Gaussian's tail, but 12 in a row are
    _, verdicts = _run(values)
    alarms = _alarms(verdicts)
    assert [a for a in alarms if a >= 1490] == [alarms[-1]]
    assert 1500 <= alarms[-1] <= 1503  # the evidence adds up within a few readings
    event = verdicts[alarms[-1]].event_id
    assert sum(v.event_id == event for v in verdicts[1500:1512]) >= 8


def test_a_smooth_series_that_jumps_and_stays_alarms_once() -> None:
    # A smooth signal (one-step changes small next to its range): the detector forecasts from
    # the last reading. A jump it stays at is news once; it must not alarm again on every later
    # reading against the old level, and the new level becomes the normal.
    values = [50.0 + 10 * math.sin(i / 40) + 0.2 * math.sin(i * 1.7) for i in range(3000)]
    for i in range(2000, 3000):
        values[i] += 15.0
    det, verdicts = _run(values, step_minutes=60, season="none")
    assert det.series["s"].robust is not None
    assert det.series["s"].robust.predictor == "last"
    assert _alarms(verdicts) == [2000]
    assert all(v.prediction == 0.0 for v in verdicts[2020:])


def test_noise_that_grows_with_load_is_not_an_anomaly() -> None:
    rng = random.Random(11)
    values = []
    for i in range(12 * 24 * 21):  # three weeks at 5 minutes
        hour = (i // 12) % 24
        loud = 4.0 if 12 <= hour < 18 else 1.0  # the afternoon shift: four times the noise
        values.append(30.0 + loud * rng.gauss(0, 1))
    night = 12 * 24 * 20 + 12 * 3  # the last day, 03:00
    values[night] += 6.0  # 6 sd at night, where the noise is quiet; well inside afternoon noise
    det, verdicts = _run(values)
    state = det.series["s"].robust
    assert state is not None
    assert state.loudness(night // 12) < 0.7 < 1.5 < state.loudness(night // 12 + 12)
    late = [a for a in _alarms(verdicts) if a >= 12 * 24 * 7]
    assert late == [night]


def test_state_restores_from_a_checkpoint_written_before_the_new_fields() -> None:
    rng = random.Random(2)
    values = [10.0 + rng.gauss(0, 1) for _ in range(400)]
    det, _ = _run(values[:300])
    blobs: list[bytes] = []
    tree = encode(det.series, blobs)
    restored = decode(tree, blobs)
    old = decode(encode(det.series, blobs), blobs)
    for fields in (vars(old["s"].robust),):
        for name in ("fits", "loud", "loud_seen", "evidence"):
            fields.pop(name)  # as a checkpoint of the first release has them: absent
    for series in (restored, old):
        again = StreamingDetector(det.settings)
        again.series = series
        step = dt.timedelta(minutes=5)
        out = [again.observe("s", v, START + step * (300 + i)) for i, v in enumerate(values[300:])]
        assert all(v.prediction is not None for v in out)


def test_memory_per_series_is_bounded() -> None:
    rng = random.Random(4)
    values = [10.0 + rng.gauss(0, 1) + (5.0 if i % 997 == 0 else 0.0) for i in range(5000)]
    det, _ = _run(values, history=200, level_window=5)
    r = det.series["s"].robust
    assert r is not None
    assert len(r.residuals) <= 200 and len(r.long) <= 200
    assert len(r.recent) <= 5 and len(r.tail) <= 5
    assert r.fits is not None and len(r.fits) <= 6
    assert r.loud is not None and len(r.loud) == 24


def _device_run(incidents: bool) -> tuple[StreamingDetector, dict[tuple[str, ...], list[Verdict]]]:
    """Three sensors on station a, one on station b; at reading 2000 three of a's and b's go
    odd in the same hour (a's, one of them an hour later), at 2600 one of a's alone."""
    rng = random.Random(9)
    keys = [("a", "src", "co"), ("a", "src", "no2"), ("a", "src", "o3"), ("b", "src", "co")]
    det = StreamingDetector(DetectorSettings(method="robust", hysteresis=0.5, cooldown=12,
                                             incidents=incidents))
    out: dict[tuple[str, ...], list[Verdict]] = {k: [] for k in keys}
    step = dt.timedelta(hours=1)
    for i in range(3000):
        for j, key in enumerate(keys):
            v = 10.0 + rng.gauss(0, 1)
            if (i == 2000 and j != 1) or (i == 2001 and j == 1) or (i == 2600 and j == 2):
                v += 9.0
            out[key].append(det.observe(key, v, START + step * i))
    return det, out


def test_sensors_of_one_device_going_odd_together_raise_one_alarm() -> None:
    det, out = _device_run(incidents=True)
    station = [k for k in out if k[0] == "a"]
    first = [i for k in station for i in _alarms(out[k]) if 1990 <= i <= 2010]
    assert len(first) == 1  # one notification for what happened to station a at 2000
    ids = {out[k][i].event_id for k in station for i in (2000, 2001) if out[k][i].prediction}
    assert len(ids) == 1  # every series' event carries the incident's id
    assert all(out[k][2000 if k[2] != "no2" else 2001].prediction == 1.0 for k in station)
    assert 2000 in _alarms(out[("b", "src", "co")])  # another device is another incident
    assert 2600 in _alarms(out[("a", "src", "o3")])  # a later lone event alarms again
    assert det.incidents is not None and len(det.incidents) == 2  # bounded: one per device

    _, apart = _device_run(incidents=False)
    assert len([i for k in station for i in _alarms(apart[k]) if 1990 <= i <= 2010]) == 3


def test_incidents_restore_from_a_checkpoint_written_before_they_existed() -> None:
    det, _ = _device_run(incidents=True)
    blobs: list[bytes] = []
    state = decode(encode({"series": det.series}, blobs), blobs)
    again = StreamingDetector(det.settings)
    again.series = state["series"]
    for events in (s.events for s in again.series.values()):
        vars(events).pop("last_ts", None)  # absent, as in a checkpoint of the first release
    assert again.incidents is None
    key = ("a", "src", "co")
    verdict = again.observe(key, 10.0, START + dt.timedelta(hours=3000))
    assert verdict.prediction is not None and again.incidents is not None
