"""Storing trades, the one way: first copy wins (SPEC §2), the same for ``load``, the stream
worker and the tests.

A trade is its (exchange, symbol, trade_id), and that is the primary key of ``trades``:
PostgreSQL keeps one row per trade whatever writes it. :func:`prepare_trades` drops the copies
inside a batch (the first in arrival order wins) and splits the rest: the *fresh* trades, whose
ids are above every id tried before for their symbol, go in with one COPY straight into
``trades`` after a savepoint, which the server does in a single pass with its multi-row insert
(about twice as fast as the exact path). The *others* (disordered trades, repeats of earlier
batches) take the exact path: COPY into a temporary staging table, then one
``INSERT … SELECT DISTINCT ON … ON CONFLICT DO NOTHING``. If the fresh COPY meets a stored trade
after all (another process stored it: a restart, a batch load), the savepoint rolls it back and
the whole batch takes the exact path. Either way the primary key decides, so the outcome is the
same; such a batch costs one wasted encoding.

Every copy that differs from the stored first copy (its ts, price, quantity, side or kind) is a
*conflicting* duplicate: counted, and kept once in ``trade_conflicts`` with both copies'
values. Times go as exact text built from the microseconds or, in the staging table, as
microseconds converted in SQL; numbers as ``Decimal``/``NUMERIC``.

The rows of that COPY are encoded two ways, for speed, and a test holds that both store the
same rows (``tests/test_stream_sink.py``): :func:`copy_rows` builds a stream batch's rows ahead,
as bytes, in the worker's parse stage, off its writers' path; :func:`_copy_all_new` has psycopg's
C dumpers write ``load``'s 100,000-trade chunks row by row as they are sent, so that the server
inserts while the client encodes (one chunk through :func:`copy_rows` took ~40% more wall time
and client CPU, measured on a shared 2-CPU machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg

from shared.core.trades import Trade, ts_to_datetime
from shared.store.stale_periods import UNKNOWN, mark_stale
from shared.store.trade_staging import Source, StoreResult, count_conflicts, store_staged

#: The one COPY into ``trades`` (its rows: :func:`copy_rows`, or :func:`_copy_all_new`).
COPY_TRADES = (
    "COPY trades (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker, raw_trades,"
    " kind) FROM STDIN"
)
#: ``ts`` goes as text (see ``_copy_all_new``); the server parses it as a timestamptz.
_TRADES_TYPES = ("text", "text", "int8", "text", "numeric", "numeric", "bool", "int4", "text")


#: Where some of a batch's trades came from (None: not known), asked only when needed: on the
#: staging path, the only one that can meet a conflicting copy.
SourceOf = Callable[[Sequence[Trade]], "Source | None"]


@dataclass
class PreparedTrades:
    """A batch's trades sorted for storing (see :func:`prepare_trades`)."""

    unique: list[Trade]  # first copies (by exchange, symbol, trade_id), in arrival order
    fresh: list[Trade]  # above every id tried before for their symbol
    others: list[Trade]
    fresh_rows: bytes  # ``fresh`` as rows of ``COPY trades`` (:func:`copy_rows`)
    #: Later copies of ids in ``unique`` (whatever their ts or price): duplicates, never folded;
    #: compared with the stored first copy once that is stored, to count conflicting ones.
    repeats: list[Trade] = field(default_factory=list)
    #: The first copy of each trade, by its key (the repeats' are compared with it).
    firsts: dict[tuple[str, str, int], Trade] = field(default_factory=dict)


def prepare_trades(
    trades: Sequence[Trade], tried: dict[tuple[str, str], int] | None = None
) -> PreparedTrades:
    """Drop copies inside the batch (the first one in arrival order wins, whatever the copies'
    timestamps say: SPEC §2) and split the rest for :func:`store_prepared`; the fresh ones are
    already encoded for their COPY (a caller may do this off its writing path).

    ``tried``: per (exchange, symbol), the greatest trade id its owner (a stream worker) has
    tried to store; updated with the batch's ids. A trade above it cannot be stored yet, unless
    another process wrote the store: those are *fresh*. A hint only, never the authority on what
    is stored (None: nothing tried, every first copy is fresh).
    """
    # One pass: a trade is a repeat or a first copy, and a first copy fresh or not.
    firsts: dict[tuple[str, str, int], Trade] = {}
    repeats: list[Trade] = []
    fresh: list[Trade] = []
    others: list[Trade] = []
    before = dict(tried) if tried is not None else None
    for t in trades:
        trade_id = t.trade_id
        key = (t.exchange, t.symbol, trade_id)
        if key in firsts:
            repeats.append(t)
            continue
        firsts[key] = t
        if before is None:
            continue
        symbol = (t.exchange, t.symbol)
        if trade_id > before.get(symbol, -1):
            fresh.append(t)
            if trade_id > tried.get(symbol, -1):  # type: ignore[union-attr]
                tried[symbol] = trade_id  # type: ignore[index]
        else:
            others.append(t)
    unique = list(firsts.values())
    if before is None:
        fresh = unique
    return PreparedTrades(unique, fresh, others, copy_rows(fresh), repeats, firsts)


_COPY_BOOL = {True: "t", False: "f", None: "\\N"}
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_rows(trades: Sequence[Trade]) -> bytes:
    """Trades as rows of :data:`COPY_TRADES` in text format, as :func:`_copy_all_new` writes
    them: decimals as ``str()`` (exact), times as ISO text in UTC built from the microseconds
    (exact), the minute's prefix and each symbol's leading columns made once. (The stream
    worker's encoder: see the module's docstring.)"""
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
            f"{t.price}\t{t.quantity}\t{_COPY_BOOL[t.is_buyer_maker]}\t{t.raw_trades}\t{t.kind}\n"
        )
    return "".join(rows).encode()


