"""The worker's PostgreSQL side: one transaction per batch holds everything (SPEC §5).

The trades, candles, late and invalid rows of a batch, the partition's next offset, its
watermark, counters and open-window state are committed together, so a worker killed at any
instant resumes from exactly what was committed: nothing lost, nothing counted twice.

A *fence* makes this hold across rebalances too: each batch first locks its partition's progress
row and checks that the stored next offset is the one this worker resumed from. A worker that
lost the partition (a zombie) finds another offset there and its batch is rolled back.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
from psycopg.types.json import Jsonb

from shared.core.candles import Candle
from shared.core.trades import Trade, datetime_to_ts, ts_to_datetime
from shared.core.windows import Emission, LateTrade, PartitionWindows
from shared.store.trade_store import (
    COPY_TRADES,
    InvalidMessage,
    NewTrades,
    Source,
    count_conflicts,
    store_invalid,
    store_new_trades,
)


class Fenced(Exception):
    """Another worker moved this partition on: drop it and resume from what is stored."""


@dataclass
class StoredProgress:
    """A partition's committed progress, as a worker resumes from it."""

    next_offset: int | None
    window_state: dict | None
    last_digest: int | None = None  # of the message before next_offset (see record_digest)
    #: An ``offset_resets`` row (policy earliest) that no trade has been read after yet.
    pending_reset: int | None = None


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
    last_digest: int | None = None  # record_digest of the batch's last message
    #: An ``offset_resets`` row to complete with the time of the batch's first trade.
    reset_id: int | None = None
    #: ``prepare_trades(trades)``, done early (the worker does it while the batch before this
    #: one is written); None: done when the batch is written.
    prepared: PreparedTrades | None = None
    _offset_by_id: dict[int, int] | None = field(default=None, repr=False)

    def offset_of(self, trade: Trade) -> int | None:
        """The offset of the first message in this batch that carried ``trade``'s key (a late
        trade's source).

        The trades that reach the windows are the first copies, the very objects parsed from
        those messages: found by identity (a map built on first use, in C; the batch keeps its
        trades alive, so an id in it is that trade's), else by key.
        """
        return self.offsets_of([trade])[0]

    def offsets_of(self, trades: Sequence[Trade]) -> list[int | None]:
        """:meth:`offset_of` for each of ``trades`` (objects of this batch: by identity)."""
        if self._offset_by_id is None:
            self._offset_by_id = dict(zip(map(id, self.trades), self.offsets, strict=True))
        out: list[int | None] = []
        for trade in trades:
            offset = self._offset_by_id.get(id(trade))
            if offset is None:
                key = trade.key
                pairs = zip(self.trades, self.offsets, strict=True)
                offset = next((o for t, o in pairs if t.key == key), None)
            out.append(offset)
        return out


@dataclass
class BatchResult:
    emission: Emission
    stored: int
    duplicates: int
    conflicting: int = 0  # of the duplicates, those that differ from the stored first copy
    snapshot: dict | None = None  # the window state written with the batch (by record_batch)


def record_digest(key: bytes | None, value: bytes | None) -> int:
    """A fingerprint of one Kafka message (CRC-32 of its key and value): the one stored with the
    offsets tells whether the log still holds, before the stored position, the message the
    worker consumed there, or is another log (broker storage lost, topic recreated)."""
    return zlib.crc32(value or b"", zlib.crc32(key or b""))


def load_progress(
    conn: psycopg.Connection, group: str, topic: str, partition: int
) -> StoredProgress:
    row = conn.execute(
        "SELECT next_offset, window_state, last_digest, (SELECT max(id) FROM offset_resets r"
        "  WHERE r.consumer_group = p.consumer_group AND r.topic = p.topic"
        "  AND r.partition = p.partition AND r.policy = 'earliest' AND r.resumed_at IS NULL)"
        " FROM stream_progress p WHERE consumer_group = %s AND topic = %s AND partition = %s",
        (group, topic, partition),
    ).fetchone()
    conn.rollback()
    return StoredProgress(*row) if row else StoredProgress(None, None)


