"""The one writer of ``trade_gaps`` (SPEC §4, §6.1): holes in a symbol's trade ids.

The stream records a hole live; the batch run finds the period's holes again from the stored
trades (authoritative); a repair fills them. The same hole is one row whoever finds it first
(its key is ``(exchange, symbol, first_missing_id)``). A row is *open* until its trades are
stored: ``filled_at`` and ``filled_by`` say when and how (``repair``: fetched from the venue;
``stored``: they came another way, a late copy or a ``load``). A repair that gets only some of
a hole's trades narrows the row to the ids still missing (a row per run of them), with the
reason in ``note``, so an open row's ``last - first + 1`` is always what is still missing.

A row *meets* a period when the trades around the hole do: the missing trades lie in time
between ``before_ts`` and ``after_ts``, the times of the stored trades on either side.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import psycopg

GAP_COLUMNS = (
    "id",
    "exchange",
    "symbol",
    "first_missing_id",
    "last_missing_id",
    "before_ts",
    "after_ts",
    "detected_at",
    "filled_at",
    "detected_by",
    "filled_by",
    "note",
)
_MEETS = "g.before_ts < %(end)s AND g.after_ts >= %(start)s"


def record_gaps(conn: psycopg.Connection, holes: Iterable[tuple], detected_by: str) -> int:
    """Record holes ``(exchange, symbol, first_missing_id, last_missing_id, before_ts,
    after_ts)``; a hole already recorded (by the stream, or an earlier run) is left as it is.
    Returns how many were new."""
    new = 0
    for hole in holes:
        new += conn.execute(
            "INSERT INTO trade_gaps (exchange, symbol, first_missing_id, last_missing_id,"
            " before_ts, after_ts, detected_by) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (*hole, detected_by),
        ).rowcount
    return new


def close_stored(conn: psycopg.Connection, start: datetime, end: datetime) -> int:
    """Close the open rows meeting ``[start, end)`` whose trades are all stored by now."""
    return conn.execute(
        "UPDATE trade_gaps g SET filled_at = now(), filled_by = 'stored'"
        f" WHERE g.filled_at IS NULL AND {_MEETS} AND ("
        "  SELECT count(*) FROM trades t WHERE t.exchange = g.exchange AND t.symbol = g.symbol"
        "  AND t.trade_id BETWEEN g.first_missing_id AND g.last_missing_id"
        " ) = g.last_missing_id - g.first_missing_id + 1",
        {"start": start, "end": end},
    ).rowcount


def gaps_meeting(
    conn: psycopg.Connection, start: datetime, end: datetime, *, open_only: bool = False
) -> list[dict]:
    """The rows meeting ``[start, end)`` (only the open ones with ``open_only``), by symbol and
    id."""
    where = _MEETS + (" AND g.filled_at IS NULL" if open_only else "")
    cursor = conn.execute(
        f"SELECT {', '.join('g.' + c for c in GAP_COLUMNS)} FROM trade_gaps g WHERE {where}"
        " ORDER BY g.exchange, g.symbol, g.first_missing_id",
        {"start": start, "end": end},
    )
    return [dict(zip(GAP_COLUMNS, row, strict=True)) for row in cursor.fetchall()]


def mark_repaired(conn: psycopg.Connection, gap_id: int) -> None:
    conn.execute(
        "UPDATE trade_gaps SET filled_at = now(), filled_by = 'repair', note = NULL"
        " WHERE id = %s AND filled_at IS NULL",
        (gap_id,),
    )


def leave_open(conn: psycopg.Connection, gap_id: int, note: str) -> None:
    """A repair got none of the hole's trades: the row stays open, saying why."""
    conn.execute("UPDATE trade_gaps SET note = %s WHERE id = %s", (note, gap_id))


def narrow_repaired(
    conn: psycopg.Connection, gap: dict, still_missing: list[tuple], note: str
) -> None:
    """A repair got some of the hole's trades: the row narrows to the first run of ids still
    missing and each further run, ``(first, last, before_ts, after_ts)``, becomes an open row of
    its own; all say why (``note``)."""
    (first, last, before_ts, after_ts), *more = still_missing
    conn.execute(
        "UPDATE trade_gaps SET first_missing_id = %s, last_missing_id = %s, before_ts = %s,"
        " after_ts = %s, note = %s WHERE id = %s AND filled_at IS NULL",
        (first, last, before_ts, after_ts, note, gap["id"]),
    )
    for first, last, before_ts, after_ts in more:
        conn.execute(
            "INSERT INTO trade_gaps (exchange, symbol, first_missing_id, last_missing_id,"
            " before_ts, after_ts, detected_by, note) VALUES (%s, %s, %s, %s, %s, %s,"
            " 'repair', %s) ON CONFLICT DO NOTHING",
            (gap["exchange"], gap["symbol"], first, last, before_ts, after_ts, note),
        )
