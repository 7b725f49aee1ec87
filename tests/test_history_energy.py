"""Energy arithmetic against hand-computed cases; all times are passed in."""

from __future__ import annotations

import datetime as dt
from typing import Final

import pytest

from edge_proxy.history.energy import (
    HostPower,
    by_week,
    energy_by_day,
    idle_gpu_w,
    merge_spans,
    split_busy,
)
from edge_proxy.history.records import BusyInterval, GpuSample, PowerInterval

# Sunday 2026-12-06 00:00 UTC: the next day starts a new ISO week
DAY: Final = dt.datetime(2026, 12, 6, tzinfo=dt.UTC).timestamp()
H: Final = 3600.0
HOST: Final = HostPower(idle_w=40.0, sleep_w=2.0)
FAR: Final = DAY + 7 * 86400


def interval(state: str, start_h: float, end_h: float, node: str = "n") -> PowerInterval:
    return PowerInterval(node, state, DAY + start_h * H, DAY + end_h * H)  # type: ignore[arg-type]


def busy(gpu: str, start_h: float, end_h: float, node: str = "n") -> BusyInterval:
    return BusyInterval(node, gpu, DAY + start_h * H, DAY + end_h * H)


def sample(at_h: float, watts: float, gpu: str = "G1", node: str = "n") -> GpuSample:
    return GpuSample(t=DAY + at_h * H, node=node, gpu_uuid=gpu, power_w=watts)


INTERVALS: Final = [
    interval("awake", 0, 2),      # GPU samples 10 and 20 W: 15 W idle
    interval("asleep", 2, 12),
    interval("busy", 12, 13),     # one sample: 200 W
    interval("awake", 23, 25),    # no sample: priced at the idle 15 W; crosses midnight
    interval("asleep", 0, 5, node="other"),
]
SAMPLES: Final = [sample(0.5, 10), sample(1.5, 20), sample(12.5, 200), sample(3, 999, node="x")]


def test_a_day_of_sleeping_and_serving_by_hand() -> None:
    first, second = energy_by_day("n", INTERVALS, SAMPLES, HOST, since=DAY - 86400, until=FAR)
    assert first.period == "2026-12-06" and second.period == "2026-12-07"
    # used: awake (40+15) W x 2 h = 0.11 kWh; asleep 2 W x 10 h = 0.02; busy (40+200) W x 1 h
    # = 0.24; awake 23:00-24:00 at (40+15) W = 0.055
    assert first.used_kwh == pytest.approx(0.11 + 0.02 + 0.24 + 0.055)
    # saved: (40 + 15 - 2) W x 10 h asleep
    assert first.saved_kwh == pytest.approx(0.53)
    assert (first.asleep_s, first.awake_s, first.busy_s) == (10 * H, 3 * H, 1 * H)
    assert first.estimated_s == 1 * H
    assert second.used_kwh == pytest.approx(0.055) and second.saved_kwh == 0
    assert first.money(0.30) == pytest.approx((0.425 * 0.30, 0.53 * 0.30))
    assert first.money(None) is None


def test_gpus_add_up_by_their_own_means() -> None:
    samples = [sample(0.5, 10), sample(1.5, 20), sample(1.0, 30, gpu="G2")]
    assert idle_gpu_w(INTERVALS, samples) == pytest.approx(15 + 30)
    (row,) = energy_by_day("n", INTERVALS[:2], samples, HOST, since=DAY, until=FAR)
    assert row.used_kwh == pytest.approx((40 + 45) * 2 / 1000 + 2 * 10 / 1000)
    assert row.saved_kwh == pytest.approx((40 + 45 - 2) * 10 / 1000)


def test_without_samples_savings_count_the_host_only() -> None:
    (row,) = energy_by_day("other", INTERVALS, SAMPLES, HOST, since=DAY - H, until=FAR)
    assert row.saved_kwh == pytest.approx((40 - 2) * 5 / 1000)
    assert row.used_kwh == pytest.approx(2 * 5 / 1000)


def test_the_window_clips_intervals() -> None:
    (row,) = energy_by_day("n", INTERVALS, SAMPLES, HOST, since=DAY + 1 * H, until=DAY + 4 * H)
    # 1 h of the first awake interval (its GPU mean is still the whole interval's) and 2 h asleep
    assert row.used_kwh == pytest.approx(55 * 1 / 1000 + 2 * 2 / 1000)
    assert row.saved_kwh == pytest.approx(53 * 2 / 1000)
    assert row.asleep_s == 2 * H