@dataclass
class OffsetReset:
    """A partition's stored position no longer in its log (SPEC §4 "Offset resets")."""

    partition: int
    kind: str  # beyond_end | replaced | before_start
    stored_offset: int
    log_start: int
    log_end: int
    policy: str  # earliest | fail
    watermark: datetime | None
    max_trade_ts: datetime | None

    @property
    def skipped(self) -> int:
        """Messages known to be passed over by going on from the log start: the deleted range
        (before_start), or those of a new log already gone before its start. What an old log
        held past the stored position is gone with it and not known."""
        if self.kind == "before_start":
            return self.log_start - self.stored_offset
        return self.log_start

    def describe(self, topic: str) -> str:
        where = f"partition {self.partition} of topic {topic}: stored offset {self.stored_offset}"
        if self.kind == "before_start":
            return (
                f"{where} is before the log's start {self.log_start} (retention deleted "
                f"{self.skipped} message(s) before they were consumed)"
            )
        if self.kind == "replaced":
            return (
                f"{where}, but the log (end {self.log_end}) holds another message before it "
                "(the broker lost its log or the topic was recreated)"
            )
        return (
            f"{where} is beyond the log's end {self.log_end} (the broker lost its log or the "
            "topic was recreated)"
        )


def record_reset(conn: psycopg.Connection, group: str, topic: str, reset: OffsetReset) -> int:
    """Record ``reset`` in ``offset_resets`` and, with policy ``earliest``, move the partition's
    progress to the log start (counting what that skips), in the caller's transaction; returns
    the row's id.

    A reset detected again at the same stored offset after a ``fail`` (the operator restarted
    with another policy) updates that row: one row per reset.
    """
    _fence(conn, group, topic, PartitionBatch(reset.partition, reset.stored_offset, 0))
    values = (
        reset.kind,
        reset.log_start,
        reset.log_end,
        reset.skipped,
        reset.policy,
        reset.watermark,
        reset.max_trade_ts,
    )
    row = conn.execute(
        "UPDATE offset_resets SET kind = %s, log_start_offset = %s, log_end_offset = %s,"
        " skipped = %s, policy = %s, watermark = %s, max_trade_ts = %s"
        " WHERE id = (SELECT max(id) FROM offset_resets WHERE consumer_group = %s"
        "  AND topic = %s AND partition = %s) AND policy = 'fail' AND stored_offset = %s"
        " RETURNING id",
        (*values, group, topic, reset.partition, reset.stored_offset),
    ).fetchone()
    if row is None:
        row = conn.execute(
            "INSERT INTO offset_resets (kind, log_start_offset, log_end_offset, skipped, policy,"
            " watermark, max_trade_ts, consumer_group, topic, partition, stored_offset)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (*values, group, topic, reset.partition, reset.stored_offset),
        ).fetchone()
    if reset.policy == "earliest":
        conn.execute(
            "UPDATE stream_progress SET next_offset = %s, skipped = skipped + %s,"
            " last_digest = NULL, updated_at = now()"
            " WHERE consumer_group = %s AND topic = %s AND partition = %s",
            (reset.log_start, reset.skipped, group, topic, reset.partition),
        )
    return row[0]


def _fence(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    batch: PartitionBatch,
    savepoint: str | None = None,
) -> None:
    """Lock the partition's progress row and check its offset; ``savepoint``: also take that
    savepoint, in the same round trip (as the transaction's ``BEGIN``)."""
    with conn.pipeline():
        cur = conn.execute(
            "SELECT next_offset FROM stream_progress"
            " WHERE consumer_group = %s AND topic = %s AND partition = %s FOR UPDATE",
            (group, topic, batch.partition),
        )
        if savepoint is not None:
            conn.execute(f"SAVEPOINT {savepoint}")
    row = cur.fetchone()
    stored = row[0] if row else None
    if stored != batch.resumed_from:
        raise Fenced(
            f"partition {batch.partition}: stored offset {stored}, this worker resumed from "
            f"{batch.resumed_from}"
        )


def apply_batch(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    batch: PartitionBatch,
    windows: PartitionWindows,
    now_us: int,
) -> BatchResult:
    """Apply one partition's batch inside the caller's open transaction, first half: the fence,
    the trades, and the windows they advance. What it emits (candles, late trades) is known
    from here on; :func:`record_batch` writes the rest, then the caller commits.

    ``windows`` is advanced in memory; if the transaction fails the caller restores it from the
    last committed snapshot.
    """
    prepared = batch.prepared if batch.prepared is not None else prepare_trades(batch.trades)
    _fence(conn, group, topic, batch, _FRESH_SAVEPOINT if prepared.fresh else None)
    source = _BatchSource(f"kafka:{topic}", batch)
    new, emission, conflicting = _store_and_fold(conn, prepared, windows, now_us, source)
    conflicting += _repeats_conflicting(conn, prepared, new, source.of(prepared.repeats))
    return BatchResult(emission, len(new), len(batch.trades) - len(new), conflicting)


