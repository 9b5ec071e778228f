"""Candles: the OHLCV record, folding trades into it and merging candles (SPEC §3).

Fold and merge are exact and order-independent: a candle remembers the (timestamp, trade id) of
its first and last trade, so folding trades in any order, or merging partial candles in any
order, gives the same candle to the last digit.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal, localcontext
from typing import get_args, get_type_hints

from shared.core.intervals import Interval
from shared.core.trades import Trade

#: Additions and products are exact: the precision is the maximum, and rounding would raise.
EXACT = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow, decimal.DivisionByZero],
)
_add = EXACT.add
_mul = EXACT.multiply

#: The fields a candle table carries (SPEC §3), in the order they are written.
CANDLE_FIELDS = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trade_count",
    "first_trade_id",
    "last_trade_id",
    "taker_buy_volume",
    "taker_buy_quote_volume",
)


@dataclass(slots=True)
class Candle:
    """One OHLCV candle of one (exchange, symbol, interval) window.

    ``open_ts_us``/``close_ts_us`` are the timestamps of the first and last trade: with the
    trade ids they order trades, so a late trade can still become the open. ``revision`` counts
    the stream's emissions of this window (0 first; -1 not emitted yet).
    """

    exchange: str
    symbol: str
    interval: str
    window_start_us: int
    window_end_us: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    quote_volume: Decimal
    trade_count: int
    first_trade_id: int | None
    last_trade_id: int | None
    taker_buy_volume: Decimal | None
    taker_buy_quote_volume: Decimal | None
    open_ts_us: int
    close_ts_us: int
    revision: int = field(default=-1, compare=False)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.exchange, self.symbol, self.interval, self.window_start_us)

    @property
    def vwap(self) -> Decimal | None:
        """Volume-weighted average price (rounded to 28 digits; ``None`` for an empty candle)."""
        if not self.volume:
            return None
        return self.quote_volume / self.volume

    def values(self) -> tuple:
        """The SPEC §3 fields, for equality checks and table rows."""
        return tuple(getattr(self, name) for name in CANDLE_FIELDS)

    def add(self, trade: Trade) -> None:
        """Fold one more trade into this candle: :func:`fold`, in the exact context."""
        with localcontext(EXACT):
            fold(
                self,
                trade.trade_id,
                trade.ts_us,
                trade.price,
                trade.quantity,
                trade.is_buyer_maker,
                trade.raw_trades,
            )

    def absorb(self, other: Candle) -> None:
        """Merge ``other`` (same symbol, any window inside this one) into this candle."""
        if (other.open_ts_us, other.first_trade_id) < (self.open_ts_us, self.first_trade_id):
            self.open = other.open
            self.open_ts_us, self.first_trade_id = other.open_ts_us, other.first_trade_id
        if (other.close_ts_us, other.last_trade_id) > (self.close_ts_us, self.last_trade_id):
            self.close = other.close
            self.close_ts_us, self.last_trade_id = other.close_ts_us, other.last_trade_id
        if other.high > self.high:
            self.high = other.high
        if other.low < self.low:
            self.low = other.low
        self.volume = _add(self.volume, other.volume)
        self.quote_volume = _add(self.quote_volume, other.quote_volume)
        self.trade_count += other.trade_count
        if other.taker_buy_volume is not None:
            if self.taker_buy_volume is None:
                self.taker_buy_volume = other.taker_buy_volume
                self.taker_buy_quote_volume = other.taker_buy_quote_volume
            else:
                self.taker_buy_volume = _add(self.taker_buy_volume, other.taker_buy_volume)
                self.taker_buy_quote_volume = _add(
                    self.taker_buy_quote_volume, other.taker_buy_quote_volume
                )

    def copy(self, **changes) -> Candle:
        return replace(self, **changes)


#: The candle's fields that hold a ``Decimal`` (or ``None``), from its annotations: snapshots
#: write them as exact strings.
DECIMAL_FIELDS = frozenset(
    name for name, kind in get_type_hints(Candle).items() if Decimal in (kind, *get_args(kind))
)


def fold(
    candle: Candle,
    trade_id: int,
    ts_us: int,
    price: Decimal,
    quantity: Decimal,
    is_buyer_maker: bool | None,
    raw_trades: int,
) -> None:
    """Fold one trade into ``candle``: the one candle fold in Python (SPEC §3).

    Every fold calls it: :class:`~shared.core.aggregation.CandleBook` for ``aggregate``,
    :meth:`~shared.core.windows.PartitionWindows.process` for the stream, :meth:`Candle.add`.
    It takes the trade's fields, not a :class:`Trade`, so that files are folded from rows
    without an object per line.

    Sums and products are exact only inside ``decimal.localcontext(EXACT)``: a loop folding
    many trades enters it once (entering it per trade, or calling ``EXACT.add``, would cost
    more than the fold itself); :meth:`Candle.add` enters it for one trade. Plain int
    comparisons instead of (ts, id) tuples; the open is only looked at when the trade is not
    the new close (open <= close).
    """
    close_ts = candle.close_ts_us
    if ts_us > close_ts or (ts_us == close_ts and trade_id > candle.last_trade_id):
        candle.close = price
        candle.close_ts_us = ts_us
        candle.last_trade_id = trade_id
    else:
        open_ts = candle.open_ts_us
        if ts_us < open_ts or (ts_us == open_ts and trade_id < candle.first_trade_id):
            candle.open = price
            candle.open_ts_us = ts_us
            candle.first_trade_id = trade_id
    if price > candle.high:
        candle.high = price
    elif price < candle.low:
        candle.low = price
    candle.volume = candle.volume + quantity
    notional = price * quantity
    candle.quote_volume = candle.quote_volume + notional
    candle.trade_count += raw_trades
    if is_buyer_maker is not None:
        if candle.taker_buy_volume is None:
            candle.taker_buy_volume = Decimal(0)
            candle.taker_buy_quote_volume = Decimal(0)
        if not is_buyer_maker:
            candle.taker_buy_volume = candle.taker_buy_volume + quantity
            candle.taker_buy_quote_volume = candle.taker_buy_quote_volume + notional


def open_candle(trade: Trade, interval: Interval) -> Candle:
    """A new candle holding just ``trade``, in ``interval``'s window around it."""
    start = interval.window_start(trade.ts_us)
    price = trade.price
    quantity = trade.quantity
    taker_volume = taker_quote = None
    if trade.is_buyer_maker is not None:
        if trade.is_buyer_maker:
            taker_volume = taker_quote = Decimal(0)
        else:
            taker_volume, taker_quote = quantity, _mul(price, quantity)
    return Candle(
        trade.exchange,
        trade.symbol,
        interval.name,
        start,
        start + interval.length_us,
        price,
        price,
        price,
        price,
        quantity,
        _mul(price, quantity),
        trade.raw_trades,
        trade.trade_id,
        trade.trade_id,
        taker_volume,
        taker_quote,
        trade.ts_us,
        trade.ts_us,
    )


