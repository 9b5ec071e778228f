"""Sends the batch's corrections on the ``candles`` topic (SPEC §6.2): the shell around
``shared.batch.finality``'s outbox, called by the DAG's task and ``candlekeep reconcile``.

Each correction is the batch candle in the stream's own message (``stream.messages``: same key
``exchange:symbol:interval:window_start``, same JSON, same partitioner), with a revision above
every one the stream sent for the key, so a consumer that keeps the highest revision per key
ends with the batch candle. Corrections are marked published only once the broker acknowledged
them (``acks=all``); if sending fails they stay pending and the next run sends them: at least
once, like every output of the stream.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.batch.finality import mark_published, pending_corrections
from shared.config import Settings
from shared.errors import CandlekeepError
from shared.store import db
from stream import messages

#: Corrections sent and acknowledged per round (one query, one flush, one update).
ROUND = 5_000


class CorrectionsNotSent(CandlekeepError):
    """The broker could not take the corrections: they stay pending for the next run."""


def pending_count(url: str) -> int:
    with db.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM candle_corrections WHERE published_at IS NULL"
        ).fetchone()[0]


async def _publish(url: str, topic: str, bootstrap: str, timeout_s: float) -> int:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        request_timeout_ms=int(timeout_s * 1e3),
    )
    await asyncio.wait_for(producer.start(), timeout_s)
    sent = 0
    try:
        while True:
            with db.connect(url) as conn:
                candles = pending_corrections(conn, ROUND)
            if not candles:
                return sent
            futures = []
            for candle in candles:
                key, value = messages.candle_message(candle)
                futures.append(await producer.send(topic, value, key=key))
            await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
            with db.connect(url) as conn:
                mark_published(conn, candles)
                conn.commit()
            sent += len(candles)
            if len(candles) < ROUND:
                return sent
    finally:
        await producer.stop()


def publish_corrections(url: str, settings: Settings, *, timeout_s: float = 30.0) -> int:
    """Send every pending correction (any period) and mark it published; return how many.
    Raises :class:`CorrectionsNotSent` (a message for a person) when the broker is unreachable
    or not configured; nothing is lost, the next run sends them."""
    bootstrap = settings.kafka_bootstrap_servers
    if not bootstrap:
        raise CorrectionsNotSent(
            f"{pending_count(url)} corrections are pending, and KAFKA_BOOTSTRAP_SERVERS is not "
            "set: set it to the brokers the stream writes its candles to"
        )
    try:
        return asyncio.run(_publish(url, settings.topic_candles, bootstrap, timeout_s))
    except (KafkaError, TimeoutError, OSError) as exc:
        raise CorrectionsNotSent(
            f"could not send the corrections to the {settings.topic_candles!r} topic at "
            f"{bootstrap} ({type(exc).__name__}: {exc}): {pending_count(url)} stay pending and "
            "the next run sends them; check that the brokers are up"
        ) from None


def send_corrections(url: str, settings: Settings) -> dict:
    """What the DAG's ``send_corrections`` task does: every pending correction sent, or, where no
    broker is configured, how many wait (the stream is then not Kafka-fed: nothing to correct).
    A broker that does not answer raises :class:`CorrectionsNotSent`: the task is retried and
    the next run sends them too."""
    if not settings.kafka_bootstrap_servers:
        return {"sent": 0, "pending": pending_count(url), "kafka": "not configured"}
    return {"sent": publish_corrections(url, settings), "pending": 0}
