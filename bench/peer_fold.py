"""The peers' candle fold: one exact candle per window in plain Python, shared by the bytewax
benchmark (``aggregate_vs_bytewax.py``) and the peers' stream pipelines (``peer_flows.py``).

It imports no framework, so that a benchmark which only runs candlekeep (``peers.py --quick``
with the bare loop and the worker, in the test suite) needs none of the ``[bench]`` extra.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

#: Sums and products never round: maximum precision, and any inexact result raises.
EXACT = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow],
)
_add = EXACT.add
_mul = EXACT.multiply
_ZERO = Decimal(0)


class Ohlcv:
    """The fold_window accumulator: one exact candle, open and close by (time, trade id)."""

    __slots__ = (
        "close",
        "close_key",
        "high",
        "low",
        "open",
        "open_key",
        "quote_volume",
        "taker_buy_quote_volume",
        "taker_buy_volume",
        "trade_count",
        "volume",
    )

    def __init__(self, trade: tuple):
        trade_id, ts_ms, price, quantity, is_buyer_maker, _ = trade
        notional = _mul(price, quantity)
        self.open_key = self.close_key = (ts_ms, trade_id)
        self.open = self.close = self.high = self.low = price
        self.volume = quantity
        self.quote_volume = notional
        self.trade_count = 1
        if is_buyer_maker:
            self.taker_buy_volume = self.taker_buy_quote_volume = _ZERO
        else:
            self.taker_buy_volume, self.taker_buy_quote_volume = quantity, notional


def fold_trade(candle: Ohlcv | None, trade: tuple) -> Ohlcv:
    """fold_window's folder: one more trade into the window's candle."""
    if candle is None:
        return Ohlcv(trade)
    trade_id, ts_ms, price, quantity, is_buyer_maker, _ = trade
    order = (ts_ms, trade_id)
    if order < candle.open_key:
        candle.open_key, candle.open = order, price
    if order > candle.close_key:
        candle.close_key, candle.close = order, price
    if price > candle.high:
        candle.high = price
    if price < candle.low:
        candle.low = price
    notional = _mul(price, quantity)
    candle.volume = _add(candle.volume, quantity)
    candle.quote_volume = _add(candle.quote_volume, notional)
    candle.trade_count += 1
    if not is_buyer_maker:
        candle.taker_buy_volume = _add(candle.taker_buy_volume, quantity)
        candle.taker_buy_quote_volume = _add(candle.taker_buy_quote_volume, notional)
    return candle


def merge_candles(left: Ohlcv | None, right: Ohlcv | None) -> Ohlcv | None:
    """fold_window's merger (tumbling windows never merge; here for completeness)."""
    if left is None or right is None:
        return left or right
    if right.open_key < left.open_key:
        left.open_key, left.open = right.open_key, right.open
    if right.close_key > left.close_key:
        left.close_key, left.close = right.close_key, right.close
    left.high = max(left.high, right.high)
    left.low = min(left.low, right.low)
    left.volume = _add(left.volume, right.volume)
    left.quote_volume = _add(left.quote_volume, right.quote_volume)
    left.trade_count += right.trade_count
    left.taker_buy_volume = _add(left.taker_buy_volume, right.taker_buy_volume)
    left.taker_buy_quote_volume = _add(left.taker_buy_quote_volume, right.taker_buy_quote_volume)
    return left