def _repeats_conflicting(
    conn: psycopg.Connection, prepared: PreparedTrades, new: list[Trade], source: Source | None
) -> int:
    """Count (and keep) the conflicting ones among the batch's repeats. Their first copies are
    stored by now: where that is the batch's own (new) first copy, the comparison is made here
    and an exact copy costs nothing; else the stored one is read."""
    repeats = prepared.repeats
    if not repeats:
        return 0
    stored_here = set(map(id, new))
    first_of = {t.key: t for t in prepared.unique}
    firsts = [first_of[r.key] for r in repeats]
    known = [f if id(f) in stored_here else None for f in firsts]
    return count_conflicts(conn, repeats, source, known)


class _BatchSource:
    """The ``Source`` of some of a batch's trades (their offsets looked up only when needed: on
    the staging path, which is the only one that can meet a conflicting copy)."""

    def __init__(self, name: str, batch: PartitionBatch) -> None:
        self.name, self.batch = name, batch

    def of(self, trades: Sequence[Trade]) -> Source | None:
        if not trades:
            return None
        return Source(self.name, self.batch.partition, self.batch.offsets_of(trades))


def _store_and_fold(
    conn: psycopg.Connection,
    prepared: PreparedTrades,
    windows: PartitionWindows,
    now_us: int,
    source: _BatchSource | None = None,
) -> tuple[list[Trade], Emission, int]:
    """:func:`store_prepared`, then ``windows.process`` of the new trades, with the folding done
    while the server inserts the fresh trades' COPY (the client has sent it all by then).

    The others go first, through the staging table; the windows then fold the new trades on the
    assumption that the fresh ones are all new, which the COPY's success confirms. If the COPY
    meets a stored trade, everything goes back to the savepoint taken before (the others'
    rows too) and to the windows' state before the batch, and the whole batch takes the staging
    path, as in :func:`store_prepared`.
    """
    unique, fresh, others = prepared.unique, prepared.fresh, prepared.others
    of = source.of if source is not None else lambda trades: None
    if not fresh:
        stored = store_new_trades(conn, others, of(others))
        return stored.new, windows.process(stored.new, now_us), stored.conflicting
    conflicting = 0
    new = unique
    if others:
        stored = store_new_trades(conn, others, of(others))
        new, conflicting = _merge_new(unique, others, stored.new), stored.conflicting
    before = windows.snapshot()
    try:
        with conn.cursor().copy(COPY_TRADES) as copy:
            copy.write(prepared.fresh_rows)
            emission = windows.process(new, now_us)
    except psycopg.errors.UniqueViolation:
        conn.execute(f"ROLLBACK TO SAVEPOINT {_FRESH_SAVEPOINT}")
        windows.reset(before)
        stored = store_new_trades(conn, unique, of(unique))
        return stored.new, windows.process(stored.new, now_us), stored.conflicting
    return new, emission, conflicting


def _merge_new(unique: list[Trade], others: list[Trade], new_others: list[Trade]) -> list[Trade]:
    """``unique`` without those of ``others`` that are not in ``new_others``, in order."""
    stored_before = {id(t) for t in others}.difference(map(id, new_others))
    if not stored_before:
        return unique
    return [t for t in unique if id(t) not in stored_before]


def record_batch(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    batch: PartitionBatch,
    windows: PartitionWindows,
    result: BatchResult,
    merge: Sequence[Candle] = (),
) -> psycopg.Cursor | None:
    """The second half of a batch (after :func:`apply_batch`): the candles' parts, late and
    invalid rows, and the progress row with the offsets and window state, sent together (one
    round trip), with :func:`merge_parts` of ``merge`` last: the candles of every batch of the
    transaction, given with its last batch, after all of their parts. Returns its cursor."""
    emission = result.emission
    result.snapshot = windows.snapshot()
    with conn.pipeline():
        if batch.reset_id is not None and batch.trades:
            # The first trade read after an offset reset: the end of the event times that the
            # messages it skipped may have had.
            conn.execute(
                "UPDATE offset_resets SET resumed_at = %s WHERE id = %s AND resumed_at IS NULL",
                (ts_to_datetime(batch.trades[0].ts_us), batch.reset_id),
            )
        write_parts(conn, topic, batch.partition, emission.candles)
        write_late(conn, emission.late, batch)
        store_invalid(conn, batch.invalid)
        write_progress(
            conn,
            group,
            topic,
            batch.partition,
            batch.next_offset,
            windows,
            consumed=batch.consumed,
            stored=result.stored,
            duplicates=result.duplicates,
            conflicting=result.conflicting,
            invalid=len(batch.invalid),
            late=len(emission.late),
            snapshot=result.snapshot,
            last_digest=batch.last_digest,
        )
        return merge_parts(conn, merge)


