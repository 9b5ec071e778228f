"""Lateness advice (SPEC §6.2), pure: the advised extra time is the least that keeps a symbol's
late trades under the rate, checked against the watermark rule itself."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.intervals import IntervalSet
from shared.core.lateness import advise, allowed_late
from shared.core.trades import Trade
from shared.core.windows import PartitionWindows, WindowSettings

S = 1_000_000


def late_count(lateness_us, extra_us, allowed_lateness_us):
    """How many of the trades would still be late with ``extra_us`` more ``max_delay`` (or
    ``allowed_lateness``): the watermark was ``lateness`` past the window's end on arrival, the
    window stays open while it is less than ``allowed_lateness`` past it."""
    return sum(1 for lateness in lateness_us if lateness - extra_us >= allowed_lateness_us)


def rate_ok(late, trades, max_rate):
    return not (trades and late / trades > max_rate)  # the verdict's test


distributions = st.one_of(
    st.lists(st.integers(0, 120 * S), max_size=300),  # uniform
    st.lists(st.integers(0, 40).map(lambda n: 2**n % (90 * S)), max_size=300),  # heavy-tailed
    st.lists(st.sampled_from([S, 2 * S, 2 * S, 5 * S]), max_size=300),  # ties
)


@settings(max_examples=400, deadline=None)
@given(
    lateness_over=distributions,
    extra_trades=st.integers(0, 20_000),
    max_rate=st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.07, 0.1, 0.5, 1.0]),
    allowed_lateness_us=st.sampled_from([0, S, 3 * S]),
    max_delay_us=st.sampled_from([0, 5 * S]),
)
def test_advised_extra_is_the_least_that_meets_the_rate(
    lateness_over, extra_trades, max_rate, allowed_lateness_us, max_delay_us
):
    lateness_us = [allowed_lateness_us + x for x in lateness_over]  # late: at least the lateness
    trades = len(lateness_us) + extra_trades
    a = advise(lateness_us, trades, max_rate, max_delay_us, allowed_lateness_us)
    assert a.late == len(lateness_us)
    assert rate_ok(late_count(lateness_us, a.extra_us, allowed_lateness_us), trades, max_rate)
    if a.extra_us:
        less = late_count(lateness_us, a.extra_us - 1, allowed_lateness_us)
        assert not rate_ok(less, trades, max_rate)  # one microsecond less does not do
    else:
        assert rate_ok(len(lateness_us), trades, max_rate)
    assert a.max_delay_us == max_delay_us + a.extra_us
    assert a.allowed_lateness_us == allowed_lateness_us + a.extra_us
    ranked = sorted(lateness_us)
    assert a.max_us == (ranked[-1] if ranked else 0)
    assert a.p50_us <= a.p90_us <= a.p99_us <= a.max_us


@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.001, 0.01, 0.07, 0.1, 1.0]))
def test_allowed_late_is_the_verdicts_bound(trades, max_rate):
    k = allowed_late(trades, max_rate)
    assert rate_ok(k, trades, max_rate)
    assert k == trades or not rate_ok(k + 1, trades, max_rate)


def test_a_known_feed_gets_the_expected_max_delay():
    """A feed whose trades arrive 0-9 s late to the watermark's 5 s max_delay: 1000 trades of
    which 100 are late by 0.5 s, 1.5 s … 9.5 s past their window's end (10 each). At 1% (10
    trades) the 9.5 s ones may stay late: max_delay 5 + 8.5 s (plus 1 µs) keeps the rest."""
    lateness = [int((i + 0.5) * S) for i in range(10) for _ in range(10)]
    a = advise(lateness, 1000, 0.01, 5 * S, 0)
    assert a.extra_us == int(8.5 * S) + 1
    assert a.max_delay_us == int(13.5 * S) + 1


def test_the_windows_agree_with_the_advice():
    """The watermark rule in the core gives the advice's count: with max_delay raised by the
    advised extra, the windows themselves set aside at most the allowed number of trades."""
    intervals = IntervalSet.parse("1m")
    t0 = 1_767_225_600 * S  # 2026-01-01, a minute boundary
    # On-time trades up to 70 s; then trades for the first minute, each later than the last.
    trades = [Trade("binance", "X", i, t0 + i * S, Decimal(1), Decimal(1)) for i in range(70)]
    late_ts = [t0 + 59 * S - i * 100_000 for i in range(10)]

    def run(max_delay_us):
        windows = PartitionWindows(WindowSettings(intervals, max_delay_us=max_delay_us))
        windows.process(trades, 0)
        late_trades = [
            Trade("binance", "X", 100 + i, ts, Decimal(1), Decimal(1))
            for i, ts in enumerate(late_ts)
        ]
        return windows.process(late_trades, 0).late

    late = run(5 * S)
    assert len(late) == 10
    a = advise([t.lateness_us for t in late], 80, 0.05, 5 * S, 0)  # 4 of 80 may be late
    assert len(run(a.max_delay_us)) <= 4 < len(run(a.max_delay_us - 1))
