"""One-shot aggregation: every candle of a finite set of trades, with no watermark.

This is what ``candlekeep aggregate`` runs and what the stream must agree with once every window
is closed. Base candles are folded from the trades; each larger candle is the merge of its base
candles, so the rollup invariant holds by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import localcontext

from msgspec.structs import astuple

from shared.core.candles import EXACT, Candle, empty_candle, fold, merge, open_candle
from shared.core.intervals import Interval, IntervalSet
from shared.core.trades import MARKET, Row, Trade


@dataclass
class Deduplicator:
    """Remembers trade ids; the first copy of a trade wins, later copies are counted.

    Ids are kept per (exchange, symbol) as plain ints: cheaper to hash and store than one
    (exchange, symbol, id) tuple per trade, which mattered at millions of trades. Only the ids
    are kept, not the first copies' values (that would cost the fold a third of its speed), so
    which duplicates conflict with their first copy is found afterwards, from the ids in
    ``repeated``, by :func:`conflicting_copies` over the trades read again.
    """

    seen: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    duplicates: int = 0
    #: (exchange, symbol) -> ids met more than once (rare: recorded only for duplicates).
    repeated: dict[tuple[str, str], set[int]] = field(default_factory=dict)

    def repeat(self, exchange: str, symbol: str, trade_id: int) -> None:
        """Count a later copy of ``trade_id`` and remember its id."""
        self.duplicates += 1
        ids = self.repeated.get((exchange, symbol))
        if ids is None:
            ids = self.repeated[exchange, symbol] = set()
        ids.add(trade_id)

    def absorb_repeated(self, other: Deduplicator) -> None:
        for key, ids in other.repeated.items():
            self.repeated.setdefault(key, set()).update(ids)

    def ids(self, exchange: str, symbol: str) -> set[int]:
        """The (live) set of trade ids seen so far for one symbol."""
        ids = self.seen.get((exchange, symbol))
        if ids is None:
            ids = self.seen[exchange, symbol] = set()
        return ids

    def first_seen(self, trade: Trade) -> bool:
        ids = self.ids(trade.exchange, trade.symbol)
        if trade.trade_id in ids:
            self.repeat(trade.exchange, trade.symbol, trade.trade_id)
            return False
        ids.add(trade.trade_id)
        return True

    def unique(self, trades: Iterable[Trade]) -> Iterator[Trade]:
        for trade in trades:
            if self.first_seen(trade):
                yield trade


class CandleBook:
    """Base candles of every (exchange, symbol), folded as trades come, in any order."""

    def __init__(self, intervals: IntervalSet):
        self.intervals = intervals
        self.dedup = Deduplicator()
        self.trades = 0
        # (exchange, symbol) -> base window start -> candle
        self._bases: dict[tuple[str, str], dict[int, Candle]] = {}

    def add_all(self, trades: Iterable[Trade]) -> None:
        """Fold trades (duplicates are counted once): :meth:`add_rows` of their fields."""
        self.add_rows(map(astuple, trades))

    def add_rows(self, rows: Iterable[Row]) -> None:
        """Fold trades given as :data:`Row` tuples, the fields of :class:`Trade` in order (what
        ``TradeLineReader.rows`` reads from files: no object per line). The hot loop of
        ``aggregate``.

        A run of one symbol (files hold one) looks its book and seen-ids up once; a trade's id
        is hashed once (a duplicate leaves the set's size alone). The exact context is entered
        once for the whole loop, as :func:`fold` needs. The window start is
        :func:`~shared.core.intervals.window_start` written out: a call per trade cost 50 ns of
        the ~2 us a trade of a file costs to read and fold (2.5%, measured on 200k trades);
        ``tests/test_parallel_aggregate.py`` holds the book's candles to a fold that calls it.
        """
        base = self.intervals.base
        base_len = base.length_us
        books = self._bases
        count = 0
        exchange = symbol = None
        book: dict[int, Candle] | None = None
        ids: set[int] = set()
        with localcontext(EXACT):
            for row in rows:
                (
                    row_exchange,
                    row_symbol,
                    trade_id,
                    ts,
                    price,
                    quantity,
                    is_buyer_maker,
                    raw,
                    kind,
                ) = row
                if row_symbol != symbol or row_exchange != exchange:
                    exchange, symbol = row_exchange, row_symbol
                    ids = self.dedup.ids(exchange, symbol)
                    book = books.get((exchange, symbol))
                before = len(ids)
                ids.add(trade_id)
                if len(ids) == before:
                    self.dedup.repeat(exchange, symbol, trade_id)
                    continue
                count += 1
                if kind != MARKET:
                    continue  # stored and counted, never folded (SPEC §2 ``kind``)
                if book is None:
                    book = books[exchange, symbol] = {}
                start = ts - ts % base_len  # window_start(ts, base_len): see the docstring
                candle = book.get(start)
                if candle is None:
                    book[start] = open_candle(Trade(*row), base)
                else:
                    fold(candle, trade_id, ts, price, quantity, is_buyer_maker, raw)
        self.trades += count

    def exclude(self, exchange: str, symbol: str, trade_ids: Iterable[int]) -> None:
        """Count later trades with these ids as duplicates: their first copy was folded elsewhere
        (by another book that is merged into the same result)."""
        self.dedup.ids(exchange, symbol).update(trade_ids)

    def merge_from(self, other: CandleBook) -> None:
        """Absorb ``other``'s base candles and counts (not its seen ids: dedup across books is
        the caller's), taking over its candles. Exact; merge books in input order, so that of
        equal highs or lows written differently (``1.5``, ``1.50``) the first read stays, as in
        ``add_rows``.
        """
        for key, theirs in other._bases.items():
            mine = self._bases.get(key)
            if mine is None:
                self._bases[key] = dict(theirs)
                continue
            for start, candle in theirs.items():
                held = mine.get(start)
                if held is None:
                    mine[start] = candle
                else:
                    held.absorb(candle)
        self.trades += other.trades
        self.dedup.duplicates += other.dedup.duplicates
        self.dedup.absorb_repeated(other.dedup)

    def symbols(self) -> list[tuple[str, str]]:
        return sorted(self._bases)

    def candles(self, interval: Interval, symbol: tuple[str, str]) -> list[Candle]:
        """The candles of one symbol in ``interval``, by window start."""
        bases = self._bases.get(symbol, {})
        ordered = [bases[s] for s in sorted(bases)]
        if interval == self.intervals.base:
            return ordered
        groups: dict[int, list[Candle]] = {}
        for candle in ordered:
            groups.setdefault(interval.window_start(candle.window_start_us), []).append(candle)
        return [merge(group, interval) for _, group in sorted(groups.items())]

    def all_candles(self) -> list[Candle]:
        """Every candle of every symbol and interval."""
        out: list[Candle] = []
        for symbol in self.symbols():
            for interval in self.intervals.intervals:
                out.extend(self.candles(interval, symbol))
        return out


def conflicting_copies(trades: Iterable[Trade], repeated: dict[tuple[str, str], set[int]]) -> int:
    """How many later copies of the ``repeated`` ids differ from their first copy (in
    ``trades``' order) in time, price, quantity, side or kind: SPEC §2's conflicting duplicates, as
    ``shared.store.trade_store`` counts them in SQL (numbers compared by value)."""
    firsts: dict[tuple[str, str, int], tuple] = {}
    conflicting = 0
    for t in trades:
        ids = repeated.get((t.exchange, t.symbol))
        if ids is None or t.trade_id not in ids:
            continue
        values = (t.ts_us, t.price, t.quantity, t.is_buyer_maker, t.kind)
        first = firsts.setdefault(t.key, values)
        if first is not values and first != values:
            conflicting += 1
    return conflicting


def aggregate(trades: Iterable[Trade], intervals: IntervalSet) -> list[Candle]:
    """Every candle of ``trades`` (deduplicated) in every interval."""
    book = CandleBook(intervals)
    book.add_all(trades)
    return book.all_candles()


def fill_gaps(candles: list[Candle], interval: Interval) -> list[Candle]:
    """Insert Binance-style empty candles between the first and last candle of one series."""
    out: list[Candle] = []
    step = interval.length_us
    for candle in candles:
        if out:
            start = out[-1].window_start_us + step
            while start < candle.window_start_us:
                out.append(empty_candle(out[-1], start))
                start += step
        out.append(candle)
    return out
