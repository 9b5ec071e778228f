"""Properties of the windowing core (hypothesis): order, duplicates, rollups, the watermark
clock, late trades and snapshot/restore."""

from __future__ import annotations

import json
from decimal import Decimal, localcontext

from hypothesis import given
from hypothesis import strategies as st

from shared.core.aggregation import Deduplicator, aggregate
from shared.core.candles import EXACT, merge, open_candle
from shared.core.intervals import SUPPORTED, IntervalSet, window_start
from shared.core.trades import Trade
from shared.core.windows import PartitionWindows, WatermarkClock, WindowSettings

from .strategies import trade_lists

INTERVALS = IntervalSet.parse("1m,5m,15m")
SECOND = 1_000_000


def by_key(candles):
    """Latest revision of each candle key (what a consumer deduping by key+revision keeps)."""
    out = {}
    for candle in candles:
        if candle.key not in out or candle.revision > out[candle.key].revision:
            out[candle.key] = candle
    return out


def values(candles_by_key):
    return {k: c.values() for k, c in candles_by_key.items()}


def stream(trades, settings, batches=1, now_us=0, flush=True):
    windows = PartitionWindows(settings)
    emitted = []
    late = []
    size = max(1, len(trades) // batches)
    for i in range(0, len(trades), size):
        out = windows.process(trades[i : i + size], now_us)
        emitted += out.candles
        late += out.late
    if flush:
        emitted += windows.flush().candles
    return emitted, late, windows


def in_disorder_within(trades, delay_us, rnd):
    """An arrival order in which no trade comes after a trade stamped ``delay_us`` later."""
    return sorted(trades, key=lambda t: t.ts_us + rnd.randrange(delay_us))


@given(trade_lists(), st.randoms(use_true_random=False), st.integers(1, 5))
def test_order_within_max_delay_does_not_change_candles(trades, rnd, batches):
    delay = 5 * SECOND
    settings = WindowSettings(INTERVALS, max_delay_us=delay)
    arrived = in_disorder_within(trades, delay, rnd)
    emitted, late, _ = stream(arrived, settings, batches)
    assert late == []
    in_order, _, _ = stream(sorted(trades, key=lambda t: t.order_key), settings)
    assert values(by_key(emitted)) == values(by_key(in_order))
    assert values(by_key(emitted)) == {c.key: c.values() for c in aggregate(trades, INTERVALS)}


@given(trade_lists(min_size=1), st.randoms(use_true_random=False))
def test_duplicates_count_once(trades, rnd):
    copies = [rnd.choice(trades) for _ in range(rnd.randrange(1, 20))]
    doubled = trades + copies
    rnd.shuffle(doubled)
    once = {c.key: c.values() for c in aggregate(trades, INTERVALS)}
    assert {c.key: c.values() for c in aggregate(doubled, INTERVALS)} == once
    dedup = Deduplicator()
    unique = list(dedup.unique(doubled))
    assert dedup.duplicates == len(copies)
    emitted, _, _ = stream(unique, WindowSettings(INTERVALS, max_delay_us=10**15))
    assert values(by_key(emitted)) == once


def assert_rollups_hold(candles_by_key):
    bases = [c for c in candles_by_key.values() if c.interval == INTERVALS.base.name]
    for interval in INTERVALS.larger:
        larger = {k: c for k, c in candles_by_key.items() if c.interval == interval.name}
        groups = {}
        for base in bases:
            key = (
                base.exchange,
                base.symbol,
                interval.name,
                interval.window_start(base.window_start_us),
            )
            groups.setdefault(key, []).append(base)
        assert set(groups) == set(larger)
        for key, group in groups.items():
            group.sort(key=lambda c: c.window_start_us)
            assert merge(group, interval).values() == larger[key].values()


@given(trade_lists(), st.randoms(use_true_random=False), st.integers(0, 90))
def test_every_larger_candle_is_the_merge_of_its_base_candles(trades, rnd, lateness_s):
    assert_rollups_hold({c.key: c for c in aggregate(trades, INTERVALS)})
    # In the stream too, late trades and revisions included.
    settings = WindowSettings(
        INTERVALS, max_delay_us=2 * SECOND, allowed_lateness_us=lateness_s * SECOND
    )
    arrived = in_disorder_within(trades, 120 * SECOND, rnd)
    emitted, _, _ = stream(arrived, settings, batches=rnd.randrange(1, 6))
    assert_rollups_hold(by_key(emitted))


@given(trade_lists(), st.randoms(use_true_random=False), st.integers(1, 6))
def test_streaming_with_a_large_max_delay_equals_one_shot_aggregation(trades, rnd, batches):
    shuffled = list(trades)
    rnd.shuffle(shuffled)
    emitted, late, windows = stream(
        shuffled, WindowSettings(INTERVALS, max_delay_us=10**12), batches
    )
    assert late == []
    assert all(c.revision == 0 for c in emitted), "no window closes twice without lateness"
    assert len(emitted) == len(by_key(emitted))
    assert values(by_key(emitted)) == {c.key: c.values() for c in aggregate(trades, INTERVALS)}
    assert windows.open_window_count == 0


@given(
    trade_lists(),
    st.randoms(use_true_random=False),
    st.integers(0, 30),
    st.integers(0, 120),
    st.integers(1, 8),
)
def test_late_trades_are_exactly_those_whose_window_had_closed(
    trades, rnd, delay_s, lateness_s, batches
):
    delay, lateness = delay_s * SECOND, lateness_s * SECOND
    base = INTERVALS.base.length_us
    arrived = in_disorder_within(trades, 300 * SECOND, rnd)
    # Reference model, written independently: the watermark is the greatest timestamp so far
    # minus max_delay; a trade is late when its base window's end + lateness <= watermark.
    expected_late, on_time, greatest = [], [], None
    for trade in arrived:
        watermark = None if greatest is None else greatest - delay
        end = trade.ts_us - trade.ts_us % base + base
        if watermark is not None and end + lateness <= watermark:
            expected_late.append((trade.key, watermark, watermark - end))
        else:
            on_time.append(trade)
        greatest = trade.ts_us if greatest is None else max(greatest, trade.ts_us)

    settings = WindowSettings(INTERVALS, max_delay_us=delay, allowed_lateness_us=lateness)
    emitted, late, _ = stream(arrived, settings, batches)
    assert [(lt.trade.key, lt.watermark_us, lt.lateness_us) for lt in late] == expected_late
    # Every other trade is in the stream's final candles, and no late trade is.
    assert values(by_key(emitted)) == {c.key: c.values() for c in aggregate(on_time, INTERVALS)}


def roundtrip(windows, settings):
    """Snapshot through JSON text, as the worker stores it, and restore."""
    return PartitionWindows.restore(settings, json.loads(json.dumps(windows.snapshot())))


@given(
    trade_lists(),
    st.randoms(use_true_random=False),
    st.lists(st.integers(0, 60), max_size=4),
    st.integers(0, 60),
)
def test_snapshot_restore_continue_equals_an_uninterrupted_run(trades, rnd, cuts, lateness_s):
    settings = WindowSettings(
        INTERVALS,
        max_delay_us=3 * SECOND,
        allowed_lateness_us=lateness_s * SECOND,
        idle_timeout_us=2 * SECOND,
    )
    arrived = in_disorder_within(trades, 90 * SECOND, rnd)
    steps = []  # (trades, now_us, caught_up): a few idle advances in between
    size = max(1, len(arrived) // 5)
    now = 0
    for i in range(0, len(arrived), size):
        now += rnd.randrange(10 * SECOND)
        steps.append((arrived[i : i + size], now, rnd.random() < 0.3))

    def run(restore_at):
        windows = PartitionWindows(settings)
        out = []
        for n, (batch, now_us, idle) in enumerate(steps):
            if n in restore_at:
                windows = roundtrip(windows, settings)
            result = windows.process(batch, now_us)
            out += [(c.key, c.revision, c.values()) for c in result.candles]
            out += [("late", lt.trade.key, lt.watermark_us) for lt in result.late]
            if idle:
                out += [
                    (c.key, c.revision, c.values())
                    for c in windows.advance(now_us + 5 * SECOND, caught_up=True).candles
                ]
        if len(steps) in restore_at:
            windows = roundtrip(windows, settings)
        out += [(c.key, c.revision, c.values()) for c in windows.flush().candles]
        return out

    assert run(set(cuts)) == run(set())


@given(st.integers(-(10**15), 10**16), st.sampled_from(sorted(SUPPORTED.values())))
def test_window_start_is_the_epoch_aligned_half_open_window(ts_us, length_us):
    """The one window-start function (every fold and window loop calls it)."""
    start = window_start(ts_us, length_us)
    assert start % length_us == 0 and start <= ts_us < start + length_us


@given(trade_lists(), st.randoms(use_true_random=False), st.integers(1, 5))
def test_process_moves_its_clock_as_observing_each_trade_does(trades, rnd, batches):
    """``process`` drives the :class:`WatermarkClock` it owns: its state after any batches is
    that of a clock that observed the same trades at the same wall times."""
    settings = WindowSettings(INTERVALS, max_delay_us=rnd.choice([0, 5, 60]) * SECOND)
    windows = PartitionWindows(settings)
    clock = WatermarkClock(settings.max_delay_us, settings.idle_timeout_us)
    trades = in_disorder_within(trades, 30 * SECOND, rnd)
    size = max(1, len(trades) // batches)
    for now_us, i in enumerate(range(0, len(trades), size)):
        out = windows.process(trades[i : i + size], now_us)
        late = set()
        for trade in trades[i : i + size]:
            if clock.watermark_us is not None and (
                window_start(trade.ts_us, INTERVALS.base.length_us) + INTERVALS.base.length_us
                <= clock.watermark_us
            ):
                late.add(trade.key)
            clock.observe(trade.ts_us, now_us)
        assert {lt.trade.key for lt in out.late} == late
        assert windows.clock.snapshot() == clock.snapshot()


def test_every_fold_is_exact_beyond_the_default_28_digits():
    """The fold's sums and products are exact only in the exact context: every caller (the
    book, the stream's windows, ``Candle.add``) must hold it, or these would round."""
    t0 = 1_700_000_040 * SECOND  # a 15m boundary
    prices = [Decimal("1.000000000000000000000000000000000000001"), Decimal("3.5")]
    quantity = Decimal("0.00000000000000000000000000000007")
    trades = [
        Trade("binance", "BTCUSDT", i, t0 + i, prices[i % 2], quantity, False) for i in range(4)
    ]
    with localcontext(EXACT):
        volume = sum(t.quantity for t in trades)
        quote = sum(t.price * t.quantity for t in trades)
    expected = (volume, quote, volume, quote)

    def sums(candle):
        return (
            candle.volume,
            candle.quote_volume,
            candle.taker_buy_volume,
            candle.taker_buy_quote_volume,
        )

    streamed, _, _ = stream(trades, WindowSettings(INTERVALS))
    added = open_candle(trades[0], INTERVALS.base)
    for trade in trades[1:]:
        added.add(trade)
    folded = [*aggregate(trades, INTERVALS), *streamed, added]
    assert len(folded) == 2 * len(INTERVALS.intervals) + 1
    assert all(sums(candle) == expected for candle in folded)
