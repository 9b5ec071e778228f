"""Stream candles in PostgreSQL: each partition's part of a candle (``stream_candle_parts``) and
their merge (``stream_candles``), upserted in the caller's transaction (SPEC §4: a symbol's
trades may arrive on several partitions, and no partition's candle overwrites another's)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import psycopg

from shared.core.candles import Candle
from shared.core.trades import datetime_to_ts, ts_to_datetime

_CANDLE_COLUMNS = (
    "exchange, symbol, interval, window_start, window_end, open, high, low, close, volume,"
    " quote_volume, trade_count, first_trade_id, last_trade_id, taker_buy_volume,"
    " taker_buy_quote_volume"
)
_PART_COLUMNS = f"{_CANDLE_COLUMNS}, open_ts, close_ts, revision, topic, partition"
_PART_UPDATES = ", ".join(
    f"{name} = EXCLUDED.{name}"
    for name in _PART_COLUMNS.replace(" ", "").split(",")[4:-2]  # (not the key)
)


def _part_row(c: Candle, topic: str, partition: int) -> tuple:
    return (
        c.exchange,
        c.symbol,
        c.interval,
        ts_to_datetime(c.window_start_us),
        ts_to_datetime(c.window_end_us),
        c.open,
        c.high,
        c.low,
        c.close,
        c.volume,
        c.quote_volume,
        c.trade_count,
        c.first_trade_id,
        c.last_trade_id,
        c.taker_buy_volume,
        c.taker_buy_quote_volume,
        ts_to_datetime(c.open_ts_us),
        ts_to_datetime(c.close_ts_us),
        c.revision,
        topic,
        partition,
    )


def write_parts(
    conn: psycopg.Connection, topic: str, partition: int, candles: Sequence[Candle]
) -> None:
    """Upsert the partition's own parts of these candles (``stream_candle_parts``).

    A part is the partition's whole fold of the window, so it replaces the partition's earlier
    part (a later revision of itself) and nothing else: a worker restarted after a crash writes
    the same part again, never a second one.
    """
    if not candles:
        return
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO stream_candle_parts ({_PART_COLUMNS}) VALUES"
            f" ({', '.join(['%s'] * 21)})"
            " ON CONFLICT (exchange, symbol, interval, window_start, topic, partition)"
            f" DO UPDATE SET {_PART_UPDATES}, updated_at = now()"
            " WHERE stream_candle_parts.revision <= EXCLUDED.revision",
            [_part_row(c, topic, partition) for c in candles],
        )


def _lock_id(exchange: str, symbol: str, interval: str, window_start_us: int) -> int:
    """A candle key as a 64-bit advisory lock id (a collision only makes two keys wait for each
    other)."""
    digest = hashlib.blake2b(
        f"{exchange}\0{symbol}\0{interval}\0{window_start_us}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


#: The merge of every part of the given keys into ``stream_candles`` (the SQL twin of
#: ``Candle.absorb``: open and close of the earliest and latest (timestamp, trade id), sums,
#: extremes; a taker volume is NULL only where no part has one). A changed row's revision grows
#: by one; the merged candles come back with their open and close timestamps.
_MERGE = f"""
WITH keys(exchange, symbol, interval, window_start) AS (
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[])
),
merged AS (
    SELECT p.exchange, p.symbol, p.interval, p.window_start, min(p.window_end) AS window_end,
           min(ARRAY[extract(epoch FROM p.open_ts), p.first_trade_id, p.open]) AS first,
           max(ARRAY[extract(epoch FROM p.close_ts), p.last_trade_id, p.close]) AS last,
           max(p.high) AS high, min(p.low) AS low, sum(p.volume) AS volume,
           sum(p.quote_volume) AS quote_volume, sum(p.trade_count) AS trade_count,
           sum(p.taker_buy_volume) AS taker_buy_volume,
           sum(p.taker_buy_quote_volume) AS taker_buy_quote_volume,
           min(p.open_ts) AS open_ts, max(p.close_ts) AS close_ts
    FROM keys JOIN stream_candle_parts AS p USING (exchange, symbol, interval, window_start)
    GROUP BY 1, 2, 3, 4
),
written AS (
    INSERT INTO stream_candles ({_CANDLE_COLUMNS}, revision)
    SELECT exchange, symbol, interval, window_start, window_end, first[3], high, low, last[3],
           volume, quote_volume, trade_count, first[2]::bigint, last[2]::bigint,
           taker_buy_volume, taker_buy_quote_volume, 0
    FROM merged
    ON CONFLICT (exchange, symbol, interval, window_start) DO UPDATE SET
        {", ".join(f"{n} = EXCLUDED.{n}" for n in _CANDLE_COLUMNS.replace(" ", "").split(",")[4:])},
        revision = stream_candles.revision + 1, updated_at = now()
    RETURNING {_CANDLE_COLUMNS}, revision
)
SELECT w.*, m.open_ts, m.close_ts
FROM written AS w JOIN merged AS m USING (exchange, symbol, interval, window_start)
ORDER BY w.exchange, w.symbol, w.window_start, w.window_end
"""


def merge_parts(conn: psycopg.Connection, candles: Sequence[Candle]) -> psycopg.Cursor | None:
    """Recompute the ``stream_candles`` row of each of these candles' keys from all of its parts;
    the merged candles are read from the returned cursor with :func:`merged_candles` (in a
    pipeline: once it has synced).

    Workers write parts of one key from different partitions concurrently (other workers, the
    other writer connections). Each key is locked first (a transaction-scoped advisory lock,
    all of them in one sorted order so that two writers never wait on each other in a cycle),
    and only then merged, by a statement of its own: under READ COMMITTED it sees every part
    committed by the key's writers before it, and its own. The lock is held to the commit, so
    the next writer of the key merges after this one, and its revision is the higher one.
    """
    if not candles:
        return None
    keys = sorted({c.key for c in candles})
    locks = sorted({_lock_id(*key) for key in keys})
    conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k", (locks,))
    cur = conn.cursor()
    cur.execute(
        _MERGE,
        (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [ts_to_datetime(k[3]) for k in keys],
        ),
    )
    return cur


def merged_candles(cur: psycopg.Cursor | None) -> list[Candle]:
    """The merged candles :func:`merge_parts` wrote, with their ``stream_candles`` revision."""
    if cur is None:
        return []
    return [
        Candle(
            *row[:3],
            datetime_to_ts(row[3]),
            datetime_to_ts(row[4]),
            *row[5:16],
            open_ts_us=datetime_to_ts(row[17]),
            close_ts_us=datetime_to_ts(row[18]),
            revision=row[16],
        )
        for row in cur.fetchall()
    ]


def write_candles(
    conn: psycopg.Connection, candles: Sequence[Candle], topic: str, partition: int
) -> list[Candle]:
    """A partition's candles: its parts, then the merged candle of each key, returned (with
    the revision to publish). Inside the caller's transaction."""
    write_parts(conn, topic, partition, candles)
    return merged_candles(merge_parts(conn, candles))
