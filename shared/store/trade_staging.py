"""The exact path of storing trades (see ``shared.store.trade_store``): COPY into a temporary
staging table, then one insert that keeps first copies, and the conflicting copies counted and
kept in ``trade_conflicts``.

COPY cannot skip conflicts, so rows go to the staging table first (COPY is the fast path for bulk
rows), and ``INSERT … SELECT DISTINCT ON … ON CONFLICT DO NOTHING`` moves them into ``trades``:
the first copy of a trade wins, within a batch (by arrival order) and across batches (the primary
key). The staging table stores microseconds since the epoch and converts in SQL, exactly.
"""

from __future__ import annotations

import weakref
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
    kind text NOT NULL,
    source text,
    source_partition integer,
    source_offset bigint
) ON COMMIT DELETE ROWS
"""

_MOVE = f"""
INSERT INTO trades (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker, raw_trades,
                    kind)
SELECT DISTINCT ON (exchange, symbol, trade_id)
       exchange, symbol, trade_id, {_EPOCH_PLUS.format("ts_us")}, price, quantity,
       is_buyer_maker, raw_trades, kind
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
           t.kind AS first_kind,
           {_EPOCH_PLUS.format("s.ts_us")} AS ts, s.price, s.quantity, s.is_buyer_maker, s.kind,
           s.source, s.source_partition, s.source_offset, s.seq
    FROM trades_staging s
    CROSS JOIN LATERAL (
        SELECT t.ts, t.price, t.quantity, t.is_buyer_maker, t.kind FROM trades t
        WHERE t.exchange = s.exchange AND t.symbol = s.symbol AND t.trade_id = s.trade_id
        LIMIT 1  -- at most one row anyway (the key); keeps the planner from flattening this
                 -- into a hash join that scans all of `trades` for every batch (live p99 x5)
    ) t
    WHERE (t.ts, t.price, t.quantity, t.is_buyer_maker, t.kind)
          IS DISTINCT FROM ({_EPOCH_PLUS.format("s.ts_us")}, s.price, s.quantity, s.is_buyer_maker,
                            s.kind)
), kept AS (
    INSERT INTO trade_conflicts (exchange, symbol, trade_id, first_ts, first_price,
        first_quantity, first_is_buyer_maker, first_kind, ts, price, quantity, is_buyer_maker,
        kind, source, source_partition, source_offset)
    SELECT DISTINCT ON (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker, kind)
           exchange, symbol, trade_id, first_ts, first_price, first_quantity,
           first_is_buyer_maker, first_kind, ts, price, quantity, is_buyer_maker, kind, source,
           source_partition, source_offset
    FROM differing
    ORDER BY exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker, kind, seq
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM differing
"""


#: Connections whose staging table lasts their session (:func:`keep_staging_table`).
_KEPT: weakref.WeakSet[psycopg.Connection] = weakref.WeakSet()
#: Up to this many staged rows are emptied with DELETE, more with TRUNCATE. A TRUNCATE gives
#: the table a new file and updates the catalogue (~0.5 ms of server CPU, a stream batch's
#: largest statement after its COPY); DELETE costs a few µs a row, and the dead rows go at
#: the commit (``ON COMMIT DELETE ROWS``) or with a later TRUNCATE.
_DELETE_MAX = 10_000


def keep_staging_table(conn: psycopg.Connection) -> None:
    """Create the session's staging table and commit (no transaction may be open): a stream
    writer, which stages in most of its transactions, then saves a statement each time (and
    the server's "already exists" notice, which the worker logs)."""
    conn.execute(_STAGING)
    conn.commit()
    _KEPT.add(conn)


def _empty_staging(conn: psycopg.Connection, staged: int) -> None:
    conn.execute(
        "DELETE FROM trades_staging" if staged <= _DELETE_MAX else "TRUNCATE trades_staging"
    )


@dataclass
class StoreResult:
    """What a batch stored: the new trades (first copies, in arrival order), how many of the
    batch were copies of stored ones (duplicates) and, of those, how many differ from the stored
    first copy (conflicting)."""

    new: list[Trade]
    duplicates: int
    conflicting: int = 0

    @property
    def stored(self) -> int:
        return len(self.new)


@dataclass
class Source:
    """Where a batch of trades came from, for ``trade_conflicts``: ``kafka:<topic>`` and a
    partition, with each trade's offset (``offsets`` parallel to the trades)."""

    name: str
    partition: int | None = None
    offsets: Sequence[int | None] | None = None


_STAGING_TYPES = (
    "int8", "text", "text", "int8", "int8", "numeric", "numeric", "bool", "int4", "text",
    "text", "int4", "int8",
)  # fmt: skip


def stage(conn: psycopg.Connection, trades: Sequence[Trade], source: Source | None = None) -> None:
    """COPY trades into this transaction's staging table, in arrival order."""
    if conn not in _KEPT:
        conn.execute(_STAGING)
    name = partition = None
    offsets: Sequence[int | None] = ()
    if source is not None:
        name, partition, offsets = source.name, source.partition, source.offsets or ()
    with conn.cursor().copy(
        "COPY trades_staging (seq, exchange, symbol, trade_id, ts_us, price, quantity,"
        " is_buyer_maker, raw_trades, kind, source, source_partition, source_offset) FROM STDIN"
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
                    t.kind,
                    name,
                    partition,
                    offsets[seq] if seq < len(offsets) else None,
                )
            )


def store_staged(
    conn: psycopg.Connection, trades: Sequence[Trade], source: Source | None = None
) -> StoreResult:
    """The exact path: stage the trades and move the first copies of those not stored yet into
    ``trades``; returns the new ones, in arrival order, and the conflicting copies among the
    others."""
    if not trades:
        return StoreResult([], 0)
    stage(conn, trades, source)
    with conn.pipeline():  # one round trip for the three
        moved = conn.execute(_MOVE + " RETURNING exchange, symbol, trade_id")
        counted = conn.execute(_CONFLICTS)
        _empty_staging(conn, len(trades))
    rows = moved.fetchall()
    conflicting = counted.fetchone()[0]
    new = {tuple(r) for r in rows}
    out = []
    for trade in trades:
        key = (trade.exchange, trade.symbol, trade.trade_id)
        if key in new:
            new.discard(key)  # only the first copy in the batch
            out.append(trade)
    return StoreResult(out, len(trades) - len(out), conflicting)


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
                " first_quantity, first_is_buyer_maker, first_kind, ts, price, quantity,"
                " is_buyer_maker, kind, source, source_partition, source_offset)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
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
                        f.kind,
                        ts_to_datetime(c.ts_us),
                        c.price,
                        c.quantity,
                        c.is_buyer_maker,
                        c.kind,
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
        _empty_staging(conn, len(unknown))
    return conflicting


def _values(t: Trade) -> tuple:
    """What must agree between two copies of a trade (numbers by value, as in SQL)."""
    return (t.ts_us, t.price, t.quantity, t.is_buyer_maker, t.kind)
