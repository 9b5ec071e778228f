"""The worker's PostgreSQL side: one transaction per batch holds everything (SPEC §5).

The trades, candles, late and invalid rows of a batch, the partition's next offset, its
watermark, counters and open-window state are committed together, so a worker killed at any
instant resumes from exactly what was committed: nothing lost, nothing counted twice.

A *fence* makes this hold across rebalances too: each batch first locks its partition's progress
row and checks that the stored next offset is the one this worker resumed from. A worker that
lost the partition (a zombie) finds another offset there and its batch is rolled back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import psycopg
from psycopg.types.json import Jsonb

from shared.candles import Candle
from shared.trade_store import (
    InvalidMessage,
    copy_if_all_new,
    store_invalid,
    store_new_trades,
)
from shared.trades import Trade, ts_to_datetime
from shared.windows import Emission, LateTrade, PartitionWindows


class Fenced(Exception):
    """Another worker moved this partition on: drop it and resume from what is stored."""


@dataclass
class StoredProgress:
    """A partition's committed progress, as a worker resumes from it."""

    next_offset: int | None
    window_state: dict | None


@dataclass
class PartitionBatch:
    """The messages of one partition in one batch, parsed."""

    partition: int
    resumed_from: int | None  # next_offset stored when this batch started (None: no row yet)
    next_offset: int  # offset after the batch's last message
    trades: list[Trade] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # the offset of each of ``trades``
    invalid: list[InvalidMessage] = field(default_factory=list)
    consumed: int = 0
    _offset_by_key: dict[tuple[str, str, int], int] | None = field(default=None, repr=False)

    def offset_of(self, trade: Trade) -> int | None:
        """The offset of the first message in this batch that carried ``trade``'s key (a late
        trade's source; built on first use, as few batches have late trades)."""
        if self._offset_by_key is None:
            by_key: dict[tuple[str, str, int], int] = {}
            for t, offset in zip(self.trades, self.offsets, strict=True):
                by_key.setdefault(t.key, offset)
            self._offset_by_key = by_key
        return self._offset_by_key.get(trade.key)


@dataclass
class BatchResult:
    emission: Emission
    stored: int
    duplicates: int
    snapshot: dict  # the window state written with the batch


def load_progress(
    conn: psycopg.Connection, group: str, topic: str, partition: int
) -> StoredProgress:
    row = conn.execute(
        "SELECT next_offset, window_state FROM stream_progress"
        " WHERE consumer_group = %s AND topic = %s AND partition = %s",
        (group, topic, partition),
    ).fetchone()
    conn.rollback()
    return StoredProgress(row[0], row[1]) if row else StoredProgress(None, None)


def _fence(conn: psycopg.Connection, group: str, topic: str, batch: PartitionBatch) -> None:
    row = conn.execute(
        "SELECT next_offset FROM stream_progress"
        " WHERE consumer_group = %s AND topic = %s AND partition = %s FOR UPDATE",
        (group, topic, batch.partition),
    ).fetchone()
    stored = row[0] if row else None
    if stored != batch.resumed_from:
        raise Fenced(
            f"partition {batch.partition}: stored offset {stored}, this worker resumed from "
            f"{batch.resumed_from}"
        )


def write_batch(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    batch: PartitionBatch,
    windows: PartitionWindows,
    now_us: int,
) -> BatchResult:
    """Apply one partition's batch inside the caller's open transaction (the caller commits).

    ``windows`` is advanced in memory; if the transaction fails the caller restores it from the
    last committed snapshot.
    """
    _fence(conn, group, topic, batch)
    new = store_batch_trades(conn, batch.trades)
    emission = windows.process(new, now_us)
    write_candles(conn, emission.candles)
    write_late(conn, emission.late, batch)
    store_invalid(conn, batch.invalid)
    duplicates = len(batch.trades) - len(new)
    snapshot = windows.snapshot()
    write_progress(
        conn,
        group,
        topic,
        batch.partition,
        batch.next_offset,
        windows,
        consumed=batch.consumed,
        stored=len(new),
        duplicates=duplicates,
        invalid=len(batch.invalid),
        late=len(emission.late),
        snapshot=snapshot,
    )
    return BatchResult(emission, len(new), duplicates, snapshot)


#: Per (exchange, symbol), the greatest trade id this process has tried to store: a hint only
#: (see ``store_batch_trades``), never the authority on what is stored.
_tried_max_id: dict[tuple[str, str], int] = {}


def store_batch_trades(conn: psycopg.Connection, trades: Sequence[Trade]) -> list[Trade]:
    """Store a batch's trades and return the new ones (first copies), in arrival order: the
    result of ``store_new_trades``, faster in the common case.

    Copies inside the batch are dropped here (the first one wins). A trade whose id is above
    every id this process has tried to store for its symbol cannot be stored yet, unless the
    store was written by another process (a restart, a batch load): those go in with one COPY
    straight into ``trades`` inside a savepoint, which the server does in a single pass without
    a speculative insert per row. The others (disordered trades, repeats of earlier batches) and,
    if that COPY hits a stored trade after all, the whole batch take the exact path through the
    staging table. Either way the primary key decides, so the outcome is the same.
    """
    if not trades:
        return []
    firsts: dict[tuple[str, str, int, int], Trade] = {}
    keep = firsts.setdefault
    for t in trades:
        keep((t.exchange, t.symbol, t.trade_id, t.ts_us), t)
    unique = list(firsts.values())
    fresh: list[Trade] = []
    others: list[Trade] = []
    tried = _tried_max_id
    before = dict(tried)
    for t in unique:
        symbol = (t.exchange, t.symbol)
        trade_id = t.trade_id
        if trade_id > before.get(symbol, -1):
            fresh.append(t)
            if trade_id > tried.get(symbol, -1):
                tried[symbol] = trade_id
        else:
            others.append(t)
    if fresh and not _copy_all_new(conn, fresh):
        fresh, others = [], unique
    if not others:
        return unique
    new_others = store_new_trades(conn, others)
    if not fresh:
        return new_others
    # Merge back into arrival order: everything but the others that were not new.
    stored_before = {id(t) for t in others}.difference(map(id, new_others))
    if not stored_before:
        return unique
    return [t for t in unique if id(t) not in stored_before]


