"""Producing feed messages to Kafka: the one producer every feed sends through.

A feed (the synthetic market, a file replay, Binance's WebSocket) is an iterable of
:class:`FeedMessage`: the message, its key (the symbol, which picks the partition) and when to
send it. :func:`send_messages` sends them in order, optionally at their own pace, keeping only
counts (:class:`SendStats`), so a feed can run for days or replay a file of millions of trades
in constant memory. :func:`produce` is the same, recording where each message landed, for
callers that need the partitions and offsets (the demo and the tests' reference model).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.structs import RecordMetadata

from shared.errors import CandlekeepError

#: How many sends may wait for their acknowledgement before the feed waits for them.
MAX_IN_FLIGHT = 10_000


class FeedError(CandlekeepError):
    pass


@dataclass(frozen=True)
class FeedMessage:
    send_at_s: float  # seconds after the feed's first message, at real pace
    key: bytes | None
    value: bytes
    kind: str  # trade, disordered, late, duplicate, invalid
    trade_id: int | None = None  # a venue feed's trade id (its reconnect log reads it)


@dataclass
class Delivery:
    partition: int
    offset: int
    message: FeedMessage


@dataclass
class SendStats:
    """What :func:`send_messages` did so far (readable while it runs and after it stops)."""

    sent: int = 0  # handed to the producer
    delivered: int = 0  # acknowledged by the broker
    started_at: float = 0.0
    finished_at: float | None = None

    @property
    def elapsed_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at


#: A feed: its messages in send order, read as they are sent (a generator, a WebSocket).
Messages = Iterable[FeedMessage] | AsyncIterable[FeedMessage]
#: Called once a message is acknowledged: its position in the feed (from 0), the message, and
#: where it landed.
OnDelivery = Callable[[int, FeedMessage, RecordMetadata], None]


def _unreachable(bootstrap_servers: str, exc: KafkaConnectionError) -> FeedError:
    return FeedError(
        f"cannot reach Kafka at {bootstrap_servers}: {exc}. Check KAFKA_BOOTSTRAP_SERVERS"
    )


async def ensure_topic(bootstrap_servers: str, topic: str, partitions: int) -> None:
    """Create ``topic`` with ``partitions`` partitions unless it exists."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        raise _unreachable(bootstrap_servers, exc) from None
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def start_producer(bootstrap_servers: str) -> AIOKafkaProducer:
    """A started producer (acks from all replicas), or a :class:`FeedError` saying what to do."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_request_size=8 * 1024 * 1024,
    )
    try:
        await producer.start()
    except KafkaConnectionError as exc:
        await producer.stop()
        raise _unreachable(bootstrap_servers, exc) from None
    return producer


async def _each(messages: Messages) -> AsyncGenerator[FeedMessage, None]:
    if isinstance(messages, AsyncIterable):
        async for message in messages:
            yield message
    else:
        for message in messages:
            yield message


async def send_messages(
    bootstrap_servers: str,
    topic: str,
    messages: Messages,
    *,
    speed: float | None = None,
    stats: SendStats | None = None,
    on_delivery: OnDelivery | None = None,
) -> SendStats:
    """Send every message in order (the key picks the partition) until the messages end.

    ``speed`` paces them at ``send_at_s / speed`` seconds after the start (None: as fast as
    possible). At most :data:`MAX_IN_FLIGHT` sends wait for their acknowledgement at a time.
    A failed delivery stops the feed with a :class:`FeedError`; on cancellation the messages
    already sent are flushed before returning control. An async generator given as
    ``messages`` is closed when sending stops.
    """
    stats = stats or SendStats()
    producer = await start_producer(bootstrap_servers)
    failures: list[BaseException] = []
    in_flight: set[asyncio.Future] = set()

    def settled(n: int, message: FeedMessage, future: asyncio.Future) -> None:
        in_flight.discard(future)
        if future.cancelled():
            return
        if future.exception() is not None:
            failures.append(future.exception())
            return
        stats.delivered += 1
        if on_delivery:
            on_delivery(n, message, future.result())

    stats.started_at = time.monotonic()
    source = messages if isinstance(messages, AsyncGenerator) else _each(messages)
    try:
        # Closed when sending stops: a WebSocket feed closes its connection then, not at exit.
        async with contextlib.aclosing(source):
            async for message in source:
                if failures:
                    break
                if speed:
                    delay = message.send_at_s / speed - (time.monotonic() - stats.started_at)
                    if delay > 0:
                        await asyncio.sleep(delay)
                future = await producer.send(topic, message.value, key=message.key)
                in_flight.add(future)
                future.add_done_callback(functools.partial(settled, stats.sent, message))
                stats.sent += 1
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


async def produce(
    bootstrap_servers: str,
    topic: str,
    messages: Messages,
    *,
    speed: float | None = None,
) -> list[Delivery]:
    """:func:`send_messages`, returning where each message landed, in feed order. It holds a
    record per message: for feeds of known, bounded length."""
    landed: dict[int, Delivery] = {}

    def record(n: int, message: FeedMessage, metadata: RecordMetadata) -> None:
        landed[n] = Delivery(metadata.partition, metadata.offset, message)

    await send_messages(bootstrap_servers, topic, messages, speed=speed, on_delivery=record)
    return [landed[n] for n in range(len(landed))]
