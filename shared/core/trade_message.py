"""Writing the canonical trade message (SPEC §2): the one builder, the inverse of the parser.

Every feed (the synthetic market, file replay, Binance's WebSocket) writes its trades through
:func:`encode_trade`, so a message that leaves candlekeep is spelled one way and reads back,
through :func:`shared.core.trades.parse_trade_message`, as the very same :class:`Trade`
(``tests/test_trade_message.py`` checks that round trip for any trade). Prices and quantities
travel as exact decimal strings in plain notation (never through a float, never ``1E-8``); the
timestamp as epoch milliseconds, or as ISO-8601 with microseconds when it is not a whole
millisecond (Binance's microsecond files), so no precision is lost.
"""

from __future__ import annotations

import msgspec

from shared.core.candle_formats import iso
from shared.core.intervals import US_PER_MS
from shared.core.trades import Trade


class _CanonicalMessage(msgspec.Struct, omit_defaults=True, gc=False):
    """The message's fields, in the order the feeds write them (exchange first); a side that is
    not known is left out (``omit_defaults``), as SPEC §2 allows. A struct, not a dict: msgspec
    encodes it in C without building a mapping, which the synthetic market does per message."""

    exchange: str
    symbol: str
    trade_id: int
    price: str
    quantity: str
    timestamp: int | str
    is_buyer_maker: bool | None = None


_encoder = msgspec.json.Encoder()


def canonical_timestamp(ts_us: int) -> int | str:
    """A trade time as the canonical message spells it: epoch ms when that is exact, else
    ISO-8601 UTC with microseconds (``2025-01-01T00:00:00.000123Z``)."""
    if ts_us % US_PER_MS == 0:
        return ts_us // US_PER_MS
    return iso(ts_us)


def encode_trade(trade: Trade, *, iso_timestamp: bool = False) -> bytes:
    """The canonical message (UTF-8 JSON) of ``trade``; it parses back to the same values.

    ``iso_timestamp`` spells the time as ISO-8601 even when it is a whole millisecond: venues
    use both spellings, and the synthetic market mixes them so that the parser meets both.
    (``raw_trades`` is not part of the message: a message stands for one trade.)
    """
    return _encoder.encode(
        _CanonicalMessage(
            trade.exchange,
            trade.symbol,
            trade.trade_id,
            format(trade.price, "f"),
            format(trade.quantity, "f"),
            iso(trade.ts_us) if iso_timestamp else canonical_timestamp(trade.ts_us),
            trade.is_buyer_maker,
        )
    )
