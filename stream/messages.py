"""The worker's Kafka output messages: candles, late trades and invalid messages.

Outputs are at least once (SPEC §5): a consumer dedupes candles by key and revision (the highest
revision, and on a tie the later message: a failed transaction's candle may be sent again, with
the same revision, merged with parts committed meanwhile), late and invalid messages by their
source partition and offset. A candle message is the ``stream_candles`` row: the merge of every
partition's part of its window.
"""

from __future__ import annotations

import base64

import msgspec

from shared.core.candle_formats import candle_record, iso, plain
from shared.core.candles import Candle
from shared.core.windows import LateTrade
from shared.store.trade_store import InvalidMessage

_json = msgspec.json.Encoder()


def candle_key(candle: Candle) -> bytes:
    """``exchange:symbol:interval:window_start`` (window start in ISO-8601 UTC)."""
    return (
        f"{candle.exchange}:{candle.symbol}:{candle.interval}:{iso(candle.window_start_us)}"
    ).encode()


def candle_message(candle: Candle) -> tuple[bytes, bytes]:
    record = candle_record(candle)
    record["revision"] = candle.revision
    return candle_key(candle), _json.encode(record)


def late_message(late: LateTrade, partition: int, offset: int) -> tuple[bytes, bytes]:
    trade = late.trade
    return trade.symbol.encode(), _json.encode(
        {
            "exchange": trade.exchange,
            "symbol": trade.symbol,
            "trade_id": trade.trade_id,
            "timestamp": iso(trade.ts_us),
            "price": plain(trade.price),
            "quantity": plain(trade.quantity),
            "is_buyer_maker": trade.is_buyer_maker,
            "window_start": iso(late.window_start_us),
            "watermark": iso(late.watermark_us),
            "lateness_ms": late.lateness_us // 1000,
            "source_partition": partition,
            "source_offset": offset,
        }
    )


def invalid_message(message: InvalidMessage) -> tuple[bytes | None, bytes]:
    raw = message.raw or b""
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return message.key, _json.encode(
        {
            "reason_code": message.code,
            "reason": message.reason,
            "source": message.source,
            "source_partition": message.partition,
            "source_offset": message.offset,
            "raw": text if text is not None and len(text) <= 4096 else None,
            "raw_base64": None if text is not None else base64.b64encode(raw[:4096]).decode(),
        }
    )
