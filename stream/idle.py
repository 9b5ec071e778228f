"""The idle tick (SPEC §4 "Idle advance"): a quiet partition's watermark follows the wall clock
while it is caught up, so a live symbol that goes quiet still gets its candles, and the worker
knows when it has been idle long enough to exit (``exit_when_idle_s``)."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from stream import metrics
from stream.state import PartitionState
from stream.writers import write_tick

TICK_EVERY_S = 1.0


class IdleTick:
    """The idle side of ``StreamWorker`` (part of it: it uses the worker's consumer, partitions
    and loop connection)."""

    def _idle_long_enough(self) -> bool:
        """Quiet for ``exit_when_idle_s`` and at the end of every assigned partition: a broker
        that stalls (or a rebalance) makes the worker quiet too, with messages still to read."""
        if self.exit_when_idle_s is None:
            return False
        if not self._joined or self.wall_clock() - self._last_message_at < self.exit_when_idle_s:
            return False  # (joining a group can take longer than the idle time)
        return not self._pending and all(
            self._caught_up(TopicPartition(self.topic, partition), state)
            for partition, state in self.partitions.items()
        )

    async def _tick(self, busy: set[int]) -> None:
        """Idle advance for quiet partitions (at most once a second each), on the loop's own
        connection: a partition with batches in flight is not quiet, and is left alone."""
        assert self._consumer is not None and self._conn is not None
        now = self.wall_clock()
        for partition, state in list(self.partitions.items()):
            if partition in busy or state.inflight or now - state.last_tick < TICK_EVERY_S:
                continue
            state.last_tick = now
            tp = TopicPartition(self.topic, partition)
            caught_up = self._caught_up(tp, state)
            before = state.windows.watermark_us
            emission = state.windows.advance(int(now * 1_000_000), caught_up)
            metrics.set_gauges(partition, state, now)
            if (
                not emission.candles
                and state.windows.watermark_us == before
                and not self._gaps_waiting(state)
            ):
                continue

            gaps = self._gap_check(partition)

            async def write(conn, partition=partition, state=state, emission=emission, gaps=gaps):
                merged = await asyncio.to_thread(
                    write_tick,
                    conn,
                    self.group,
                    self.topic,
                    partition,
                    state.stored_offset,
                    emission,
                    state.windows,
                    gaps,
                )
                await self._outputs.send_candles(merged)

            committed, _ = await self._loop_transaction(partition, write)
            if not committed:
                continue
            state.committed_state = state.windows.snapshot()
            if gaps.snapshot is not None:  # (None: nothing consumed yet, nothing written)
                self._gaps_committed(partition, gaps)
            self.summary.candles += len(emission.candles)
            for candle in emission.candles:
                metrics.CANDLES.labels(candle.interval).inc()

    def _caught_up(self, tp: TopicPartition, state: PartitionState) -> bool:
        """At the end of the log: everything up to the high watermark is committed.

        (Not ``consumer.position()``: it can wait on a rebalance, which waits on our lock.)
        """
        assert self._consumer is not None
        if tp not in self._consumer.assignment():
            return False  # (highwater() asserts that it is)
        if state.verify is not None or state.short_since is not None:
            return False  # (the log is being checked: not known to be at its end)
        highwater = self._consumer.highwater(tp)
        if highwater is None:
            return False
        return (state.stored_offset or 0) >= highwater
