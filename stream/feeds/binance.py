"""Binance's live trade streams (spot and USD-M futures), as canonical trade messages.

The combined stream ``<url>/stream?streams=btcusdt@trade/ethusdt@trade`` sends one frame per
trade::

    {"stream": "btcusdt@trade",
     "data": {"e": "trade", "E": 1672515782136, "s": "BTCUSDT", "t": 12345, "p": "0.001",
              "q": "100", "T": 1672515782136, "m": true, "M": true}}

:func:`normalise_frame` (pure) reads a frame as a trade (symbol, trade_id = t, price = p,
quantity = q, exactly, timestamp = T in ms or µs, exchange ``binance`` or ``binance-usdm``,
is_buyer_maker = m, and on USD-M the kind from ``X``: ``MARKET`` is ``market``, any other
(``INSURANCE_FUND``, ``ADL``, ``NA``) lower-cased: stored, never folded, as Binance's own futures
klines count only MARKET trades, SPEC §2) by the parser's rules, and writes it as the canonical
message (:func:`shared.core.trade_messages.encode_trade`) keyed by the symbol; other events are
ignored, malformed frames skipped with a reason. :func:`binance_messages` keeps a connection
open: on a disconnect (Binance also closes every connection after 24 hours) it reconnects with
exponential backoff and jitter, logging each reconnect with the last trade id before it and the
first after it per symbol (:mod:`stream.feeds.reconnects`), and never gives up while it is
wanted; ``candlekeep feed binance`` sends its messages through :mod:`stream.feeds.produce`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

import msgspec
import structlog

from shared.core.trade_files import MICROSECOND_THRESHOLD
from shared.core.trade_messages import canonical_timestamp, encode_trade, parse_trade_object
from shared.core.trade_rules import normalise_symbol
from shared.core.trades import Rejection
from stream.feeds.produce import FeedMessage
from stream.feeds.reconnects import Record
from stream.feeds.websocket import FeedStats, Skipped, websocket_trades

log = structlog.get_logger("candlekeep.feed.binance")

DEFAULT_URL = "wss://stream.binance.com:9443"
EXCHANGE = "binance"
#: ``--market``: its exchange name (SPEC §2) and its public WebSocket endpoint.
MARKETS = {
    "spot": (EXCHANGE, DEFAULT_URL),
    "usdm": ("binance-usdm", "wss://fstream.binance.com"),
}
_SYMBOL_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_decode = msgspec.json.Decoder(float_hook=Decimal)


def parse_symbols(text: str) -> list[str]:
    """``btcusdt,ETHUSDT`` → ``["BTCUSDT", "ETHUSDT"]`` (ValueError naming a bad one)."""
    symbols = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        # SPEC §2's rule first (the one every entry point shares), then Binance's own, narrower.
        symbol = normalise_symbol(raw)
        if symbol is None or not _SYMBOL_RE.fullmatch(symbol):
            raise ValueError(
                f"{raw.strip()[:40]!r} is not a Binance symbol (1-32 letters and digits only)"
            )
        symbols.append(symbol)
    if not symbols:
        raise ValueError("no symbols given: e.g. --symbols btcusdt,ethusdt")
    return list(dict.fromkeys(symbols))


def stream_url(base_url: str, symbols: Sequence[str]) -> str:
    """The combined trade stream of ``symbols`` at ``base_url`` (a URL that already names its
    streams is used as it is)."""
    if "streams=" in base_url:
        return base_url
    streams = "/".join(f"{s.lower()}@trade" for s in symbols)
    return f"{base_url.rstrip('/')}/stream?streams={streams}"


def normalise_frame(frame: str | bytes, exchange: str = EXCHANGE) -> FeedMessage | Skipped:
    """One WebSocket frame as the canonical trade message of ``exchange``, or why it is none.
    Never raises."""
    try:
        obj = _decode.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        return Skipped("malformed", f"not JSON: {exc}")
    if not isinstance(obj, dict):
        return Skipped("malformed", f"a JSON {type(obj).__name__}, not an object")
    data = obj.get("data", obj) if "stream" in obj else obj
    if not isinstance(data, dict):
        return Skipped("malformed", "'data' is not an object")
    event = data.get("e")
    if event is None:
        if "result" in data or "id" in data:
            return Skipped("ignored", "a reply to a request, not an event")
        return Skipped("malformed", "no event type 'e'")
    if event != "trade":
        return Skipped("ignored", f"{str(event)[:40]!r} event, not a trade")
    try:
        obj = _message_fields(data, exchange)
    except _Malformed as exc:
        return Skipped("malformed", str(exc))
    trade = parse_trade_object(obj)
    if isinstance(trade, Rejection):
        return Skipped("malformed", f"not a valid trade: {trade.reason}")
    return FeedMessage(0.0, trade.symbol.encode(), encode_trade(trade), "trade", trade.trade_id)


class _Malformed(Exception):
    pass


def _field(data: dict, name: str, types: tuple[type, ...], what: str) -> Any:
    value = data.get(name)
    if value is None:
        raise _Malformed(f"trade without {what} ({name!r})")
    if isinstance(value, bool) or not isinstance(value, types):
        raise _Malformed(f"{what} ({name!r}) has the wrong type: {str(value)[:40]!r}")
    return value


def _message_fields(data: dict, exchange: str) -> dict:
    """A trade event's fields under the canonical message's names, for the one parser's rules
    (SPEC §2); Binance's own type rules are checked here, to name its fields in the reason."""
    symbol = _field(data, "s", (str,), "symbol")
    trade_id = _field(data, "t", (int,), "trade id")
    price = _field(data, "p", (str, Decimal, int), "price")
    quantity = _field(data, "q", (str, Decimal, int), "quantity")
    ts = _field(data, "T", (int,), "trade time")
    maker = data.get("m")
    if maker is not None and not isinstance(maker, bool):
        raise _Malformed(f"buyer-is-maker ('m') is not a boolean: {str(maker)[:40]!r}")
    kind = data.get("X")
    if kind is not None and not isinstance(kind, str):
        raise _Malformed(f"trade kind ('X') is not a string: {str(kind)[:40]!r}")
    # Milliseconds unless the stream was asked for microseconds (timeUnit=MICROSECOND).
    ts_us = ts if ts >= MICROSECOND_THRESHOLD else ts * 1000
    return {
        "exchange": exchange,
        "symbol": symbol,
        "trade_id": trade_id,
        "price": price,
        "quantity": quantity,
        "timestamp": canonical_timestamp(ts_us),
        "is_buyer_maker": maker,
        "kind": kind,  # None: a spot frame (no X), a market trade
    }


#: (A feed's counters, by the name the CLI and the tests know.)
BinanceStats = FeedStats


def binance_messages(
    url: str,
    *,
    exchange: str = EXCHANGE,
    stats: BinanceStats | None = None,
    max_trades: int | None = None,
    initial_backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    open_timeout_s: float = 10.0,
    seed: int | None = None,
    record_reconnect: Record | None = None,
) -> AsyncIterator[FeedMessage]:
    """Canonical trade messages from the WebSocket at ``url``, reconnecting for ever (or until
    ``max_trades`` trades). Malformed frames are logged and skipped."""
    return websocket_trades(
        url,
        lambda frame: (normalise_frame(frame, exchange),),
        log=log,
        stats=stats,
        max_trades=max_trades,
        initial_backoff_s=initial_backoff_s,
        max_backoff_s=max_backoff_s,
        open_timeout_s=open_timeout_s,
        seed=seed,
        record_reconnect=record_reconnect,
    )
