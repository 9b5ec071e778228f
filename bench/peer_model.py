"""What every system of bench/peers.py must write, from the topic's messages and candlekeep's core.

The messages are read back from the cached file in send order, each partition's in offset order
(the producer sends them to their partition in that order). Per partition, as candlekeep's worker
(and ``tests/streaming.reference_model``) does: the core's parser and key check, the first copy of
each (exchange, symbol, trade_id) wins, and the watermark is the partition's greatest trade time
so far minus ``max_delay`` (5 s). A trade is on time in an interval when that interval's window
ends after the watermark at its arrival.

- 1m, and candlekeep's larger candles: the core's fold over the trades on time in 1m (candlekeep
  merges larger candles from its 1m candles, so a trade late for 1m is in none of them).
- Quix Streams' larger candles: each interval's windows run independently, so a trade that
  missed its 1m window still counts in a 5m, 15m or 1h window that is still open: the core's fold
  over the trades on time in that interval (``independent``).
- bytewax's: its ``fold_window`` calls a trade late when its time is behind the watermark,
  whatever window it falls in, so a trade late for one interval is late for all: the core's fold
  over the trades not behind the watermark at arrival (``behind``). On this topic (disorder up to
  2 s, late trades minutes late) that is the same set as candlekeep's late for 1m.
The meanings differ only for windows holding such trades; the report counts them.

Compared are the windows that end at least 5 s before every busy partition's last trade: every
system must have closed those (bytewax also closes the rest at the end of the topic; candlekeep
and Quix keep them open).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from stream_throughput import read_chunks

from shared.core.aggregation import aggregate
from shared.core.intervals import IntervalSet
from shared.core.trade_messages import check_key, parse_trade_message
from shared.core.trades import Rejection

MAX_DELAY_US = 5_000_000
NAMES = ("1m", "5m", "15m", "1h")
ONE_MINUTE_US = 60_000_000


@dataclass
class Reference:
    messages: int
    #: (symbol, interval, window_start_us) -> candle values, candlekeep's meaning (1m merged up).
    candlekeep: dict = field(default_factory=dict)
    #: Each interval's windows on their own (Quix Streams' meaning).
    independent: dict = field(default_factory=dict)
    #: Late = behind the watermark, in every interval (bytewax's meaning).
    behind: dict = field(default_factory=dict)
    late_1m: int = 0
    compared_1m: int = 0
    last_start_us: int = 0  # of the last compared 1m window
    span_messages: int = 0  # between the first 1m window's close and the last compared one's
    #: Per meaning, per larger interval: how many compared candles differ from candlekeep's.
    differ: dict = field(default_factory=dict)


def reference(path) -> Reference:
    greatest: dict[int, int] = {}
    offsets: dict[int, int] = {}
    seen: set = set()
    arrivals = []  # (trade, watermark at arrival or None)
    closes = []  # (send position, greatest trade time so far in any partition)
    position = 0
    top = 0
    for chunk in read_chunks(path):
        for partition, key, value in chunk:
            offsets[partition] = offsets.get(partition, -1) + 1
            position += 1
            trade = parse_trade_message(value)
            if not isinstance(trade, Rejection):
                trade = check_key(key, trade) or trade
            if isinstance(trade, Rejection) or trade.key in seen:
                continue
            seen.add(trade.key)
            before = greatest.get(partition)
            arrivals.append((trade, None if before is None else before - MAX_DELAY_US))
            greatest[partition] = trade.ts_us if before is None else max(before, trade.ts_us)
            if trade.ts_us > top:
                top = trade.ts_us
                closes.append((position, top))
    ref = Reference(messages=position)
    cutoff = min(greatest.values()) - MAX_DELAY_US  # windows ending by then are closed everywhere
    on_time = {name: [] for name in NAMES}
    not_behind = [t for t, watermark in arrivals if watermark is None or t.ts_us >= watermark]
    for trade, watermark in arrivals:
        for name in NAMES:
            length = IntervalSet.parse(name).base.length_us
            end = trade.ts_us - trade.ts_us % length + length
            if watermark is None or end > watermark:
                on_time[name].append(trade)
    ref.late_1m = len(arrivals) - len(on_time["1m"])
    for candle in aggregate(on_time["1m"], IntervalSet.parse(",".join(NAMES))):
        if candle.window_end_us <= cutoff:
            ref.candlekeep[(candle.symbol, candle.interval, candle.window_start_us)] = (
                candle.values()
            )
    for name in NAMES:
        for meaning, trades in ((ref.independent, on_time[name]), (ref.behind, not_behind)):
            for candle in aggregate(trades, IntervalSet.parse(name)):
                if candle.window_end_us <= cutoff:
                    key = (candle.symbol, candle.interval, candle.window_start_us)
                    meaning[key] = candle.values()
    starts = sorted(k[2] for k in ref.candlekeep if k[1] == "1m")
    ref.compared_1m = len(starts)
    ref.last_start_us = starts[-1]
    # Messages read between the close of the first 1m window and that of the last compared one:
    # from the first message whose trade time passes the first window's end + delay to the first
    # that passes the last window's.
    times = [t for _, t in closes]
    first_close = closes[bisect.bisect_left(times, starts[0] + ONE_MINUTE_US + MAX_DELAY_US)][0]
    index = bisect.bisect_left(times, ref.last_start_us + ONE_MINUTE_US + MAX_DELAY_US)
    last_close = closes[min(index, len(closes) - 1)][0]
    ref.span_messages = last_close - first_close
    ref.differ = {m: meanings_differ(ref, m) for m in ("independent", "behind")}
    return ref


def compare(found: dict, ref: Reference, intervals: str, meaning: str) -> tuple[int, int]:
    """Check ``found`` (one system's table) against the reference: every compared 1m candle
    equal to candlekeep's, and, for a four-interval run, every compared larger candle equal to
    the system's ``meaning`` (``candlekeep``, ``independent`` or ``behind``). Returns (1m
    candles checked, larger candles checked); raises AssertionError on a difference."""
    checked = {"1m": 0, "larger": 0}
    for name in intervals.split(","):
        expected = getattr(ref, "candlekeep" if name == "1m" else meaning)
        wanted = {k: v for k, v in expected.items() if k[1] == name}
        got = {k: found[k] for k in wanted if k in found}
        missing = wanted.keys() - got.keys()
        assert not missing, f"{len(missing)} {name} candles missing (first: {min(missing)})"
        extra = [
            k
            for k in found
            if k[1] == name and k[2] <= max(w[2] for w in wanted) and k not in wanted
        ]
        assert not extra, f"{len(extra)} {name} candles that should not exist (first: {extra[0]})"
        for key, values in wanted.items():
            assert got[key] == values, f"{key}: {got[key]} != expected {values}"
        checked["1m" if name == "1m" else "larger"] += len(wanted)
    return checked["1m"], checked["larger"]


def meanings_differ(ref: Reference, meaning: str) -> dict[str, int]:
    """Per larger interval: how many compared candles of ``meaning`` differ from candlekeep's."""
    other = getattr(ref, meaning)
    out = {}
    for name in NAMES[1:]:
        keys = {k for k in ref.candlekeep if k[1] == name} | {k for k in other if k[1] == name}
        out[name] = sum(ref.candlekeep.get(k) != other.get(k) for k in keys)
    return out
