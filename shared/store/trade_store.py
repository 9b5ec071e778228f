"""Storing trades: bulk COPY into a staging table, then one insert that keeps first copies.

A trade is its (exchange, symbol, trade_id) (SPEC §2), and that is the primary key of ``trades``:
PostgreSQL keeps one row per trade whatever path writes it. COPY cannot skip conflicts, so rows go
to a temporary staging table first (COPY is the fast path for bulk rows), and ``INSERT … SELECT
DISTINCT ON … ON CONFLICT DO NOTHING`` moves them into ``trades``. The first copy of a trade
wins, within a batch (by arrival order) and across batches (the primary key). Every staged copy
that differs from the stored first copy (its ts, price, quantity or side) is a *conflicting*
duplicate: counted, and kept once in ``trade_conflicts`` with both copies' values. The staging
table stores microseconds since the epoch and converts in SQL, exactly.

``store_trades`` (bulk loads) first tries the cheaper path for the common case of a batch of
new, distinct trades: COPY straight into ``trades`` inside a savepoint. The server then
inserts while the client is still encoding rows, and uses its multi-row insert, instead of a
second pass with a speculative insert per row: about twice as fast per batch. If any trade of
the batch is already stored or repeated in it, the primary key rejects the COPY, the savepoint
rolls it back, and the batch takes the staging path, so the outcome is the same either way. Such
a batch costs one wasted encoding (the client sends the whole COPY before it hears of the
conflict), and rows inserted before the conflict stay behind as dead tuples for vacuum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from shared.core.trades import Trade, ts_to_datetime

_EPOCH_PLUS = "timestamptz 'epoch' + {} * interval '1 microsecond'"

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS trades_staging (
    seq bigint NOT NULL,
    exchange text NOT NULL,
    symbol text NOT NULL,
    trade_id bigint NOT NULL,
    ts_us bigint NOT NULL,
    price numeric NOT NULL,
    quantity numeric NOT NULL,
    is_buyer_maker boolean,
    raw_trades integer NOT NULL,
    source text,
    source_partition integer,
    source_offset bigint
) ON COMMIT DELETE ROWS
"""

_MOVE = f"""
INSERT INTO trades (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker, raw_trades)
SELECT DISTINCT ON (exchange, symbol, trade_id)
       exchange, symbol, trade_id, {_EPOCH_PLUS.format("ts_us")}, price, quantity,
       is_buyer_maker, raw_trades
FROM trades_staging
ORDER BY exchange, symbol, trade_id, seq
ON CONFLICT DO NOTHING
"""

#: After ``_MOVE``, every trade of the staging table is stored: each staged copy that differs
#: from the stored (first) copy is a conflicting duplicate; its count is the result, and each
#: distinct one is kept (once: a copy seen again adds nothing). The lateral join makes each
#: staged row one probe of the key: the staging table has no statistics, and a hash join with a
#: scan of ``trades`` per batch would grow with the table.
_CONFLICTS = f"""
WITH differing AS (
    SELECT s.exchange, s.symbol, s.trade_id, t.ts AS first_ts, t.price AS first_price,
           t.quantity AS first_quantity, t.is_buyer_maker AS first_is_buyer_maker,
           {_EPOCH_PLUS.format("s.ts_us")} AS ts, s.price, s.quantity, s.is_buyer_maker,
           s.source, s.source_partition, s.source_offset, s.seq
    FROM trades_staging s
    CROSS JOIN LATERAL (
        SELECT t.ts, t.price, t.quantity, t.is_buyer_maker FROM trades t
        WHERE t.exchange = s.exchange AND t.symbol = s.symbol AND t.trade_id = s.trade_id
    ) t
    WHERE (t.ts, t.price, t.quantity, t.is_buyer_maker)
          IS DISTINCT FROM ({_EPOCH_PLUS.format("s.ts_us")}, s.price, s.quantity, s.is_buyer_maker)
), kept AS (
    INSERT INTO trade_conflicts (exchange, symbol, trade_id, first_ts, first_price,
        first_quantity, first_is_buyer_maker, ts, price, quantity, is_buyer_maker, source,
        source_partition, source_offset)
    SELECT DISTINCT ON (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker)
           exchange, symbol, trade_id, first_ts, first_price, first_quantity,
           first_is_buyer_maker, ts, price, quantity, is_buyer_maker, source, source_partition,
           source_offset
    FROM differing
    ORDER BY exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker, seq
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM differing
"""


