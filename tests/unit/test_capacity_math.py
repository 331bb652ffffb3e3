"""The arithmetic of ``kvmfleet capacity`` on numbers worked out by hand: slopes, bucket rates, limits,
spread and placement."""

from __future__ import annotations

import pytest

from kvmfleet.audit.capacity import HostCapacity, bucket_rates, parse_limits, place, slope_per_day, spread
from kvmfleet.querypack import PackError

DAY = 86400.0


def test_slope_is_per_day_and_needs_three_points() -> None:
    assert slope_per_day([(0.0, 10.0), (3600.0, 11.0), (7200.0, 12.0)]) == pytest.approx(24.0)
    assert slope_per_day([(0.0, 5.0), (DAY, 5.0), (2 * DAY, 5.0)]) == 0.0
    # least squares, not end points: (0,0) (1,3) (2,3) -> slope 1.5 per unit
    assert slope_per_day([(0.0, 0.0), (DAY, 3.0), (2 * DAY, 3.0)]) == pytest.approx(1.5)
    assert slope_per_day([(0.0, 1.0), (60.0, 2.0)]) is None
    assert slope_per_day([(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)]) is None  # one instant: no slope


def test_bucket_rates_leave_out_the_filling_bucket_and_drops() -> None:
    rows = [(0.0, 0.0), (60.0, 600.0), (120.0, 1200.0), (180.0, 100.0), (240.0, 700.0), (300.0, 750.0)]
    points, inc, secs, reset = bucket_rates(rows)
    # pairs kept: 0-60, 60-120, 180-240 (120-180 went down); 240-300 is the still filling bucket
    assert points == [(60.0, 10.0), (120.0, 10.0), (240.0, 10.0)]
    assert (inc, secs, reset) == (1800.0, 180.0, True)
    assert bucket_rates([(0.0, 5.0)]) == ([], 0.0, 0.0, False)
    # buckets missing in a gap: the increase across it over the time across it
    assert bucket_rates([(0.0, 0.0), (600.0, 6000.0), (660.0, 6600.0), (720.0, 0.0)])[0] == [(600.0, 10.0),
                                                                                             (660.0, 10.0)]


def test_limits_parse_with_their_names_and_reasons() -> None:
    assert parse_limits([]) == {"vcpus_per_cpu": 4.0}
    assert parse_limits(["vcpus_per_cpu=2.5", "halt_poll_share=0.1"]) == {"vcpus_per_cpu": 2.5,
                                                                          "halt_poll_share": 0.1}
    for bad, words in (("cpus=3", "expected NAME=VALUE with NAME one of vcpus_per_cpu, exits_per_s_per_cpu, "
                                  "halt_poll_share"),
                       ("vcpus_per_cpu", "expected NAME=VALUE"), ("vcpus_per_cpu=x", "'x' is not a number"),
                       ("vcpus_per_cpu=-1", "expected a number > 0, got -1"),
                       ("vcpus_per_cpu=nan", "expected a number > 0, got nan")):
        with pytest.raises(PackError, match=words.replace("(", r"\(")):
            parse_limits([bad])


def test_spread_says_how_uneven() -> None:
    s = spread([1.0, 1.0, 4.0])
    assert s is not None
    assert (s["hosts"], s["min"], s["max"], s["mean"], s["max_over_mean"]) == (3, 1.0, 4.0, 2.0, 2.0)
    assert s["cv"] == pytest.approx((2 ** 0.5) / 2.0)  # population stdev sqrt(2) over mean 2
    assert spread([]) is None
    assert spread([0.0, 0.0]) == {"hosts": 2, "min": 0.0, "max": 0.0, "mean": 0.0, "cv": 0.0, "max_over_mean": 0.0}


def room(name: str, headroom: int | None) -> HostCapacity:
    h = HostCapacity(name)
    h.headroom_vcpus = headroom
    return h


def test_place_fills_the_roomiest_hosts_evenly_and_never_past_the_limit() -> None:
    hosts = [room("a", 10), room("b", 6), room("c", 0), room("d", None), room("e", 6)]
    # a takes 4 (10 -> 6, level with b and e), then ties go by name: a, b, e, a, ...
    assert place(hosts, 6) == {"vcpus": 6, "placed": [{"host": "a", "vcpus": 5}, {"host": "b", "vcpus": 1}],
                               "unplaced": 0}
    assert place(hosts, 7)["placed"] == [{"host": "a", "vcpus": 5}, {"host": "b", "vcpus": 1},
                                         {"host": "e", "vcpus": 1}]
    assert place(hosts, 30) == {"vcpus": 30, "placed": [{"host": "a", "vcpus": 10}, {"host": "b", "vcpus": 6},
                                                        {"host": "e", "vcpus": 6}], "unplaced": 8}
    assert place(hosts, 0) == {"vcpus": 0, "placed": [], "unplaced": 0}
