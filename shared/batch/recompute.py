"""Batch recomputation (SPEC §6 step 2): every candle of an interval, from ``trades``, in SQL.

The trades never travel into Python: one set-based statement folds them into base candles and
merges those into the larger intervals, in the same way as the core. A hash-aggregate pass over
the interval's trades computes every field but open and close, and each window's least and
greatest ``ts`` and ``trade_id``; open and close, the first and last trade by ``(ts, trade_id)``,
then come from one probe each of the primary key ``(exchange, symbol, trade_id)`` (see
``_PROBE``) instead of a comparison on every row (the first version took ``min``/``max`` of an
``ARRAY[epoch, id, price]`` built per trade: twice the time for a day of 10M trades).

The run for ``[start, end)`` owns every window that *ends* in ``(start, end]``: with the default
intervals and hourly runs, exactly the windows inside the hour; a ``1d`` window is computed by the
run whose interval holds its end. Rerunning replaces the run's rows in one transaction.

The hash aggregate keeps about 1.6 kB per base window (its numeric sum states), so
PostgreSQL's default ``work_mem`` (4 MB, 8 MB for hashing) holds only a few thousand windows and
spills the rest to disk: recomputing a day of 20 symbols (28,800 one-minute windows) took 1.7
times the server CPU time. The transaction raises ``work_mem`` to ``WORK_MEM`` (never lowers it)
for the statement, and puts it back afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from shared.core.intervals import Interval, IntervalSet
from shared.core.trades import datetime_to_ts, ts_to_datetime

#: ``work_mem`` for the recomputation (hash tables get ``hash_mem_multiplier`` times this, 2 by
#: default): room for ~75,000 base windows, e.g. an hour of 1,250 symbols, before spilling.
WORK_MEM = "64MB"


@dataclass(frozen=True)
class WindowRange:
    """The windows of one interval that a run owns: starts in ``[first_start, last_end - I]``."""

    interval: Interval
    first_start: datetime
    last_end: datetime


def owned_windows(start: datetime, end: datetime, intervals: IntervalSet) -> list[WindowRange]:
    """For each interval, the windows whose end lies in ``(start, end]``."""
    if end <= start:
        raise ValueError(f"empty interval: end {end.isoformat()} is not after start")
    ranges = []
    s_us, e_us = datetime_to_ts(start), datetime_to_ts(end)
    for interval in intervals.intervals:
        first = interval.window_start(s_us)
        last_end = interval.window_start(e_us)  # windows end on boundaries <= end
        ranges.append(WindowRange(interval, ts_to_datetime(first), ts_to_datetime(last_end)))
    return ranges


def _pg_interval(interval: Interval) -> timedelta:
    return timedelta(microseconds=interval.length_us)


#: The base candles without open and close: one hash-aggregate pass over the trades.
AGGREGATE = """
aggregate AS (
    SELECT exchange, symbol,
           date_bin(%(base_len)s, ts, timestamptz 'epoch') AS window_start,
           max(price) AS high,
           min(price) AS low,
           sum(quantity) AS volume,
           sum(price * quantity) AS quote_volume,
           sum(raw_trades) AS trade_count,
           bool_or(is_buyer_maker IS NOT NULL) AS sided,
           sum(quantity) FILTER (WHERE NOT is_buyer_maker) AS taker_volume,
           sum(price * quantity) FILTER (WHERE NOT is_buyer_maker) AS taker_quote,
           min(ts) AS first_ts, max(ts) AS last_ts,
           min(trade_id) AS min_id, max(trade_id) AS max_id
    FROM trades
    WHERE ts >= %(scan_start)s AND ts < %(scan_end)s
    GROUP BY 1, 2, 3
)"""

#: A window's first (last) trade by ``(ts, trade_id)`` is, of its trades at its least (greatest)
#: ``ts``, the one with the least (greatest) id. Every trade of the window has an id in
#: ``[min_id, max_id]``, and no trade outside it has that ``ts``, so walking the primary key
#: ``(exchange, symbol, trade_id)`` through that range from the low (high) end and stopping at
#: the first trade with that ``ts`` finds it, exactly. Where ids grow with time (Binance, Kraken:
#: the venues' ids are consecutive) that is the first entry: one probe per window, as with a
#: time-ordered index, but without a second B-tree for every writer to maintain
#: (docs/storage.md); a window whose first trade came out of id order reads on to it.
#: ``(t.ts = …) IS TRUE`` (the same, ``ts`` is never NULL) keeps the planner from adding the
#: BRIN index on ``ts`` to the key in a bitmap scan that reads and sorts the whole window: five
#: times the time per probe (a day of 1M trades: 5.2-5.9 s of probes instead of 2.3 s).
_PROBE = """
CROSS JOIN LATERAL (
    SELECT t.ts, t.trade_id, t.price FROM trades AS t
    WHERE t.exchange = a.exchange AND t.symbol = a.symbol
      AND t.trade_id BETWEEN a.min_id AND a.max_id AND (t.ts = a.{ts}) IS TRUE
    ORDER BY t.trade_id {order}
    LIMIT 1
) AS {name}"""

#: Base candles, with first and last as ``ARRAY[epoch, id, price]`` so that the rollups take
#: ``min``/``max`` of them over a few base candles each.
BASE = f"""
base AS MATERIALIZED (
    SELECT a.*,
           ARRAY[extract(epoch FROM f.ts), f.trade_id, f.price] AS first,
           ARRAY[extract(epoch FROM l.ts), l.trade_id, l.price] AS last
    FROM aggregate AS a
    {_PROBE.format(order="ASC", ts="first_ts", name="f")}
    {_PROBE.format(order="DESC", ts="last_ts", name="l")}
)"""

_ROLLUP = """
SELECT exchange, symbol, date_bin({length}, window_start, timestamptz 'epoch') AS window_start,
       min(first) AS first, max(last) AS last, max(high) AS high, min(low) AS low,
       sum(volume) AS volume, sum(quote_volume) AS quote_volume,
       sum(trade_count) AS trade_count, bool_or(sided) AS sided,
       sum(taker_volume) AS taker_volume, sum(taker_quote) AS taker_quote
