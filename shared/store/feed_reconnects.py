"""The one writer of ``feed_reconnects``: a feed's reconnects, per symbol (SPEC §6.1 report).

A WebSocket that drops loses what was sent while it was down; the ids on either side say how
much (``first_id_after - last_id_before - 1``, where ids are consecutive). The feeds record each
reconnect here; the report shows the period's next to its trade-id gaps.
"""

from __future__ import annotations

from datetime import datetime

import psycopg


def record_reconnect(
    conn: psycopg.Connection,
    exchange: str,
    symbol: str,
    last_id_before: int | None,
    first_id_after: int | None,
    disconnected_at: datetime,
    reconnected_at: datetime | None,
) -> None:
    conn.execute(
        "INSERT INTO feed_reconnects (exchange, symbol, last_id_before, first_id_after,"
        " disconnected_at, reconnected_at) VALUES (%s, %s, %s, %s, %s, %s)",
        (exchange, symbol, last_id_before, first_id_after, disconnected_at, reconnected_at),
    )


def reconnects_between(conn: psycopg.Connection, start: datetime, end: datetime) -> list[dict]:
    """The reconnects whose drop lies in ``[start, end)``, oldest first."""
    cursor = conn.execute(
        "SELECT exchange, symbol, last_id_before, first_id_after, disconnected_at,"
        " reconnected_at FROM feed_reconnects WHERE disconnected_at >= %s"
        " AND disconnected_at < %s ORDER BY disconnected_at, exchange, symbol",
        (start, end),
    )
    names = [c.name for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
