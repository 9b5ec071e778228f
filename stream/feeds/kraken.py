"""Kraken's live trades (WebSocket v2 ``trade`` channel), as canonical trade messages.

The feed connects to ``wss://ws.kraken.com/v2``, subscribes::

    {"method": "subscribe", "params": {"channel": "trade", "symbol": ["BTC/USD"]}}

and reads ``trade`` messages, ``snapshot`` (Kraken's latest trades, sent on each subscription:
after a reconnect they cover part of what was missed, and duplicates are harmless, SPEC §2) and
``update``::

    {"channel": "trade", "type": "update", "data": [{"symbol": "BTC/USD", "side": "sell",
     "price": 65000.12, "qty": 0.01, "ord_type": "market", "trade_id": 42,
     "timestamp": "2023-09-25T07:49:37.708706Z"}]}

Each entry is one canonical message (:func:`shared.core.trade_messages.encode_trade`):
exchange ``kraken``, the stored symbol (``BTC-USD``: the one mapping is
:mod:`shared.batch.venues.kraken`), trade_id, price and quantity exactly (JSON numbers read as
decimals), the timestamp, is_buyer_maker = (side is ``sell``). Heartbeats, status and
subscription acks are ignored; a refused subscription stops the feed with Kraken's reason.
Reconnects are logged like Binance's, with the last id before and the first after per symbol.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal

import msgspec
import structlog

from shared.core.kraken_symbols import stored_symbol, ws_symbol
from shared.core.trade_messages import encode_trade, parse_trade_object
from shared.core.trades import Rejection
from stream.feeds.produce import FeedError, FeedMessage
from stream.feeds.reconnects import Record
from stream.feeds.websocket import FeedStats, Skipped, websocket_trades

log = structlog.get_logger("candlekeep.feed.kraken")

DEFAULT_URL = "wss://ws.kraken.com/v2"
EXCHANGE = "kraken"
_decode = msgspec.json.Decoder(float_hook=Decimal)
#: The counters every venue feed keeps.
KrakenStats = FeedStats


def parse_pairs(text: str) -> list[str]:
    """``BTC/USD,xbt/usdt`` → the stored symbols ``["BTC-USD", "BTC-USDT"]`` (ValueError)."""
    symbols = [stored_symbol(raw) for raw in text.split(",") if raw.strip()]
    if not symbols:
        raise ValueError("no pairs given: e.g. --symbols BTC/USD,ETH/USD")
    return list(dict.fromkeys(symbols))


def subscribe_message(symbols: Sequence[str]) -> str:
    return json.dumps(
        {
            "method": "subscribe",
            "params": {"channel": "trade", "symbol": [ws_symbol(s) for s in symbols]},
        }
    )


class SubscriptionRefused(FeedError):
    pass


def normalise_message(frame: str | bytes) -> list[FeedMessage | Skipped]:
    """One WebSocket message as its trades' canonical messages (or why each is none)."""
    try:
        obj = _decode.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        return [Skipped("malformed", f"not JSON: {exc}")]
    if not isinstance(obj, dict):
        return [Skipped("malformed", f"a JSON {type(obj).__name__}, not an object")]
    if obj.get("method") == "subscribe" and obj.get("success") is False:
        raise SubscriptionRefused(f"Kraken refused the subscription: {obj.get('error')}")
    if obj.get("channel") != "trade" or obj.get("type") not in ("snapshot", "update"):
        return [
            Skipped("ignored", f"{str(obj.get('channel') or obj.get('method'))[:40]!r} message")
        ]
    data = obj.get("data")
    if not isinstance(data, list):
        return [Skipped("malformed", "trade message without a 'data' array")]
    return [_entry(entry) for entry in data]


def _entry(entry: object) -> FeedMessage | Skipped:
    if not isinstance(entry, dict):
        return Skipped("malformed", "a trade entry that is not an object")
    side = entry.get("side")
    if side not in ("buy", "sell"):
        return Skipped("malformed", f"trade side is not buy or sell: {str(side)[:20]!r}")
    raw_symbol = entry.get("symbol")
    try:
        symbol = stored_symbol(raw_symbol) if isinstance(raw_symbol, str) else None
    except ValueError:
        symbol = None
    if symbol is None:
        return Skipped("malformed", f"trade symbol is not a pair: {str(raw_symbol)[:40]!r}")
    trade = parse_trade_object(
        {
            "exchange": EXCHANGE,
            "symbol": symbol,
            "trade_id": entry.get("trade_id"),
            "price": entry.get("price"),
            "quantity": entry.get("qty"),
            "timestamp": entry.get("timestamp"),
            "is_buyer_maker": side == "sell",
        }
    )
    if isinstance(trade, Rejection):
        return Skipped("malformed", f"not a valid trade: {trade.reason}")
    return FeedMessage(0.0, trade.symbol.encode(), encode_trade(trade), "trade", trade.trade_id)


def kraken_messages(
    url: str,
    symbols: Sequence[str],
    *,
    stats: FeedStats | None = None,
    max_trades: int | None = None,
    initial_backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    open_timeout_s: float = 10.0,
    seed: int | None = None,
    record_reconnect: Record | None = None,
) -> AsyncIterator[FeedMessage]:
    """Canonical trade messages of ``symbols`` (stored names) from Kraken's v2 WebSocket at
    ``url``, reconnecting for ever (or until ``max_trades`` trades)."""
    return websocket_trades(
        url,
        normalise_message,
        log=log,
        subscribe=subscribe_message(symbols),
        symbols=symbols,
        stats=stats,
        max_trades=max_trades,
        initial_backoff_s=initial_backoff_s,
        max_backoff_s=max_backoff_s,
        open_timeout_s=open_timeout_s,
        max_size=1 << 22,
        seed=seed,
        record_reconnect=record_reconnect,
    )
