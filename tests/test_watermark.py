"""The watermark clock and window closing, step by step (SPEC §4)."""

from __future__ import annotations

from decimal import Decimal

from shared.core.intervals import IntervalSet
from shared.core.trades import Trade
from shared.core.windows import PartitionWindows, WatermarkClock, WindowSettings

S = 1_000_000
M = 60 * S
T0 = 1_700_000_040 * S  # a 1m boundary (and a 5m one: 1_700_000_100 is not; see below)


def trade(ts, trade_id, price="10", qty="1", symbol="BTCUSDT", maker=None):
    return Trade("binance", symbol, trade_id, ts, Decimal(price), Decimal(qty), maker)


def test_watermark_is_greatest_timestamp_minus_max_delay_and_never_goes_back():
    clock = WatermarkClock(max_delay_us=5 * S, idle_timeout_us=10 * S)
    assert clock.watermark_us is None
    clock.observe(T0 + 20 * S, now_us=0)
    assert clock.watermark_us == T0 + 15 * S
    clock.observe(T0 + 1 * S, now_us=1)  # out of order: no effect
    assert clock.watermark_us == T0 + 15 * S


def test_idle_advance_follows_the_wall_clock_only_when_caught_up_and_quiet():
    clock = WatermarkClock(max_delay_us=5 * S, idle_timeout_us=10 * S)
    clock.observe(T0, now_us=1000 * S)
    clock.idle_advance(now_us=1005 * S, caught_up=True)  # quiet for only 5 s
    assert clock.watermark_us == T0 - 5 * S
    clock.idle_advance(now_us=1030 * S, caught_up=False)  # behind on the log: a backlog
    assert clock.watermark_us == T0 - 5 * S
    clock.idle_advance(now_us=1030 * S, caught_up=True)
    assert clock.watermark_us == T0 + 30 * S - 5 * S
    # A trade arriving later restarts the idle timer; the watermark does not go back.
    clock.observe(T0 + 1 * S, now_us=1031 * S)
    clock.idle_advance(now_us=1032 * S, caught_up=True)
    assert clock.watermark_us == T0 + 25 * S


def test_a_quiet_symbol_still_gets_its_candle_by_idle_advance():
    settings = WindowSettings(IntervalSet.parse("1m"), max_delay_us=5 * S, idle_timeout_us=10 * S)
    windows = PartitionWindows(settings)
    assert windows.process([trade(T0 + 10 * S, 1)], now_us=0).candles == []
    assert windows.advance(now_us=20 * S, caught_up=True).candles == []  # wm = T0+25s
    assert windows.advance(now_us=55 * S, caught_up=False).candles == []  # catching up: wait
    closed = windows.advance(now_us=55 * S, caught_up=True).candles  # wm = T0+60s
    assert [(c.interval, c.window_start_us, c.revision) for c in closed] == [("1m", T0, 0)]
    assert not windows.has_closable_windows()


def test_window_closes_when_the_watermark_reaches_its_end_and_larger_ones_when_all_bases_do():
    start = 1_699_999_800 * S  # a 5m boundary
    settings = WindowSettings(IntervalSet.parse("1m,5m"), max_delay_us=5 * S)
    windows = PartitionWindows(settings)
    out = windows.process([trade(start + 10 * S, 1), trade(start + M + 4 * S, 2)], now_us=0)
    assert out.candles == []  # wm = start + 59 s
    out = windows.process([trade(start + M + 5 * S, 3)], now_us=0)  # wm = start + 60 s
    assert [(c.interval, c.window_start_us) for c in out.candles] == [("1m", start)]
    out = windows.process([trade(start + 5 * M + 5 * S, 4)], now_us=0)
    assert [(c.interval, c.window_start_us) for c in out.candles] == [
        ("1m", start + M),
        ("5m", start),
    ]
    five = out.candles[-1]
    assert (five.open, five.trade_count, five.first_trade_id, five.last_trade_id) == (
        Decimal(10),
        3,
        1,
        3,
    )


def test_allowed_lateness_revises_the_candle_and_its_larger_candles():
    start = 1_699_999_800 * S  # a 5m boundary
    last_minute = start + 4 * M
    settings = WindowSettings(
        IntervalSet.parse("1m,5m"), max_delay_us=0, allowed_lateness_us=30 * S
    )
    windows = PartitionWindows(settings)
    windows.process([trade(last_minute + 10 * S, 5, price="10")], now_us=0)
    out = windows.process([trade(start + 5 * M + 5 * S, 9)], now_us=0)  # closes 1m and 5m
    assert [(c.interval, c.revision) for c in out.candles] == [("1m", 0), ("5m", 0)]
    # Within the lateness: an earlier trade becomes the open; both candles are revised.
    out = windows.process([trade(last_minute + 1 * S, 4, price="7")], now_us=0)
    assert [(c.interval, c.revision, c.open, c.trade_count) for c in out.candles] == [
        ("1m", 1, Decimal(7), 2),
        ("5m", 1, Decimal(7), 2),
    ]
    assert out.late == []
    # Past the lateness: late, no candle changes.
    out = windows.process([trade(start + 6 * M, 10), trade(last_minute + 2 * S, 3)], now_us=0)
    assert [lt.trade.trade_id for lt in out.late] == [3]
    assert out.late[0].lateness_us == out.late[0].watermark_us - (start + 5 * M) == M
    assert all(c.window_start_us != last_minute for c in out.candles)


def test_first_trade_of_a_window_arriving_during_lateness_revises_the_larger_candle():
    start = 1_699_999_800 * S
    settings = WindowSettings(
        IntervalSet.parse("1m,5m"), max_delay_us=0, allowed_lateness_us=10 * M
    )
    windows = PartitionWindows(settings)
    windows.process([trade(start + 10 * S, 1), trade(start + 5 * M + 1, 2)], now_us=0)
    out = windows.process([trade(start + 3 * M, 3)], now_us=0)  # its 1m window had no trade
    assert [(c.interval, c.window_start_us, c.revision, c.trade_count) for c in out.candles] == [
        ("1m", start + 3 * M, 0, 1),
        ("5m", start, 1, 2),
    ]
