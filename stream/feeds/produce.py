"""Producing feed messages to Kafka: the topic is created with the wanted partitions, messages
go out in feed order (the key, the symbol, picks the partition), optionally at real pace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from shared.errors import CandlekeepError
from stream.feeds.synthetic import FeedMessage


class FeedError(CandlekeepError):
    pass


@dataclass
class Delivery:
    partition: int
    offset: int
    message: FeedMessage


async def ensure_topic(bootstrap_servers: str, topic: str, partitions: int) -> None:
    """Create ``topic`` with ``partitions`` partitions unless it exists."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        raise FeedError(
            f"cannot reach Kafka at {bootstrap_servers}: {exc}. Check KAFKA_BOOTSTRAP_SERVERS"
        ) from None
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
        raise FeedError(
            f"cannot reach Kafka at {bootstrap_servers}: {exc}. Check KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    return producer


async def produce(
    bootstrap_servers: str,
    topic: str,
    messages: Iterable[FeedMessage],
    *,
    speed: float | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> list[Delivery]:
    """Send every message in order; ``speed`` paces them at ``send_at_s / speed`` (None: as fast
    as possible). Returns where each landed."""
    producer = await start_producer(bootstrap_servers)
    started = time.monotonic()
    pending: list[tuple[asyncio.Future, FeedMessage]] = []
    deliveries: list[Delivery] = []
    try:
        for n, message in enumerate(messages, 1):
            if speed:
                delay = message.send_at_s / speed - (time.monotonic() - started)
                if delay > 0:
                    await asyncio.sleep(delay)
            future = await producer.send(topic, message.value, key=message.key)
            pending.append((future, message))
            if len(pending) >= 2000:
                deliveries += await _settle(pending)
                if on_sent:
                    on_sent(n)
        deliveries += await _settle(pending)
    finally:
        await producer.stop()
    return deliveries


async def _settle(pending: list[tuple[asyncio.Future, FeedMessage]]) -> list[Delivery]:
    results = await asyncio.gather(*(f for f, _ in pending))
    out = [Delivery(r.partition, r.offset, m) for r, (_, m) in zip(results, pending, strict=True)]
    pending.clear()
    return out
