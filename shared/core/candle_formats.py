"""Candle output formats: Binance's 12-column kline CSV and candlekeep's JSONL.

Decimals are written in plain notation (never ``1E-8``), so every digit survives a round trip.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from shared.core.candles import Candle
from shared.core.trades import ts_to_datetime

OUTPUT_FORMATS = ("binance-klines", "jsonl")
_json = msgspec.json.Encoder()


def plain(value: Decimal | None) -> str | None:
    """A decimal as a plain string (no exponent), ``None`` kept."""
    return None if value is None else format(value, "f")


def iso(ts_us: int) -> str:
    """ISO-8601 UTC with a ``Z``."""
    return ts_to_datetime(ts_us).isoformat().replace("+00:00", "Z")


def kline_row(candle: Candle, microseconds: bool = False) -> list[str]:
    """Binance's kline columns: open time, O, H, L, C, volume, close time, quote volume,
    trade count, taker buy volume, taker buy quote volume, ignore. Times in ms (or µs)."""
    unit = 1 if microseconds else 1000
    open_time = candle.window_start_us // unit
    close_time = candle.window_end_us // unit - 1
    zero = "0"
    return [
        str(open_time),
        plain(candle.open),
        plain(candle.high),
        plain(candle.low),
        plain(candle.close),
        plain(candle.volume),
        str(close_time),
        plain(candle.quote_volume),
        str(candle.trade_count),
        plain(candle.taker_buy_volume) or zero,
        plain(candle.taker_buy_quote_volume) or zero,
        zero,
    ]


def candle_record(candle: Candle) -> dict:
    """The JSONL object of a candle (SPEC §8): decimals as strings, times ISO-8601 UTC."""
    return {
        "exchange": candle.exchange,
        "symbol": candle.symbol,
        "interval": candle.interval,
        "window_start": iso(candle.window_start_us),
        "window_end": iso(candle.window_end_us),
        "open": plain(candle.open),
        "high": plain(candle.high),
        "low": plain(candle.low),
        "close": plain(candle.close),
        "volume": plain(candle.volume),
        "quote_volume": plain(candle.quote_volume),
        "trade_count": candle.trade_count,
        "first_trade_id": candle.first_trade_id,
        "last_trade_id": candle.last_trade_id,
        "taker_buy_volume": plain(candle.taker_buy_volume),
        "taker_buy_quote_volume": plain(candle.taker_buy_quote_volume),
    }


def candle_json_line(candle: Candle) -> str:
    return _json.encode(candle_record(candle)).decode() + "\n"
