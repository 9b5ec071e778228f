"""Batch recomputation (SPEC §6 step 2): every candle of an interval, from ``trades``, in SQL.

The trades never travel into Python: one set-based statement folds them into base candles and
merges those into the larger intervals, with the fold and rollup of ``shared.batch.candle_sql``
(open and close come from one probe each of the primary key ``(exchange, symbol, trade_id)``:
see ``candle_sql.base_fold``). Each larger interval is merged from the states of the largest
smaller interval that divides it (1h from 15m from 5m from 1m), not from the base states again:
merging is associative and windows are aligned to the epoch, so the candles are the same, and
each rollup reads a fifth or a third of the rows (the array comparisons of ``first`` and
``last`` cost per state merged).

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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from shared.batch.candle_sql import CANDLE_COLUMNS, base_fold, candle_columns, rollup
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


@contextmanager
def fold_settings(conn: psycopg.Connection) -> Iterator[None]:
    """For the statements inside, in the open transaction: ``work_mem`` raised to
    :data:`WORK_MEM` (never lowered; a fold hashes every window of its period, see the module's
    docstring), JIT off and explicit sorts discouraged; all put back afterwards.

    JIT: on a server built with LLVM (Debian's and most packaged PostgreSQL; not the embedded
    one), the fold's cost estimate passes ``jit_above_cost`` and the server compiles its many
    numeric expressions for each run: on PostgreSQL 15, an hour of 1M trades recomputed in
    1.31-1.33 s with JIT and 0.44-0.46 s without (docs/benchmarks.md); the compiled code never
    won that back on these statements.

    Sorts (``enable_sort`` off: a sort is still used where no plan avoids it, such as ordering
    a period's few windows): the planner has no statistics on ``date_bin(…, ts, …)`` and takes
    every trade for a window of its own, so where a filter lowers its row estimate (the
    reconciliation's fold without the late trades) it may think a hash of that many groups too
    large and sort every trade by symbol and window instead. Seen on PostgreSQL 18: the hour's
    fold without its 5,025 late trades sorted 995k rows, 3.6 s against the recompute's 1.1 s.
    """
    previous = conn.execute(
        "SELECT current_setting('work_mem'), current_setting('jit'),"
        " current_setting('enable_sort'), current_setting('enable_incremental_sort'),"
        " CASE WHEN pg_size_bytes(current_setting('work_mem')) < pg_size_bytes(%(wm)s)"
        " THEN set_config('work_mem', %(wm)s, true) END, set_config('jit', 'off', true),"
        " set_config('enable_sort', 'off', true),"
        " set_config('enable_incremental_sort', 'off', true)",
        {"wm": WORK_MEM},
    ).fetchone()
    assert previous is not None
    yield
    conn.execute(
        "SELECT set_config('work_mem', %s, true), set_config('jit', %s, true),"
        " set_config('enable_sort', %s, true), set_config('enable_incremental_sort', %s, true)",
        previous[:4],
    )


_SELECT = """
SELECT exchange, symbol, {name}, window_start, window_start + {length}, {columns}
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
    states = {base: "base"}  # each interval's fold states: a CTE's name
    rollups = []
    for n, window_range in enumerate(ranges):
        interval = window_range.interval
        params[f"name{n}"] = interval.name
        params[f"len{n}"] = _pg_interval(interval)
        params[f"first{n}"] = window_range.first_start
        params[f"end{n}"] = window_range.last_end
        if interval != base:
            finer = max(
                (i for i in states if interval.length_us % i.length_us == 0),
                key=lambda i: i.length_us,
            )
            states[interval] = f"states{n}"
            rollups.append(f"states{n} AS ({rollup(f'%(len{n})s', states[finer])})")
        selects.append(
            _SELECT.format(
                name=f"%(name{n})s::text",
                length=f"%(len{n})s",
                columns=candle_columns(),
                source=f"SELECT * FROM {states[interval]}",
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
        with fold_settings(conn):
            conn.execute(
                f"INSERT INTO batch_candles ({', '.join(CANDLE_COLUMNS)})"
                f" WITH {', '.join([base_fold(), *rollups])} " + " UNION ALL ".join(selects),
                params,
            )
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