def test_days_follow_the_time_zone_given() -> None:
    plus_one = dt.timezone(dt.timedelta(hours=1))
    rows = energy_by_day("n", INTERVALS, SAMPLES, HOST, since=DAY - 86400, until=FAR,
                         tz=plus_one)
    # 23:00-01:00 UTC is 00:00-02:00 at UTC+1: one local day, the second one
    assert [r.period for r in rows] == ["2026-12-06", "2026-12-07"]
    assert rows[1].awake_s == 2 * H and rows[0].awake_s == 2 * H  # 00:00-02:00 UTC


def test_weeks_sum_their_days() -> None:
    days = energy_by_day("n", INTERVALS, SAMPLES, HOST, since=DAY - 86400, until=FAR)
    w49, w50 = by_week(days)
    assert (w49.period, w50.period) == ("2026-W49", "2026-W50")
    assert w49.used_kwh == pytest.approx(days[0].used_kwh)
    assert w50.used_kwh == pytest.approx(0.055)
    two_days_one_week = [*days[1:], *energy_by_day(
        "n", [interval("asleep", 48, 50)], [], HOST, since=DAY, until=FAR)]
    (week,) = by_week(two_days_one_week)
    assert week.asleep_s == 2 * H and week.awake_s == 1 * H


def test_busy_spans_split_awake_time_and_price_each_part_by_its_own_samples() -> None:
    intervals = [interval("awake", 0, 4), interval("asleep", 4, 14)]
    # G1 busy 1:00-2:00, G2 1:30-2:30: the node is busy 1:00-2:30 (1.5 h), idle 2.5 h
    spans = [busy("G1", 1, 2), busy("G2", 1.5, 2.5),
             busy("G1", 5, 6),  # asleep by the proxy's account: stays asleep
             busy("G1", 0, 4, node="other")]
    # idle samples 10 and 20 W on G1 (15 W); busy 200 W on G1 and 100 W on G2 (300 W)
    samples = [sample(0.5, 10), sample(3.0, 20), sample(1.25, 200), sample(2.0, 100, gpu="G2")]
    (row,) = energy_by_day("n", intervals, samples, HOST, since=DAY, until=FAR, busy=spans)
    assert (row.busy_s, row.awake_s, row.asleep_s) == (1.5 * H, 2.5 * H, 10 * H)
    # idle (40 + 15) W x 2.5 h + busy (40 + 300) W x 1.5 h + asleep 2 W x 10 h
    assert row.used_kwh == pytest.approx((137.5 + 510 + 20) / 1000)
    # sleeping saved the awake-idle draw, busy samples left out: (40 + 15 - 2) W x 10 h
    assert row.saved_kwh == pytest.approx(0.53)
    assert row.estimated_s == 0
    # without the spans the same samples make a dearer idle draw (busy ones counted in)
    (plain,) = energy_by_day("n", intervals, samples, HOST, since=DAY, until=FAR)
    assert plain.busy_s == 0 and plain.saved_kwh > row.saved_kwh
    assert idle_gpu_w(intervals, samples, spans[:3]) == pytest.approx(15)


def test_a_busy_span_across_midnight_splits_between_the_days() -> None:
    intervals = [interval("awake", 22, 26)]
    spans = [busy("G1", 23.5, 24.5)]
    samples = [sample(22.5, 30)]  # none while busy: the busy part takes the interval's mean
    first, second = energy_by_day("n", intervals, samples, HOST, since=DAY, until=FAR,
                                  busy=spans)
    assert (first.awake_s, first.busy_s) == (1.5 * H, 0.5 * H)
    assert (second.awake_s, second.busy_s) == (1.5 * H, 0.5 * H)
    assert second.used_kwh == pytest.approx((40 + 30) * 2 / 1000)
    (week,) = by_week([first, second])[1:]  # Monday starts week 50
    assert week.busy_s == 0.5 * H


def test_the_window_clips_busy_time() -> None:
    spans = [busy("G1", 0.5, 1.5)]
    (row,) = energy_by_day("n", INTERVALS[:1], SAMPLES, HOST, since=DAY + 1 * H,
                           until=DAY + 2 * H, busy=spans)
    assert (row.busy_s, row.awake_s) == (0.5 * H, 0.5 * H)


def test_spans_merge_and_split() -> None:
    assert merge_spans([(3, 4), (1, 2), (1.5, 2.5), (5, 5)]) == [(1, 2.5), (3, 4)]
    assert split_busy(0, 10, [(1, 2.5), (3, 4), (9, 12)]) == (
        [(1, 2.5), (3, 4), (9, 10)], [(0, 1), (2.5, 3), (4, 9)])
    assert split_busy(0, 1, []) == ([], [(0, 1)])
