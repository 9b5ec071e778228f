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
    COPY_TRADES,
    InvalidMessage,
    NewTrades,
    Source,
    count_conflicts,
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
) -> None:
    """The second half of a batch (after :func:`apply_batch`): candles, late and invalid rows,
    and the progress row with the offsets and window state, sent together (one round trip)."""
    emission = result.emission
    result.snapshot = windows.snapshot()
    with conn.pipeline():
        write_candles(conn, emission.candles)
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
        )


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
    conflicting: int = 0,
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
        " max_trade_ts, window_state, consumed, stored, duplicates, conflicting, invalid, late)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET"
        " next_offset = EXCLUDED.next_offset, watermark = EXCLUDED.watermark,"
        " max_trade_ts = EXCLUDED.max_trade_ts, window_state = EXCLUDED.window_state,"
        " consumed = stream_progress.consumed + EXCLUDED.consumed,"
        " stored = stream_progress.stored + EXCLUDED.stored,"
        " duplicates = stream_progress.duplicates + EXCLUDED.duplicates,"
        " conflicting = stream_progress.conflicting + EXCLUDED.conflicting,"
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
            conflicting,
            invalid,
            late,
        ),
    )