@dataclass
class StoreResult:
    """How many trades were new and how many were copies of stored ones (of which
    ``conflicting`` differ from the stored first copy)."""

    stored: int
    duplicates: int
    conflicting: int = 0


@dataclass
class Source:
    """Where a batch of trades came from, for ``trade_conflicts``: ``kafka:<topic>`` and a
    partition, with each trade's offset (``offsets`` parallel to the trades)."""

    name: str
    partition: int | None = None
    offsets: Sequence[int | None] | None = None


@dataclass
class NewTrades:
    """What ``store_new_trades`` stored: the new trades (first copies, in arrival order) and how
    many of the others were conflicting copies."""

    new: list[Trade]
    conflicting: int


_STAGING_TYPES = (
    "int8", "text", "text", "int8", "int8", "numeric", "numeric", "bool", "int4",
    "text", "int4", "int8",
)  # fmt: skip
#: The one COPY into ``trades``: the loader streams rows into it, the stream worker sends text.
COPY_TRADES = (
    "COPY trades (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker, raw_trades)"
    " FROM STDIN"
)
#: ``ts`` goes as text (see ``copy_if_all_new``); the server parses it as a timestamptz.
_TRADES_TYPES = ("text", "text", "int8", "text", "numeric", "numeric", "bool", "int4")


def stage(conn: psycopg.Connection, trades: Sequence[Trade], source: Source | None = None) -> None:
    """COPY trades into this transaction's staging table, in arrival order."""
    conn.execute(_STAGING)
    name = partition = None
    offsets: Sequence[int | None] = ()
    if source is not None:
        name, partition, offsets = source.name, source.partition, source.offsets or ()
    with conn.cursor().copy(
        "COPY trades_staging (seq, exchange, symbol, trade_id, ts_us, price, quantity,"
        " is_buyer_maker, raw_trades, source, source_partition, source_offset) FROM STDIN"
    ) as copy:
        copy.set_types(_STAGING_TYPES)  # known types: no per-value type dispatch
        write_row = copy.write_row
        for seq, t in enumerate(trades):
            write_row(
                (
                    seq,
                    t.exchange,
                    t.symbol,
                    t.trade_id,
                    t.ts_us,
                    t.price,
                    t.quantity,
                    t.is_buyer_maker,
                    t.raw_trades,
                    name,
                    partition,
                    offsets[seq] if seq < len(offsets) else None,
                )
            )


def copy_if_all_new(conn: psycopg.Connection, trades: Sequence[Trade]) -> bool:
    """COPY the trades straight into ``trades`` if none is stored yet or repeated in the batch;
    otherwise store nothing and return False.

    Times go as ISO text built from the microseconds (exact), the minute's prefix cached:
    several times cheaper than making and dumping a datetime per trade.
    """
    minute = -1
    prefix = ""
    try:
        with conn.transaction(), conn.cursor().copy(COPY_TRADES) as copy:
            copy.set_types(_TRADES_TYPES)
            write_row = copy.write_row
            for t in trades:
                trade_minute, us = divmod(t.ts_us, 60_000_000)
                if trade_minute != minute:
                    minute = trade_minute
                    prefix = ts_to_datetime(minute * 60_000_000).strftime("%Y-%m-%d %H:%M:")
                second, us = divmod(us, 1_000_000)
                write_row(
                    (
                        t.exchange,
                        t.symbol,
                        t.trade_id,
                        f"{prefix}{second:02d}.{us:06d}+00",
                        t.price,
                        t.quantity,
                        t.is_buyer_maker,
                        t.raw_trades,
                    )
                )
    except psycopg.errors.UniqueViolation:
        return False  # the savepoint is rolled back: nothing of the batch is stored
    return True


def store_trades(
    conn: psycopg.Connection, trades: Sequence[Trade], source: Source | None = None
) -> StoreResult:
    """Insert trades, first copy wins; the caller commits.

    Needs an open transaction (not autocommit). A batch of new, distinct trades goes in with
    one COPY; any other batch through the staging table (see the module's docstring).
    """
    if not trades:
        return StoreResult(0, 0)
    if copy_if_all_new(conn, trades):
        return StoreResult(len(trades), 0)
    stage(conn, trades, source)
    stored = conn.execute(_MOVE).rowcount
    conflicting = 0
    if stored < len(trades):  # (a join of the whole chunk: only when it holds copies)
        conflicting = conn.execute(_CONFLICTS).fetchone()[0]
    conn.execute("TRUNCATE trades_staging")
    return StoreResult(stored, len(trades) - stored, conflicting)


