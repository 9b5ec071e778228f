"""The view ``candles`` on a day of 20 symbols: the plan and time of reading one symbol's 1m
candles for the day (docs/storage.md, "The view candles").

Fills a scratch database (``DATABASE_URL``'s server, a database of its own, dropped afterwards)
with a day of stream and batch candles for 20 symbols in 1m, 5m, 15m and 1h (1% of the keys
differ, with a ``late`` mismatch row; 1% of the batch keys have no stream candle), analyses the
tables, and prints ``EXPLAIN (ANALYZE, BUFFERS)`` of the read.

Usage: ``DATABASE_URL=postgresql://… .venv/bin/python bench/candles_view.py``
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.store import db

LENGTHS = {"1m": "1 minute", "5m": "5 minutes", "15m": "15 minutes", "1h": "1 hour"}
FILL = """
INSERT INTO {table} (exchange, symbol, interval, window_start, window_end, open, high, low,
    close, volume, quote_volume, trade_count, first_trade_id, last_trade_id)
SELECT 'binance', 'SYM' || s, %(name)s, w, w + %(len)s::interval, 100, 101, 99,
       100 + CASE WHEN {differs} THEN 1 ELSE 0 END, 10, 1000, 50, 1, 50
FROM generate_series(1, 20) AS s,
     generate_series(timestamptz '2026-01-01', timestamptz '2026-01-02' - %(len)s::interval,
                     %(len)s::interval) AS w
WHERE {keep}
"""
HASH = "abs(hashtext(s || w::text)) %% 100"
READ_DAY = (
    "SELECT * FROM candles WHERE exchange = 'binance' AND symbol = 'SYM7' AND interval = '1m'"
    " AND window_start >= '2026-01-01' AND window_start < '2026-01-02'"
)


def fill_day(conn: psycopg.Connection) -> None:
    """A day of 20 symbols' candles in both tables, their mismatch rows, analysed and committed.

    The test of the view's plan uses it too: a plan read from empty tables depends on whatever
    statistics earlier writers left, so it is read from a realistic day instead.
    """
    for interval, length in LENGTHS.items():
        params = {"name": interval, "len": length}
        conn.execute(FILL.format(table="batch_candles", differs=f"{HASH} = 1", keep="true"), params)
        conn.execute(
            FILL.format(table="stream_candles", differs="false", keep=f"{HASH} <> 2"), params
        )
    # Analysed before the join below: statistics of tables that were small (the tests') would
    # make it a nested loop over 37k × 37k rows.
    conn.execute("ANALYZE stream_candles, batch_candles")
    conn.execute(
        "INSERT INTO candle_mismatches (exchange, symbol, interval, window_start, kind,"
        " differences) SELECT b.exchange, b.symbol, b.interval, b.window_start, 'late',"
        " '{}' FROM batch_candles b JOIN stream_candles s USING (exchange, symbol,"
        " interval, window_start) WHERE b.close <> s.close"
    )
    conn.execute("ANALYZE candle_mismatches")
    conn.commit()


def main() -> None:
    server = os.environ["DATABASE_URL"]
    name = f"candles_view_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = server.rsplit("/", 1)[0] + "/" + name
    try:
        db.upgrade(url)
        with db.connect(url) as conn:
            fill_day(conn)
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM stream_candles), (SELECT count(*) FROM"
                " batch_candles), (SELECT count(*) FROM candle_mismatches)"
            ).fetchone()
            print(f"stream_candles {counts[0]}, batch_candles {counts[1]}, mismatches {counts[2]}")
            for _ in range(3):  # warm
                plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + READ_DAY).fetchall()
            print("\n".join(r[0] for r in plan))
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