#: Per (exchange, symbol), the greatest trade id this process has tried to store: a hint only
#: (see ``prepare_trades``), never the authority on what is stored.
_tried_max_id: dict[tuple[str, str], int] = {}


@dataclass
class PreparedTrades:
    """A batch's trades sorted for storing (see :func:`prepare_trades`)."""

    unique: list[Trade]  # first copies (by exchange, symbol, trade_id), in arrival order
    fresh: list[Trade]  # above every id tried before for their symbol
    others: list[Trade]
    fresh_rows: bytes  # ``fresh`` as rows of ``COPY trades`` (text format)
    #: Later copies of ids in ``unique`` (whatever their ts or price): duplicates, never folded;
    #: compared with the stored first copy once that is stored, to count conflicting ones.
    repeats: list[Trade] = field(default_factory=list)


def prepare_trades(trades: Sequence[Trade]) -> PreparedTrades:
    """Drop copies inside the batch (the first one in arrival order wins, whatever the copies'
    timestamps say: SPEC §2) and split the rest for :func:`store_prepared`; the fresh ones are
    already formatted for their COPY.

    A trade whose id is above every id this process has tried to store for its symbol cannot be
    stored yet, unless the store was written by another process (a restart, a batch load): those
    are *fresh*. Marks the batch's ids as tried (a hint for the next batches only).
    """
    firsts: dict[tuple[str, str, int], Trade] = {}
    keep = firsts.setdefault
    for t in trades:
        keep((t.exchange, t.symbol, t.trade_id), t)
    unique = list(firsts.values())
    repeats: list[Trade] = []
    if len(unique) != len(trades):
        first_ids = set(map(id, unique))
        repeats = [t for t in trades if id(t) not in first_ids]
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
    return PreparedTrades(unique, fresh, others, copy_rows(fresh), repeats)


def store_batch_trades(conn: psycopg.Connection, trades: Sequence[Trade]) -> list[Trade]:
    """Store a batch's trades and return the new ones (first copies), in arrival order: the
    result of ``store_new_trades``, faster in the common case (see :func:`store_prepared`)."""
    if not trades:
        return []
    return store_prepared(conn, prepare_trades(trades)).new


def store_prepared(
    conn: psycopg.Connection, prepared: PreparedTrades, *, savepoint_taken: bool = False
) -> NewTrades:
    """Store prepared trades and return the new ones, in arrival order, with the number of
    conflicting copies among the rest (the batch's repeats included).

    The fresh trades go in with one COPY straight into ``trades`` after a savepoint (the
    caller's when ``savepoint_taken``, named ``_FRESH_SAVEPOINT``), which the server does in a
    single pass without a speculative insert per row. The others (disordered trades, repeats of
    earlier batches) and, if that COPY hits a stored trade after all, the whole batch take the
    exact path through the staging table (``store_new_trades``). Either way the primary key
    decides, so the outcome is the same.
    """
    unique, fresh, others = prepared.unique, prepared.fresh, prepared.others
    if fresh:
        if not savepoint_taken:
            conn.execute(f"SAVEPOINT {_FRESH_SAVEPOINT}")
        if not _copy_rows_if_all_new(conn, prepared.fresh_rows):
            fresh, others = [], unique
    stored = store_new_trades(conn, others)
    new = stored.new if not fresh else _merge_new(unique, others, stored.new)  # arrival order
    # Repeats inside the batch last: their first copies are stored by now.
    return NewTrades(new, stored.conflicting + _repeats_conflicting(conn, prepared, new, None))


