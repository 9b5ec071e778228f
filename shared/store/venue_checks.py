"""The one writer of ``exchange_candles`` and ``candle_verifications`` (SPEC §6.1).

Both are replaced per period: a run deletes the rows of the windows it owns (every interval's
``[first_start, last_end)``, as ``shared.batch.recompute.owned_windows`` gives them) and writes
what it fetched and decided, in the caller's transaction, so a rerun gives identical tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

#: (interval name, first window start, last window end) of each interval a period owns.
Ranges = Sequence[tuple[str, datetime, datetime]]

EXCHANGE_CANDLE_COLUMNS = (
    "exchange",
    "symbol",
    "interval",
    "window_start",
    "window_end",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "trade_count",
    "quote_volume",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "vwap",
)
VERIFICATION_COLUMNS = (
    "exchange",
    "symbol",
    "interval",
    "window_start",
    "verdict",
    "differences",
    "missing_trades",
    "reason",
)


def _delete(conn: psycopg.Connection, table: str, ranges: Ranges) -> None:
    for interval, first_start, last_end in ranges:
        conn.execute(
            f"DELETE FROM {table} WHERE interval = %s AND window_start >= %s AND window_start < %s",
            (interval, first_start, last_end),
        )


def replace_exchange_candles(
    conn: psycopg.Connection, ranges: Ranges, rows: Iterable[tuple]
) -> int:
    """The period's venue candles: ``rows`` in :data:`EXCHANGE_CANDLE_COLUMNS` order."""
    _delete(conn, "exchange_candles", ranges)
    count = 0
    with conn.cursor().copy(
        f"COPY exchange_candles ({', '.join(EXCHANGE_CANDLE_COLUMNS)}) FROM STDIN"
    ) as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def replace_verifications(conn: psycopg.Connection, ranges: Ranges, rows: Iterable[tuple]) -> int:
    """The period's verdicts: ``rows`` in :data:`VERIFICATION_COLUMNS` order (``differences``
    a dict)."""
    _delete(conn, "candle_verifications", ranges)
    count = 0
    with conn.cursor().copy(
        f"COPY candle_verifications ({', '.join(VERIFICATION_COLUMNS)}) FROM STDIN"
    ) as copy:
        for row in rows:
            copy.write_row((*row[:5], Jsonb(row[5]), *row[6:]))
            count += 1
    return count
