"""Replaying trade files to Kafka, and producing an open-ended sequence of feed messages.

:func:`replay_messages` turns trades (from Binance CSVs or canonical JSONL, read by
``candlekeep.trade_input.TradeInput``) into canonical trade messages, each with the wall-clock
offset to send it at: its event time after the first trade's, so that a replay keeps the
original pace (times a speed factor). :func:`encode_trade` writes a canonical message that
parses back to the same :class:`~shared.core.trades.Trade`: prices and quantities as the exact
decimal strings, the timestamp in epoch milliseconds, or, when it is not a whole millisecond
(Binance's microsecond files), as ISO-8601 with microseconds, so no precision is lost.

:func:`produce_live` sends messages as they come (a file read lazily, or a WebSocket that never
ends), keeping only counts: unlike :func:`stream.feeds.produce.produce` it holds no per-message
record, so a feed can run for days or replay a file of millions of trades in constant memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass

import msgspec
from aiokafka.errors import KafkaError

from shared.core.candle_formats import iso
from shared.core.intervals import US_PER_MS
from shared.core.trades import Trade
from stream.feeds.produce import FeedError, start_producer
from stream.feeds.synthetic import FeedMessage

_json = msgspec.json.Encoder()

#: How many sends may wait for their acknowledgement before the feed waits for them.
MAX_IN_FLIGHT = 10_000


def canonical_timestamp(ts_us: int) -> int | str:
    """A trade time as the canonical message spells it: epoch ms when that is exact, else
    ISO-8601 UTC with microseconds (``2025-01-01T00:00:00.000123Z``)."""
    if ts_us % US_PER_MS == 0:
        return ts_us // US_PER_MS
    return iso(ts_us)


def trade_object(trade: Trade) -> dict:
    """The canonical message object of a trade (field order as in docs/trades.md)."""
    obj: dict = {
        "exchange": trade.exchange,
        "symbol": trade.symbol,
        "trade_id": trade.trade_id,
        "price": format(trade.price, "f"),
        "quantity": format(trade.quantity, "f"),
        "timestamp": canonical_timestamp(trade.ts_us),
    }
    if trade.is_buyer_maker is not None:
        obj["is_buyer_maker"] = trade.is_buyer_maker
    return obj


def encode_trade(trade: Trade) -> bytes:
    """The canonical message (UTF-8 JSON) of a trade; parses back to the same values."""
    return _json.encode(trade_object(trade))


def replay_messages(trades: Iterable[Trade]) -> Iterator[FeedMessage]:
    """One message per trade, in the given order, keyed by symbol; ``send_at_s`` is the trade's
    event time after the first trade's (a trade stamped earlier than the first is due at once).
    """
    first_us: int | None = None
    for trade in trades:
        if first_us is None:
            first_us = trade.ts_us
        yield FeedMessage(
            max(0.0, (trade.ts_us - first_us) / 1_000_000),
            trade.symbol.encode(),
            encode_trade(trade),
            "trade",
        )


@dataclass
class SendStats:
    """What :func:`produce_live` did so far (readable while it runs and after it stops)."""

    sent: int = 0  # handed to the producer
    delivered: int = 0  # acknowledged by the broker
    started_at: float = 0.0
    finished_at: float | None = None

    @property
    def elapsed_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at


async def _from_sync(messages: Iterable[FeedMessage]) -> AsyncIterator[FeedMessage]:
    for message in messages:
        yield message


async def produce_live(
    bootstrap_servers: str,
    topic: str,
    messages: Iterable[FeedMessage] | AsyncIterable[FeedMessage],
    *,
    speed: float | None = None,
    stats: SendStats | None = None,
    on_delivered: Callable[[int], None] | None = None,
) -> SendStats:
    """Send every message in order (the key picks the partition) until the messages end.

    ``speed`` paces them at ``send_at_s / speed`` seconds after the start (None: as fast as
    possible). A failed delivery stops the feed with a :class:`FeedError`; on cancellation the
    messages already sent are flushed before returning control.
    """
    stats = stats or SendStats()
    producer = await start_producer(bootstrap_servers)
    failures: list[BaseException] = []
    in_flight: set[asyncio.Future] = set()

    def settled(future: asyncio.Future) -> None:
        in_flight.discard(future)
        if future.cancelled():
            return
        if future.exception() is not None:
            failures.append(future.exception())
            return
        stats.delivered += 1
        if on_delivered:
            on_delivered(stats.delivered)

    stats.started_at = time.monotonic()
    try:
        source = messages if isinstance(messages, AsyncIterable) else _from_sync(messages)
        async for message in source:
            if failures:
                break
            if speed:
                delay = message.send_at_s / speed - (time.monotonic() - stats.started_at)
                if delay > 0:
                    await asyncio.sleep(delay)
            future = await producer.send(topic, message.value, key=message.key)
            stats.sent += 1
            in_flight.add(future)
            future.add_done_callback(settled)
            if len(in_flight) >= MAX_IN_FLIGHT:
                await asyncio.wait(set(in_flight))
        if in_flight:
            await asyncio.wait(set(in_flight))
    finally:
        try:
            await producer.stop()  # flushes what was sent
        finally:
            stats.finished_at = time.monotonic()
    if failures:
        error = failures[0]
        detail = str(error) or type(error).__name__
        if isinstance(error, KafkaError):
            raise FeedError(f"delivery to {topic} on {bootstrap_servers} failed: {detail}")
        raise error
    return stats