def _copy_all_new(conn: psycopg.Connection, trades: Sequence[Trade]) -> bool:
    """COPY the trades straight into ``trades`` if none is stored yet or repeated in the batch;
    otherwise store nothing and return False (a savepoint, or the transaction, rolls it back).

    Rows as :func:`copy_rows` encodes them, by psycopg's own dumpers (see the module's
    docstring): times as ISO text built from the microseconds (exact), the minute's prefix
    cached, several times cheaper than making and dumping a datetime per trade.
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
                        t.kind,
                    )
                )
    except psycopg.errors.UniqueViolation:
        return False  # the savepoint is rolled back: nothing of the batch is stored
    return True


#: The savepoint taken before the fresh trades' COPY (a caller may take it itself, see
#: ``store_prepared``'s ``savepoint_taken``).
FRESH_SAVEPOINT = "fresh_trades"


def store_trades(
    conn: psycopg.Connection,
    trades: Sequence[Trade],
    source: Source | None = None,
    *,
    tried: dict[tuple[str, str], int] | None = None,
) -> StoreResult:
    """Store trades, first copy wins, in the caller's open transaction (the caller commits);
    ``source``: where they came from (offsets parallel to ``trades``). The reconciled periods
    the new trades fall in are marked stale in the same transaction
    (``shared.store.stale_periods``).

    ``tried`` (a stream worker's, see :func:`prepare_trades`): the batch is prepared and stored
    by :func:`store_prepared`. Without it (``load``'s large chunks, where nothing is known
    ahead) the whole batch is first tried with one COPY, encoded as it is sent, and takes the
    exact path if any of it is stored already or repeated in it.
    """
    if not trades:
        return StoreResult([], 0)
    if tried is None:
        if _copy_all_new(conn, trades):
            stored = StoreResult(list(trades), 0)
        else:
            stored = store_staged(conn, trades, source)
        mark_stale(conn, stored.new)
        return stored
    source_of = None
    if source is not None:
        offset_of = dict(zip(map(id, trades), source.offsets or (), strict=False))
        source_of = lambda some: Source(  # noqa: E731
            source.name, source.partition, [offset_of.get(id(t)) for t in some]
        )
    return store_prepared(conn, prepare_trades(trades, tried), source_of)


def store_prepared(
    conn: psycopg.Connection,
    prepared: PreparedTrades,
    source_of: SourceOf | None = None,
    *,
    savepoint_taken: bool = False,
    fold: Callable[[list[Trade]], object] | None = None,
    reconciled_until=UNKNOWN,
) -> StoreResult:
    """Store prepared trades (see the module's docstring) in the caller's open transaction.

    ``savepoint_taken``: the caller took :data:`FRESH_SAVEPOINT` already (in the round trip of
    its own first statement). ``fold``: called with the new trades, in arrival order, as soon as
    they are presumed known: the stream worker folds them into its windows while the server
    inserts the fresh ones' COPY (the client has sent it all by then). If that COPY meets a
    stored trade, ``fold`` is called again with the new trades as they turn out, and the caller
    must let that call replace the first. ``reconciled_until``: the end of the newest reconciled
    period, if the caller read it in this transaction already (the stream's fence does): then
    only a trade older than it costs a statement (``shared.store.stale_periods.mark_stale``).
    """
    unique, fresh, others = prepared.unique, prepared.fresh, prepared.others
    of = source_of or (lambda trades: None)
    if fresh and not savepoint_taken:  # (before the others: a failed COPY undoes them too)
        conn.execute(f"SAVEPOINT {FRESH_SAVEPOINT}")
    stored = store_staged(conn, others, of(others)) if others else StoreResult([], 0)
    new = stored.new
    if fresh:
        new = _merge_new(unique, others, stored.new)  # arrival order
        try:
            with conn.cursor().copy(COPY_TRADES) as copy:
                copy.write(prepared.fresh_rows)
                if fold is not None:
                    fold(new)
        except psycopg.errors.UniqueViolation:
            conn.execute(f"ROLLBACK TO SAVEPOINT {FRESH_SAVEPOINT}")  # the others' rows too
            stored = store_staged(conn, unique, of(unique))
            new = stored.new
            if fold is not None:
                fold(new)
    elif fold is not None:
        fold(new)
    # Repeats inside the batch last: their first copies are stored by now.
    conflicting = stored.conflicting + _repeats_conflicting(conn, prepared, new, of)
    mark_stale(conn, new, reconciled_until)
    return StoreResult(new, len(prepared.repeats) + len(unique) - len(new), conflicting)


def _merge_new(unique: list[Trade], others: list[Trade], new_others: list[Trade]) -> list[Trade]:
    """``unique`` without those of ``others`` that are not in ``new_others``, in order."""
    stored_before = {id(t) for t in others}.difference(map(id, new_others))
    if not stored_before:
        return unique
    return [t for t in unique if id(t) not in stored_before]


def _repeats_conflicting(
    conn: psycopg.Connection, prepared: PreparedTrades, new: list[Trade], of: SourceOf
) -> int:
    """Count (and keep) the conflicting ones among the batch's repeats. Their first copies are
    stored by now: where that is the batch's own (new) first copy, the comparison is made here
    and an exact copy costs nothing; else the stored one is read."""
    repeats = prepared.repeats
    if not repeats:
        return 0
    stored_here = set(map(id, new))
    first_of = prepared.firsts
    firsts = [first_of[r.key] for r in repeats]
    known = [f if id(f) in stored_here else None for f in firsts]
    return count_conflicts(conn, repeats, of(repeats), known)


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
