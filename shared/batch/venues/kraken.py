"""Kraken spot (``kraken``): OHLC, trades by id, and the one mapping of its pair names.

Symbols. SPEC §2 symbols are 1-32 of ``A-Z 0-9 . _ -``, so a Kraken pair is stored as its
WebSocket v2 name with ``-`` for ``/``: ``BTC/USD`` → ``BTC-USD``. Kraken's older spellings are
read as the same pair (``XBT/USD`` and ``XDG`` are ``BTC`` and ``DOGE``). The REST API takes the
pair's alternative name (``XBTUSD``: ``BTC`` → ``XBT``, ``DOGE`` → ``XDG``) and answers under
its own key (``XXBTZUSD``), which is read whatever it is. The spellings meet in one place,
:mod:`shared.core.kraken_symbols`: the feed, the candles and the trades all go through it.

- candles: ``GET /0/public/OHLC?pair&interval&since``, rows ``[time (s), open, high, low, close,
  vwap, volume, count]``. Kraken serves only its latest 720 candles of an interval; it fills
  a minute without trades with the previous close and count 0 (kept, with ``trade_count`` 0);
  its ``vwap`` is truncated to the pair's price decimals (:func:`vwap_agrees`); it has no quote
  or taker-buy volume. The answer's ``last`` is the newest *committed* candle: later rows (the
  one still open) are left out.
- trades by id: ``GET /0/public/Trades?pair&since`` (since in ns), rows ``[price, volume,
  time (s, a float of a ns time), b|s, m|l, misc, trade_id]``, 1000 a page, ``last`` the next
  ``since``. Ids are consecutive per pair, but the API selects by time: ``after_ts_us`` (the
  time of the trade before the gap) says where to start. Times are truncated to microseconds.
- limits: about one public request a second (requests are spaced by a second), and
  ``EAPI:Rate limit exceeded`` / ``EGeneral:Too many requests`` / ``EService:*`` in the
  ``error`` array are waited out and retried a few times, then the venue is unavailable.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from shared.core.intervals import US_PER_SECOND
from shared.core.kraken_symbols import rest_pair
from shared.core.trades import Trade
from shared.core.verification import truncated_vwap

from .base import (
    FetchedTrades,
    PeriodNotServed,
    VenueCandle,
    VenueRejected,
    VenueResponseError,
    VenueUnavailable,
    check_period,
    interval_us,
)
from .http import Reply, VenueHttp

EXCHANGE = "kraken"
#: candlekeep's intervals Kraken publishes, with Kraken's own name (minutes).
KRAKEN_MINUTES = {"1m": 1, "5m": 5, "15m": 15, "1h": 60, "4h": 240, "1d": 1440}
MAX_CANDLES = 720
_RETRYABLE = ("EAPI:Rate limit exceeded", "EGeneral:Too many requests", "EService:")
_RETRIES = 3


def _rest_pair(symbol: str) -> str:
    try:
        return rest_pair(symbol)
    except ValueError as exc:
        raise VenueRejected(str(exc)) from None


def vwap_agrees(quote_volume: Decimal, volume: Decimal, vwap: Decimal) -> bool:
    """Whether Kraken's ``vwap`` is ``quote_volume / volume`` truncated to its decimals (the
    rule is the core's, which the verdicts use)."""
    return truncated_vwap(quote_volume, volume, vwap) == vwap


