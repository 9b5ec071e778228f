"""The worker's Kafka outputs (SPEC §5, at least once): merged candles, late trades and invalid
messages, each sent and acknowledged by the broker before the transaction that wrote them
commits (the messages themselves: ``stream.messages``)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer

from shared.config import Settings
from shared.core.candles import Candle
from shared.core.windows import Emission
from stream import messages


class Outputs:
    """Sends a worker's outputs on its producer."""

    def __init__(self, producer: AIOKafkaProducer, settings: Settings) -> None:
        self.producer = producer
        self.topic_candles = settings.topic_candles
        self.topic_late = settings.topic_late
        self.topic_invalid = settings.topic_invalid

    async def send_late_and_invalid(self, results) -> None:
        """Send the batch's late and invalid outputs and wait for the broker's acknowledgement
        (its candles are the merged ones: :meth:`send_candles`)."""
        futures = []
        send = self.producer.send
        for batch, result in results:
            emission: Emission = result.emission
            for late in emission.late:
                offset = batch.offset_of(late.trade)
                offset = -1 if offset is None else offset
                key, value = messages.late_message(late, batch.partition, offset)
                futures.append(await send(self.topic_late, value, key=key))
            for invalid in batch.invalid:
                key, value = messages.invalid_message(invalid)
                futures.append(await send(self.topic_invalid, value, key=key))
        if futures:
            await asyncio.gather(*futures)

    async def send_candles(self, candles: list[Candle]) -> None:
        """Send merged candles (``stream_candles`` rows, with their revision) and wait for the
        broker's acknowledgement."""
        send = self.producer.send
        futures = []
        for candle in candles:
            key, value = messages.candle_message(candle)
            futures.append(await send(self.topic_candles, value, key=key))
        if futures:
            await asyncio.gather(*futures)
