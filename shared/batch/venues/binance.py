"""Binance spot (``binance``) and USD-M futures (``binance-usdm``): klines and trades by id.

Both markets speak the same REST dialect at different base URLs:

- candles: ``GET /api/v3/klines`` (spot) and ``GET /fapi/v1/klines`` (USD-M), each row
  ``[open time, open, high, low, close, volume, close time, quote volume, trade count,
  taker-buy base volume, taker-buy quote volume, ignore]``, numbers as decimal strings; paged by
  ``startTime`` (1000 rows a page, 1500 on USD-M). A kline is *closed* once its close time is
  before the venue's own clock (the response's ``Date``): the one still open is left out.
  USD-M klines count only MARKET trades (not insurance-fund or ADL ones), as candlekeep's
  candles do.
- trades by id: ``GET /api/v3/historicalTrades`` and ``GET /fapi/v1/historicalTrades`` with
  ``fromId`` and ``limit`` (at most 1000 a page; the optional ``X-MBX-APIKEY`` header from
  ``CANDLEKEEP_BINANCE_API_KEY``, never logged). USD-M serves only MARKET trades there: the ids
  of its other trades come back missing, with that reason.
- trade ids are consecutive per symbol in both markets; request weight is counted per minute
  (``X-MBX-USED-WEIGHT-1M``; 6000 spot, 2400 USD-M) and respected by
  :class:`~shared.batch.venues.http.VenueHttp`.

The pure parts (:func:`candle_from_row`, :func:`trade_from_row`) turn one row into a candle or
a trade exactly, or raise :class:`VenueResponseError` saying which field was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from shared.core.intervals import US_PER_MS
from shared.core.trades import Trade

from .base import FetchedTrades, VenueCandle, VenueResponseError, check_period, interval_us
from .http import VenueHttp

#: Binance's interval names are candlekeep's (1m 5m 15m 1h 4h 1d): every one is published.
INTERVALS = ("1m", "5m", "15m", "1h", "4h", "1d")
#: Trade times from 2025 on may be microseconds (spot files, ``timeUnit=MICROSECOND``).
_MICROSECONDS = 10**14


@dataclass(frozen=True)
class Market:
    exchange: str
    klines_path: str
    trades_path: str
    page_limit: int  # klines per page
    weight_limit_1m: int


SPOT = Market("binance", "/api/v3/klines", "/api/v3/historicalTrades", 1000, 6000)
USDM = Market("binance-usdm", "/fapi/v1/klines", "/fapi/v1/historicalTrades", 1500, 2400)
TRADES_PAGE = 1000


def _decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, Decimal, int)):
        raise VenueResponseError(f"Binance {what} is not a number: {str(value)[:40]!r}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise VenueResponseError(f"Binance {what} is not a number: {str(value)[:40]!r}") from None
    if not number.is_finite() or number < 0:
        raise VenueResponseError(f"Binance {what} is not a finite non-negative number: {value}")
    return number


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise VenueResponseError(f"Binance {what} is not an integer: {str(value)[:40]!r}")
    return value


def _us(ms_or_us: int) -> int:
    return ms_or_us if ms_or_us >= _MICROSECONDS else ms_or_us * US_PER_MS


def candle_from_row(row: Any, exchange: str, symbol: str, interval: str) -> tuple[VenueCandle, int]:
    """One kline row as a candle, with its close time (µs), exactly."""
    if not isinstance(row, list) or len(row) < 11:
        raise VenueResponseError(f"Binance kline is not an array of 11+ fields: {str(row)[:80]}")
    start_us = _us(_int(row[0], "kline open time"))
    close_us = _us(_int(row[6], "kline close time"))
    if start_us % interval_us(interval):
        raise VenueResponseError(f"Binance {interval} kline opens off the window grid: {row[0]}")
    candle = VenueCandle(
        exchange=exchange,
        symbol=symbol,
        interval=interval,
        window_start_us=start_us,
        open=_decimal(row[1], "kline open"),
        high=_decimal(row[2], "kline high"),
        low=_decimal(row[3], "kline low"),
        close=_decimal(row[4], "kline close"),
        volume=_decimal(row[5], "kline volume"),
        quote_volume=_decimal(row[7], "kline quote volume"),
        trade_count=_int(row[8], "kline trade count"),
        taker_buy_volume=_decimal(row[9], "kline taker-buy volume"),
        taker_buy_quote_volume=_decimal(row[10], "kline taker-buy quote volume"),
    )
    return candle, close_us


def trade_from_row(row: Any, exchange: str, symbol: str) -> Trade:
    """One ``historicalTrades`` row (``id price qty quoteQty time isBuyerMaker``) as a trade."""
    if not isinstance(row, dict):
        raise VenueResponseError(f"Binance trade is not an object: {str(row)[:80]}")
    for name in ("id", "price", "qty", "time", "isBuyerMaker"):
        if name not in row:
            raise VenueResponseError(f"Binance trade without {name!r}: {str(row)[:120]}")
    maker = row["isBuyerMaker"]
    if not isinstance(maker, bool):
        raise VenueResponseError(f"Binance trade's isBuyerMaker is not a boolean: {maker!r}")
    price = _decimal(row["price"], "trade price")
    quantity = _decimal(row["qty"], "trade quantity")
    if not price or not quantity:
        raise VenueResponseError(f"Binance trade {row['id']} has a zero price or quantity")
    return Trade(
        exchange,
        symbol,
        _int(row["id"], "trade id"),
        _us(_int(row["time"], "trade time")),
        price,
        quantity,
        maker,
    )


class BinanceVenue:
    """One Binance market over :class:`VenueHttp` (see the module docstring)."""

    consecutive_ids = True
    intervals = INTERVALS

    def __init__(self, market: Market, http: VenueHttp):
        self.market = market
        self.exchange = market.exchange
        self.http = http

    def close(self) -> None:
        self.http.close()

    def fetch_candles(
        self, symbol: str, interval: str, start_us: int, end_us: int
    ) -> list[VenueCandle]:
        """The closed klines of ``[start_us, end_us)``, oldest first, paged."""
        check_period(interval, start_us, end_us, self.intervals)
        length = interval_us(interval)
        candles: list[VenueCandle] = []
        next_us = start_us
        while next_us < end_us:
            reply = self.http.get_json(
                self.market.klines_path,
                {
                    "symbol": symbol,
                    "interval": interval,
                    "startTime": next_us // US_PER_MS,
                    "endTime": (end_us - 1) // US_PER_MS,
                    "limit": self.market.page_limit,
                },
            )
            rows = reply.body
            if not isinstance(rows, list):
                raise VenueResponseError(f"Binance klines answer is not an array: {str(rows)[:80]}")
            venue_now_us = reply.venue_now_ms * US_PER_MS
            page = [candle_from_row(r, self.exchange, symbol, interval) for r in rows]
            for candle, close_us in page:
                if start_us <= candle.window_start_us < end_us and close_us < venue_now_us:
                    candles.append(candle)
            if len(rows) < self.market.page_limit or not page:
                break
            following = page[-1][0].window_start_us + length
            if following <= next_us:
                raise VenueResponseError("Binance klines did not move forward between pages")
            next_us = following
        return candles

    def fetch_trades(
        self, symbol: str, first_id: int, last_id: int, *, after_ts_us: int | None = None
    ) -> FetchedTrades:
        """The trades with ids ``first_id..last_id`` (``after_ts_us`` is not needed here)."""
        if first_id > last_id:
            raise ValueError(f"first_id {first_id} > last_id {last_id}")
        found: dict[int, Trade] = {}
        from_id = first_id
        while from_id <= last_id:
            limit = min(TRADES_PAGE, last_id - from_id + 1)
            reply = self.http.get_json(
                self.market.trades_path, {"symbol": symbol, "fromId": from_id, "limit": limit}
            )
            if not isinstance(reply.body, list):
                raise VenueResponseError(
                    f"Binance trades answer is not an array: {str(reply.body)[:80]}"
                )
            trades = [trade_from_row(r, self.exchange, symbol) for r in reply.body]
            for trade in trades:
                if first_id <= trade.trade_id <= last_id:
                    found[trade.trade_id] = trade
            if not trades:
                break
            highest = max(t.trade_id for t in trades)
            if highest < from_id:
                raise VenueResponseError("Binance historicalTrades went backwards from fromId")
            from_id = highest + 1
        missing = [i for i in range(first_id, last_id + 1) if i not in found]
        reason = None
        if missing:
            reason = (
                f"{self.exchange} served no trade with these ids from {self.market.trades_path}"
                + (
                    " (it serves only MARKET trades: insurance-fund and ADL trades are not there)"
                    if self.market is USDM
                    else " (no longer kept, or not yet made)"
                )
            )
        return FetchedTrades(sorted(found.values(), key=lambda t: t.trade_id), missing, reason)