def _copy_all_new(conn: psycopg.Connection, trades: Sequence[Trade]) -> bool:
    """COPY the trades straight into ``trades``, or store none of them and return False if one
    is stored already. Trades must be distinct; times go as text, the minute's prefix cached.

    Runs inside the caller's transaction, as a savepoint (outside one, it would commit).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        raise RuntimeError("_copy_all_new must run inside the batch's transaction")
    return copy_if_all_new(conn, trades)


def write_tick(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    partition: int,
    resumed_from: int | None,
    emission: Emission,
    windows: PartitionWindows,
) -> None:
    """Persist an idle advance: candles it closed, the new watermark and state (no offsets)."""
    if resumed_from is None:
        return  # nothing consumed yet, nothing to advance
    _fence(conn, group, topic, PartitionBatch(partition, resumed_from, resumed_from))
    write_candles(conn, emission.candles)
    write_progress(conn, group, topic, partition, resumed_from, windows)


_CANDLE_COLUMNS = (
    "exchange, symbol, interval, window_start, window_end, open, high, low, close, volume,"
    " quote_volume, trade_count, first_trade_id, last_trade_id, taker_buy_volume,"
    " taker_buy_quote_volume, revision"
)


def _candle_row(c: Candle) -> tuple:
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
        c.revision,
    )


def write_candles(conn: psycopg.Connection, candles: Sequence[Candle]) -> None:
    """Upsert candles; a row is only replaced by a later revision of itself."""
    if not candles:
        return
    updates = ", ".join(
        f"{name} = EXCLUDED.{name}" for name in _CANDLE_COLUMNS.replace(" ", "").split(",")[4:]
    )
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO stream_candles ({_CANDLE_COLUMNS}) VALUES"
            f" ({', '.join(['%s'] * 17)})"
            " ON CONFLICT (exchange, symbol, interval, window_start) DO UPDATE SET"
            f" {updates}, updated_at = now()"
            " WHERE stream_candles.revision <= EXCLUDED.revision",
            [_candle_row(c) for c in candles],
        )


def write_late(conn: psycopg.Connection, late: Sequence[LateTrade], batch: PartitionBatch) -> None:
    if not late:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO late_trades (exchange, symbol, trade_id, ts, price, quantity,"
            " window_start, watermark, lateness, source_partition, source_offset)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [
                (
                    lt.trade.exchange,
                    lt.trade.symbol,
                    lt.trade.trade_id,
                    ts_to_datetime(lt.trade.ts_us),
                    lt.trade.price,
                    lt.trade.quantity,
                    ts_to_datetime(lt.window_start_us),
                    ts_to_datetime(lt.watermark_us),
                    timedelta(microseconds=lt.lateness_us),
                    batch.partition,
                    batch.offset_of(lt.trade),
                )
                for lt in late
            ],
        )


def write_progress(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    partition: int,
    next_offset: int,
    windows: PartitionWindows,
    *,
    consumed: int = 0,
    stored: int = 0,
    duplicates: int = 0,
    invalid: int = 0,
    late: int = 0,
    snapshot: dict | None = None,
) -> None:
    """Upsert the partition's progress row; ``snapshot``: ``windows.snapshot()`` if already
    taken."""
    clock = windows.clock
    watermark = None if clock.watermark_us is None else ts_to_datetime(clock.watermark_us)
    max_ts = None if clock.max_ts_us is None else ts_to_datetime(clock.max_ts_us)
    conn.execute(
        "INSERT INTO stream_progress (consumer_group, topic, partition, next_offset, watermark,"
        " max_trade_ts, window_state, consumed, stored, duplicates, invalid, late)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET"
        " next_offset = EXCLUDED.next_offset, watermark = EXCLUDED.watermark,"
        " max_trade_ts = EXCLUDED.max_trade_ts, window_state = EXCLUDED.window_state,"
        " consumed = stream_progress.consumed + EXCLUDED.consumed,"
        " stored = stream_progress.stored + EXCLUDED.stored,"
        " duplicates = stream_progress.duplicates + EXCLUDED.duplicates,"
        " invalid = stream_progress.invalid + EXCLUDED.invalid,"
        " late = stream_progress.late + EXCLUDED.late, updated_at = now()",
        (
            group,
            topic,
            partition,
            next_offset,
            watermark,
            max_ts,
            Jsonb(windows.snapshot() if snapshot is None else snapshot),
            consumed,
            stored,
            duplicates,
            invalid,
            late,
        ),
    )