def _decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, Decimal, int)):
        raise VenueResponseError(f"Kraken {what} is not a number: {str(value)[:40]!r}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise VenueResponseError(f"Kraken {what} is not a number: {str(value)[:40]!r}") from None
    if not number.is_finite() or number < 0:
        raise VenueResponseError(f"Kraken {what} is not a finite non-negative number: {value}")
    return number


def candle_from_row(row: Any, symbol: str, interval: str) -> VenueCandle:
    """One OHLC row ``[time, open, high, low, close, vwap, volume, count]`` as a candle."""
    if not isinstance(row, list) or len(row) < 8:
        raise VenueResponseError(f"Kraken OHLC row is not an array of 8 fields: {str(row)[:80]}")
    if isinstance(row[0], bool) or not isinstance(row[0], int):
        raise VenueResponseError(f"Kraken OHLC time is not whole seconds: {row[0]!r}")
    if isinstance(row[7], bool) or not isinstance(row[7], int):
        raise VenueResponseError(f"Kraken OHLC count is not an integer: {row[7]!r}")
    start_us = row[0] * US_PER_SECOND
    if start_us % interval_us(interval):
        raise VenueResponseError(f"Kraken {interval} candle opens off the window grid: {row[0]}")
    return VenueCandle(
        exchange=EXCHANGE,
        symbol=symbol,
        interval=interval,
        window_start_us=start_us,
        open=_decimal(row[1], "OHLC open"),
        high=_decimal(row[2], "OHLC high"),
        low=_decimal(row[3], "OHLC low"),
        close=_decimal(row[4], "OHLC close"),
        vwap=_decimal(row[5], "OHLC vwap"),
        volume=_decimal(row[6], "OHLC volume"),
        trade_count=row[7],
    )


def trade_from_row(row: Any, symbol: str) -> Trade:
    """One Trades row ``[price, volume, time, b|s, m|l, misc, trade_id]`` as a trade. ``b``
    (the taker bought) means the buyer was not the maker."""
    if not isinstance(row, list) or len(row) < 7:
        raise VenueResponseError(
            f"Kraken trade is not an array of 7 fields (price … trade_id): {str(row)[:80]}"
        )
    trade_id = row[6]
    if isinstance(trade_id, bool) or not isinstance(trade_id, int) or trade_id < 0:
        raise VenueResponseError(f"Kraken trade id is not a non-negative integer: {trade_id!r}")
    if row[3] not in ("b", "s"):
        raise VenueResponseError(f"Kraken trade side is not b or s: {str(row[3])[:20]!r}")
    seconds = _decimal(row[2], "trade time")
    price = _decimal(row[0], "trade price")
    quantity = _decimal(row[1], "trade volume")
    if not price or not quantity:
        raise VenueResponseError(f"Kraken trade {trade_id} has a zero price or volume")
    ts_us = int((seconds * US_PER_SECOND).to_integral_value(rounding=ROUND_FLOOR))
    return Trade(EXCHANGE, symbol, trade_id, ts_us, price, quantity, row[3] == "s")


class KrakenVenue:
    """Kraken spot over :class:`VenueHttp` (see the module docstring)."""

    exchange = EXCHANGE
    consecutive_ids = True
    intervals = tuple(KRAKEN_MINUTES)

    def __init__(self, http: VenueHttp):
        self.http = http

    def close(self) -> None:
        self.http.close()

    def _result(self, path: str, params: dict) -> tuple[list, Any]:
        """The pair's rows and ``last`` of a public answer, Kraken's ``error`` array obeyed."""
        for attempt in range(_RETRIES + 1):
            reply: Reply = self.http.get_json(path, params)
            body = reply.body
            if not isinstance(body, dict) or not isinstance(body.get("error", []), list):
                raise VenueResponseError(f"Kraken answer is not an object: {str(body)[:80]}")
            errors = [str(e) for e in body.get("error") or []]
            if not errors:
                break
            if not any(e.startswith(_RETRYABLE) for e in errors):
                raise VenueRejected(
                    f"Kraken refused {path} {params.get('pair')}: {'; '.join(errors)}"
                )
            if attempt == _RETRIES:
                raise VenueUnavailable(
                    f"Kraken is limiting or unavailable ({'; '.join(errors)}): try again later"
                )
            self.http.sleep(self.http.backoff_s * 2**attempt + self.http.min_interval_s)
        result = body.get("result")
        if not isinstance(result, dict):
            raise VenueResponseError(f"Kraken answer has no 'result' object: {str(body)[:80]}")
        pairs = [key for key in result if key != "last"]
        if len(pairs) != 1 or not isinstance(result[pairs[0]], list):
            raise VenueResponseError(
                f"Kraken answer does not hold one pair's rows: keys {sorted(result)[:5]}"
            )
        return result[pairs[0]], result.get("last")

    def fetch_candles(
        self, symbol: str, interval: str, start_us: int, end_us: int
    ) -> list[VenueCandle]:
        """The committed candles of ``[start_us, end_us)``, oldest first (empty minutes kept
        with count 0). Unavailable when the period is older than Kraken's latest 720."""
        check_period(interval, start_us, end_us, self.intervals)
        length = interval_us(interval)
        rows, last = self._result(
            "/0/public/OHLC",
            {
                "pair": _rest_pair(symbol),
                "interval": KRAKEN_MINUTES[interval],
                "since": (start_us - length) // US_PER_SECOND,
            },
        )
        if isinstance(last, bool) or not isinstance(last, int):
            raise VenueResponseError(f"Kraken OHLC 'last' is not whole seconds: {last!r}")
        candles = [candle_from_row(r, symbol, interval) for r in rows]
        if candles and candles[0].window_start_us > start_us:
            raise PeriodNotServed(
                f"Kraken serves only its latest {MAX_CANDLES} {interval} candles; its oldest "
                f"now starts after the period's start: the period can no longer be verified"
            )
        committed_us = last * US_PER_SECOND
        return [
            c
            for c in candles
            if start_us <= c.window_start_us < end_us and c.window_start_us <= committed_us
        ]

    def fetch_trades(
        self, symbol: str, first_id: int, last_id: int, *, after_ts_us: int | None = None
    ) -> FetchedTrades:
        """The trades with ids ``first_id..last_id``, read forward from ``after_ts_us`` (the
        time of trade ``first_id - 1``; required: Kraken selects trades by time)."""
        if first_id > last_id:
            raise ValueError(f"first_id {first_id} > last_id {last_id}")
        if after_ts_us is None:
            raise VenueRejected(
                "Kraken selects trades by time: give the time of the trade before the gap"
            )
        found: dict[int, Trade] = {}
        since_ns = after_ts_us * 1000 - 1
        first_seen: int | None = None
        while True:
            rows, last = self._result(
                "/0/public/Trades", {"pair": _rest_pair(symbol), "since": since_ns}
            )
            trades = [trade_from_row(r, symbol) for r in rows]
            for trade in trades:
                if first_seen is None:
                    first_seen = trade.trade_id
                if first_id <= trade.trade_id <= last_id:
                    found[trade.trade_id] = trade
            next_since = int(last) if isinstance(last, (int, str)) and str(last).isdigit() else None
            if (
                not trades
                or max(t.trade_id for t in trades) >= last_id
                or next_since is None
                or next_since <= since_ns
            ):
                break
            since_ns = next_since
        missing = [i for i in range(first_id, last_id + 1) if i not in found]
        reason = None
        if missing:
            reason = (
                "Kraken's trades after that time start at a later id: the trades before it are "
                "not served by time any more"
                if first_seen is not None and first_seen > first_id
                else "Kraken served no trade with these ids after that time"
            )
        return FetchedTrades(sorted(found.values(), key=lambda t: t.trade_id), missing, reason)