def store_new_trades(
    conn: psycopg.Connection, trades: Sequence[Trade], source: Source | None = None
) -> NewTrades:
    """Insert trades and return the ones that were new (first copies), in arrival order, with
    the number of conflicting copies among the others.

    The stream worker feeds exactly these to the windowing core: a duplicate of a stored trade,
    however late it comes and whatever timestamp it carries, never reaches a candle.
    """
    if not trades:
        return NewTrades([], 0)
    stage(conn, trades, source)
    with conn.pipeline():  # one round trip for the three (the stream's batches are small)
        moved = conn.execute(_MOVE + " RETURNING exchange, symbol, trade_id")
        counted = conn.execute(_CONFLICTS)
        conn.execute("TRUNCATE trades_staging")
    rows = moved.fetchall()
    conflicting = counted.fetchone()[0]
    new = {tuple(r) for r in rows}
    out = []
    for trade in trades:
        key = (trade.exchange, trade.symbol, trade.trade_id)
        if key in new:
            new.discard(key)  # only the first copy in the batch
            out.append(trade)
    return NewTrades(out, conflicting)


def count_conflicts(
    conn: psycopg.Connection,
    copies: Sequence[Trade],
    source: Source | None = None,
    firsts: Sequence[Trade | None] | None = None,
) -> int:
    """Of copies of trades already stored, how many differ from the stored first copy; keep
    each distinct one in ``trade_conflicts``. (The stream drops repeats inside a batch before
    storing; their first copies must be stored when this runs.)

    ``firsts``, parallel to ``copies``: a copy's first copy where the caller knows it is the
    stored one (it stored it in this transaction), so that an exact copy costs no statement; a
    None is looked up in ``trades``.
    """
    pairs = list(zip(copies, firsts or [None] * len(copies), strict=True))
    differing = [
        (n, c, f) for n, (c, f) in enumerate(pairs) if f is None or _values(c) != _values(f)
    ]
    known = [(n, c, f) for n, c, f in differing if f is not None]
    unknown = [c for _, c, f in differing if f is None]
    offsets = source.offsets if source is not None and source.offsets else None
    if known:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO trade_conflicts (exchange, symbol, trade_id, first_ts, first_price,"
                " first_quantity, first_is_buyer_maker, ts, price, quantity, is_buyer_maker,"
                " source, source_partition, source_offset)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                [
                    (
                        c.exchange,
                        c.symbol,
                        c.trade_id,
                        ts_to_datetime(f.ts_us),
                        f.price,
                        f.quantity,
                        f.is_buyer_maker,
                        ts_to_datetime(c.ts_us),
                        c.price,
                        c.quantity,
                        c.is_buyer_maker,
                        source.name if source is not None else None,
                        source.partition if source is not None else None,
                        offsets[n] if offsets is not None else None,
                    )
                    for n, c, f in known
                ],
            )
    conflicting = len(known)
    if unknown:
        unknown_source = None
        if source is not None:
            unknown_offsets = (
                [offsets[n] for n, _, f in differing if f is None] if offsets else None
            )
            unknown_source = Source(source.name, source.partition, unknown_offsets)
        stage(conn, unknown, unknown_source)
        conflicting += conn.execute(_CONFLICTS).fetchone()[0]
        conn.execute("TRUNCATE trades_staging")
    return conflicting


def _values(t: Trade) -> tuple:
    """What must agree between two copies of a trade (numbers by value, as in SQL)."""
    return (t.ts_us, t.price, t.quantity, t.is_buyer_maker)


@dataclass
class InvalidMessage:
    """A rejected message, kept raw with its reason and where it came from.

    ``source`` is ``kafka:<topic>`` or a file path; ``partition`` is -1 for files and
    ``offset`` the line number, so storing the same message twice adds nothing.
    """

    source: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    code: str
    reason: str


def store_invalid(conn: psycopg.Connection, messages: Sequence[InvalidMessage]) -> int:
    """Insert invalid messages (idempotent by source and offset); return how many were new."""
    if not messages:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO invalid_trades (source, source_partition, source_offset, message_key,"
            " raw, reason_code, reason) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            [(m.source, m.partition, m.offset, m.key, m.raw, m.code, m.reason) for m in messages],
        )
        return cur.rowcount