FROM base
GROUP BY 1, 2, 3
"""

_SELECT = """
SELECT exchange, symbol, {name}, window_start, window_start + {length},
       first[3], high, low, last[3], volume, quote_volume, trade_count,
       first[2]::bigint, last[2]::bigint,
       CASE WHEN sided THEN coalesce(taker_volume, 0) END,
       CASE WHEN sided THEN coalesce(taker_quote, 0) END
FROM ({source}) AS c
WHERE window_start >= {first} AND window_start + {length} <= {last_end}
"""


def recompute_batch_candles(
    conn: psycopg.Connection, start: datetime, end: datetime, intervals: IntervalSet
) -> dict[str, int]:
    """Replace the ``batch_candles`` of every window ending in ``(start, end]``, in one
    transaction; return how many candles each interval got."""
    ranges = owned_windows(start, end, intervals)
    base = intervals.base
    params: dict[str, object] = {
        "base_len": _pg_interval(base),
        "scan_start": min(r.first_start for r in ranges),
        "scan_end": ranges[0].last_end,  # whole base windows only
    }
    selects = []
    for n, window_range in enumerate(ranges):
        interval = window_range.interval
        params[f"name{n}"] = interval.name
        params[f"len{n}"] = _pg_interval(interval)
        params[f"first{n}"] = window_range.first_start
        params[f"end{n}"] = window_range.last_end
        source = "SELECT * FROM base" if interval == base else _ROLLUP.format(length=f"%(len{n})s")
        selects.append(
            _SELECT.format(
                name=f"%(name{n})s::text",
                length=f"%(len{n})s",
                source=source,
                first=f"%(first{n})s",
                last_end=f"%(end{n})s",
            )
        )
    with conn.transaction():
        for n, _ in enumerate(ranges):
            conn.execute(
                "DELETE FROM batch_candles WHERE interval = %(name)s"
                " AND window_start >= %(first)s AND window_end <= %(end)s",
                {
                    "name": params[f"name{n}"],
                    "first": params[f"first{n}"],
                    "end": params[f"end{n}"],
                },
            )
        previous = conn.execute(
            "SELECT current_setting('work_mem'), set_config('work_mem', %(wm)s, true)"
            " WHERE pg_size_bytes(current_setting('work_mem')) < pg_size_bytes(%(wm)s)",
            {"wm": WORK_MEM},
        ).fetchone()
        conn.execute(
            "INSERT INTO batch_candles (exchange, symbol, interval, window_start, window_end,"
            " open, high, low, close, volume, quote_volume, trade_count, first_trade_id,"
            " last_trade_id, taker_buy_volume, taker_buy_quote_volume)"
            f" WITH {AGGREGATE}, {BASE} " + " UNION ALL ".join(selects),
            params,
        )
        if previous is not None:
            conn.execute("SELECT set_config('work_mem', %s, true)", (previous[0],))
        rows = conn.execute(
            "SELECT interval, count(*) FROM batch_candles WHERE "
            + " OR ".join(
                f"(interval = %(name{n})s AND window_start >= %(first{n})s"
                f" AND window_end <= %(end{n})s)"
                for n, _ in enumerate(ranges)
            )
            + " GROUP BY interval",
            params,
        ).fetchall()
    counts = {r.interval.name: 0 for r in ranges}
    counts.update(dict(rows))
    return counts