def widen(candle: Candle, interval: Interval) -> Candle:
    """A copy of ``candle`` relabelled as the ``interval`` window containing it (merge seed)."""
    start = interval.window_start(candle.window_start_us)
    return replace(
        candle,
        interval=interval.name,
        window_start_us=start,
        window_end_us=start + interval.length_us,
        revision=-1,
    )


def merge(candles: Iterable[Candle], interval: Interval) -> Candle:
    """The ``interval`` candle that is the merge of ``candles`` (all inside one such window)."""
    it = iter(candles)
    merged = widen(next(it), interval)
    for candle in it:
        merged.absorb(candle)
    return merged


def empty_candle(previous: Candle, start_us: int) -> Candle:
    """A trade-less window the way Binance publishes it: volume 0, O=H=L=C = previous close."""
    length = previous.window_end_us - previous.window_start_us
    zero = Decimal(0)
    close = previous.close
    return Candle(
        previous.exchange,
        previous.symbol,
        previous.interval,
        start_us,
        start_us + length,
        close,
        close,
        close,
        close,
        zero,
        zero,
        0,
        None,
        None,
        None if previous.taker_buy_volume is None else zero,
        None if previous.taker_buy_quote_volume is None else zero,
        start_us,
        start_us,
        revision=-1,
    )