_FRESH_SAVEPOINT = "fresh_trades"
_COPY_BOOL = {True: "t", False: "f", None: "\\N"}
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_rows(trades: Sequence[Trade]) -> bytes:
    """Trades as rows of ``COPY trades (…) FROM STDIN`` in text format, as psycopg would write
    them: decimals as ``str()`` (exact), times as ISO text in UTC built from the microseconds
    (exact), the minute's prefix and each symbol's leading columns made once."""
    heads: dict[tuple[str, str], str] = {}
    rows = []
    add = rows.append
    minute_start = minute_end = 0
    prefix = ""
    for t in trades:
        ts = t.ts_us
        if not minute_start <= ts < minute_end:
            minute_start = ts - ts % 60_000_000
            minute_end = minute_start + 60_000_000
            prefix = ts_to_datetime(minute_start).strftime("%Y-%m-%d %H:%M:")
        key = (t.exchange, t.symbol)
        head = heads.get(key)
        if head is None:
            head = heads[key] = (
                f"{t.exchange.translate(_COPY_ESCAPES)}\t{t.symbol.translate(_COPY_ESCAPES)}\t"
            )
        us = ts - minute_start
        add(
            f"{head}{t.trade_id}\t{prefix}{us // 1_000_000:02d}.{us % 1_000_000:06d}+00\t"
            f"{t.price}\t{t.quantity}\t{_COPY_BOOL[t.is_buyer_maker]}\t{t.raw_trades}\n"
        )
    return "".join(rows).encode()


def _copy_rows_if_all_new(conn: psycopg.Connection, rows: bytes) -> bool:
    """COPY rows (from :func:`copy_rows`) straight into ``trades``, or store none of them and
    return False if one is stored already. Rows must be distinct trades.

    The caller has just taken the savepoint ``_FRESH_SAVEPOINT`` in its open transaction: a
    failed COPY goes back to it. (It is not released: it goes with the commit.)
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        raise RuntimeError("_copy_rows_if_all_new must run inside the batch's transaction")
    try:
        with conn.cursor().copy(COPY_TRADES) as copy:
            copy.write(rows)
    except psycopg.errors.UniqueViolation:
        conn.execute(f"ROLLBACK TO SAVEPOINT {_FRESH_SAVEPOINT}")
        return False  # nothing of the batch is stored
    return True


def write_tick(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    partition: int,
    resumed_from: int | None,
    emission: Emission,
    windows: PartitionWindows,
) -> list[Candle]:
    """Persist an idle advance: candles it closed, the new watermark and state (no offsets).
    Returns the merged candles to publish."""
    if resumed_from is None:
        return []  # nothing consumed yet, nothing to advance
    _fence(conn, group, topic, PartitionBatch(partition, resumed_from, resumed_from))
    merged = write_candles(conn, emission.candles, topic, partition)
    write_progress(conn, group, topic, partition, resumed_from, windows)
    return merged


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
    conflicting: int = 0,
    invalid: int = 0,
    late: int = 0,
    snapshot: dict | None = None,
    last_digest: int | None = None,
) -> None:
    """Upsert the partition's progress row; ``snapshot``: ``windows.snapshot()`` if already
    taken; ``last_digest``: that of the message before ``next_offset`` (None: unchanged)."""
    clock = windows.clock
    watermark = None if clock.watermark_us is None else ts_to_datetime(clock.watermark_us)
    max_ts = None if clock.max_ts_us is None else ts_to_datetime(clock.max_ts_us)
    conn.execute(
        "INSERT INTO stream_progress (consumer_group, topic, partition, next_offset, watermark,"
        " max_trade_ts, window_state, consumed, stored, duplicates, conflicting, invalid, late,"
        " last_digest)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET"
        " next_offset = EXCLUDED.next_offset, watermark = EXCLUDED.watermark,"
        " max_trade_ts = EXCLUDED.max_trade_ts, window_state = EXCLUDED.window_state,"
        " consumed = stream_progress.consumed + EXCLUDED.consumed,"
        " stored = stream_progress.stored + EXCLUDED.stored,"
        " duplicates = stream_progress.duplicates + EXCLUDED.duplicates,"
        " conflicting = stream_progress.conflicting + EXCLUDED.conflicting,"
        " invalid = stream_progress.invalid + EXCLUDED.invalid,"
        " late = stream_progress.late + EXCLUDED.late,"
        " last_digest = coalesce(EXCLUDED.last_digest, stream_progress.last_digest),"
        " updated_at = now()",
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
            conflicting,
            invalid,
            late,
            last_digest,
        ),
    )
