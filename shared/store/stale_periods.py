"""Stale periods (SPEC §6.2): a trade stored for a period already reconciled marks the period.

A period counts as reconciled from the moment a batch run starts recomputing it
(``reconciled_periods``, written by :func:`start_reconciling` and committed before the
recomputation reads ``trades``). From then on, every path that stores trades (the stream, ``load``,
a repair: all go through ``shared.store.trade_store``) marks, in the same transaction as the
trades, each reconciled period its new trades fall in: ``stale_periods`` with the period's
``start`` and ``end``, when it was marked and how many trades. The DAG reconciles stale periods
again; a run clears the mark only if it was made before its recomputation started, so a trade
stored during the run keeps the period stale.

The stream's hot path pays nothing for this in the common case: its batch's first statement
(the fence, ``shared.store.progress.fence``) also reads :data:`RECONCILED_UNTIL`, the end of the
newest reconciled period, and only a batch with a new trade older than that runs the one
statement that marks.

One race is left to the end of each run (``shared.batch.finality.recount``): a writer that read
the bound just before a run registered its period and committed just after the run's
recomputation read ``trades``; the run compares the period's stored trades with its base candles
once it is done, and marks the period if they differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import psycopg

from shared.core.trades import Trade, datetime_to_ts, ts_to_datetime


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


#: The bound was not read with the transaction's first statement: :func:`mark_stale` reads it.
UNKNOWN = _Unknown()

#: The end of the newest reconciled period (NULL: none): a scalar subquery other statements carry.
RECONCILED_UNTIL = "(SELECT max(period_end) FROM reconciled_periods)"

_MARK = """
INSERT INTO stale_periods ("start", "end", marked_at, trades)
SELECT r.period_start, r.period_end, clock_timestamp(), count(*)
FROM unnest(%s::timestamptz[]) AS t(ts)
JOIN reconciled_periods r ON t.ts >= r.period_start AND t.ts < r.period_end
GROUP BY 1, 2
ON CONFLICT ("start", "end") DO UPDATE
SET marked_at = EXCLUDED.marked_at, trades = stale_periods.trades + EXCLUDED.trades
"""


def mark_stale(
    conn: psycopg.Connection,
    trades: Sequence[Trade],
    reconciled_until: datetime | _Unknown | None = UNKNOWN,
) -> int:
    """Mark the reconciled periods that the newly stored ``trades`` fall in, in the caller's
    transaction; return how many trades were older than the bound (0: no statement ran).

    ``reconciled_until``: :data:`RECONCILED_UNTIL` as read earlier in this transaction (None:
    nothing is reconciled), or :data:`UNKNOWN` to read it here.
    """
    if not trades:
        return 0
    if reconciled_until is UNKNOWN:
        reconciled_until = conn.execute(f"SELECT {RECONCILED_UNTIL}").fetchone()[0]
    if reconciled_until is None:
        return 0
    bound_us = datetime_to_ts(reconciled_until)
    older = [t.ts_us for t in trades if t.ts_us < bound_us]
    if older:
        conn.execute(_MARK, ([ts_to_datetime(ts) for ts in older],))
    return len(older)


def mark_stale_period(
    conn: psycopg.Connection, start: datetime, end: datetime, trades: int
) -> None:
    """Mark one reconciled period stale (``trades``: how many trades it is known to lack)."""
    conn.execute(
        'INSERT INTO stale_periods ("start", "end", marked_at, trades)'
        ' VALUES (%s, %s, clock_timestamp(), %s) ON CONFLICT ("start", "end") DO UPDATE'
        " SET marked_at = EXCLUDED.marked_at, trades = stale_periods.trades + EXCLUDED.trades",
        (start, end, trades),
    )


def start_reconciling(conn: psycopg.Connection, start: datetime, end: datetime) -> datetime:
    """Register ``[start, end)`` as reconciled from now on (the caller commits before it reads
    ``trades``); return the time its recomputation starts."""
    return conn.execute(
        "INSERT INTO reconciled_periods (period_start, period_end, recomputed_at)"
        " VALUES (%s, %s, clock_timestamp()) ON CONFLICT (period_start, period_end)"
        " DO UPDATE SET recomputed_at = EXCLUDED.recomputed_at RETURNING recomputed_at",
        (start, end),
    ).fetchone()[0]


#: A mark that the period's last recomputation already took into account.
_SEEN = (
    ' s."start" = %(start)s AND s."end" = %(end)s AND EXISTS (SELECT 1 FROM reconciled_periods r'
    ' WHERE r.period_start = s."start" AND r.period_end = s."end"'
    " AND s.marked_at < r.recomputed_at)"
)


def clear_stale(conn: psycopg.Connection, start: datetime, end: datetime) -> None:
    """Clear the period's mark if it is older than the period's last recomputation (a trade
    stored since then keeps it)."""
    conn.execute(f"DELETE FROM stale_periods s WHERE {_SEEN}", {"start": start, "end": end})


def stays_stale(conn: psycopg.Connection, start: datetime, end: datetime) -> bool:
    """Whether ``[start, end)`` is stale even after its last recomputation: trades stored
    since it started, or a stale period overlapping it."""
    return conn.execute(
        'SELECT EXISTS (SELECT 1 FROM stale_periods s WHERE s."start" < %(end)s'
        f' AND s."end" > %(start)s AND NOT ({_SEEN}))',
        {"start": start, "end": end},
    ).fetchone()[0]


def is_stale(conn: psycopg.Connection, start: datetime, end: datetime) -> bool:
    """Whether trades were stored for a reconciled period overlapping ``[start, end)`` after
    it was reconciled."""
    return conn.execute(
        'SELECT EXISTS (SELECT 1 FROM stale_periods WHERE "start" < %s AND "end" > %s)',
        (end, start),
    ).fetchone()[0]


def stale_periods(conn: psycopg.Connection, limit: int = 24) -> list[tuple[datetime, datetime]]:
    """The stale periods, oldest mark first (at most ``limit``)."""
    rows = conn.execute(
        'SELECT "start", "end" FROM stale_periods ORDER BY marked_at, "start" LIMIT %s', (limit,)
    ).fetchall()
    return [(r[0], r[1]) for r in rows]
