"""The period's trade-id gaps, from the stored trades, in SQL (SPEC §6.1; authoritative).

At exchanges whose ids are consecutive per symbol (``CANDLEKEEP_CONSECUTIVE_ID_EXCHANGES``), a
hole among a symbol's ids is trades the feed never delivered. The stream records holes live (its
``trade_gaps`` rows are the early warning); the batch run finds every hole again from what is
stored: among the ids of the trades of ``[start, end)``, and between the period's first trade
and the stored trade just before it (by id: a feed that was down across the period's start).
A hole after the period's last trade is the next period's to find. A symbol's first trade ever
has nothing before it: no gap. Holes go to ``trade_gaps`` (``detected_by = 'batch'``; a hole the
stream already recorded is that row, through ``shared.store.trade_gaps``, which checks every
hole against the stored trades and the recorded gaps once more).

The trades never travel into Python: one statement counts each symbol's ids in the period (a
hash aggregate), and walks in key order only the ids of the symbols whose count, first and last
id and the trade before leave room for a hole: sorting every trade of a busy hour by symbol and
id cost ~5 µs a trade, most symbols have no hole.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from shared.batch.recompute import fold_settings
from shared.core.continuity import Gap
from shared.core.trades import datetime_to_ts
from shared.store import trade_gaps

_HOLES = """
WITH period AS MATERIALIZED (
    SELECT exchange, symbol, trade_id, ts FROM trades
    WHERE ts >= %(start)s AND ts < %(end)s AND exchange = ANY(%(exchanges)s)
),
spans AS (
    SELECT exchange, symbol, min(trade_id) AS first_id, max(trade_id) AS last_id,
           count(*) AS trades
    FROM period GROUP BY 1, 2
),
before AS (
    SELECT s.exchange, s.symbol, b.trade_id, b.ts, s.first_id, s.last_id, s.trades FROM spans AS s
    LEFT JOIN LATERAL (
        SELECT t.trade_id, t.ts FROM trades AS t
        WHERE t.exchange = s.exchange AND t.symbol = s.symbol AND t.trade_id < s.first_id
        ORDER BY t.trade_id DESC LIMIT 1
    ) AS b ON true
),
holed AS (  -- ids not consecutive from the trade before through the last: a hole somewhere
    SELECT exchange, symbol, trade_id, ts FROM before
    WHERE trades < last_id - first_id + 1 OR trade_id < first_id - 1
),
steps AS (
    SELECT exchange, symbol, trade_id, ts,
           lag(trade_id) OVER w AS prev_id, lag(ts) OVER w AS prev_ts
    FROM (
        SELECT * FROM period WHERE (exchange, symbol) IN (SELECT exchange, symbol FROM holed)
        UNION ALL
        SELECT * FROM holed WHERE trade_id IS NOT NULL
    ) AS ids
    WINDOW w AS (PARTITION BY exchange, symbol ORDER BY trade_id)
)
SELECT exchange, symbol, prev_id + 1, trade_id - 1, prev_ts, ts
FROM steps WHERE trade_id > prev_id + 1
ORDER BY 1, 2, 3
"""


def _holes(
    conn: psycopg.Connection, start: datetime, end: datetime, exchanges: frozenset[str]
) -> list[tuple]:
    # The period's ids are held once (materialized) and hashed at the folds' work_mem, not
    # spilled to disk at the default 4 MB (a busy hour holds a million trades); the folds'
    # other settings (JIT off, sorts discouraged) leave this plan as it is: its one sort, the
    # walk of the holed symbols' ids, has no alternative.
    with fold_settings(conn):
        return conn.execute(
            _HOLES, {"start": start, "end": end, "exchanges": sorted(exchanges)}
        ).fetchall()


def find_gaps(
    conn: psycopg.Connection, start: datetime, end: datetime, exchanges: frozenset[str]
) -> dict[str, int]:
    """Find and record the period's holes. Returns ``{"found": n, "new": n}`` (``new``: not
    recorded before, by the stream or an earlier run)."""
    holes = [
        Gap(exchange, symbol, first, last, datetime_to_ts(before), datetime_to_ts(after))
        for exchange, symbol, first, last, before, after in _holes(conn, start, end, exchanges)
    ]
    recorded = trade_gaps.gaps_of(trade_gaps.record_gaps(conn, holes, detected_by="batch"))
    return {"found": len(holes), "new": len(recorded)}


def open_gaps(conn: psycopg.Connection, start: datetime, end: datetime) -> list[dict]:
    """The open ``trade_gaps`` rows whose missing trades may lie in ``[start, end)``."""
    return trade_gaps.open_gaps(conn, start, end)


def missing_in(gaps: list[dict], exchange: str, symbol: str, start_us: int, end_us: int) -> int:
    """The trades ``gaps`` may hold in one window ``[start_us, end_us)`` of a symbol: every gap
    whose neighbours' times meet the window counts whole (its trades lie between them)."""
    return sum(
        g["last_missing_id"] - g["first_missing_id"] + 1
        for g in gaps
        if g["exchange"] == exchange
        and g["symbol"] == symbol
        and datetime_to_ts(g["before_ts"]) < end_us
        and datetime_to_ts(g["after_ts"]) >= start_us
    )
