"""Recovery: what the stream worker does when its position, its log or its connections can no
longer be trusted (SPEC §4 "Offset resets", §5). A failed batch rewinds to the last committed
window state and offsets; a partition fenced by another worker is reloaded from what is
stored; a log that no longer holds the stored position is an offset reset, recorded and then
followed as ``CANDLEKEEP_OFFSET_RESET`` says; lost connections are reopened."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from shared.core.continuity import IdContinuity
from shared.core.trades import ts_to_datetime
from shared.core.windows import PartitionWindows, StateMismatch
from shared.errors import CandlekeepError
from shared.store import db
from shared.store.progress import Fenced, OffsetReset, load_progress, record_reset
from shared.store.trade_staging import keep_staging_table
from stream import metrics
from stream.state import PartitionState

log = structlog.get_logger("candlekeep.stream")
T = TypeVar("T")

#: Failures that a retry with backoff can outlive: PostgreSQL or the broker away for a while.
RETRYABLE = (
    psycopg.OperationalError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    db.DatabaseError,
    KafkaError,
    OSError,
)
#: A log end below the stored position is believed only after this long and this many fetch
#: answers in a row that say so. Measured on the embedded Tansu broker: the high watermark of
#: its fetch answers never fell below what a consumer had read (0 of 1,644 checks under a live
#: producer), while its ListOffsets end lags by the last producer batch (up to 149 messages)
#: for as long as the partition stays quiet, so ListOffsets alone never decides a reset. Kafka's
#: high watermark can lag briefly after a leader change. A few seconds cover both, and a lost
#: log is still noticed within seconds instead of waited on forever.
RESET_GRACE_S = 3.0
RESET_GRACE_CHECKS = 3


class OffsetResetStop(CandlekeepError):
    """An offset reset under ``CANDLEKEEP_OFFSET_RESET=fail``: recorded, then the worker stops."""


class Recovery:
    """The recovering side of ``StreamWorker`` (part of it: it uses the worker's consumer,
    partitions, lock and connections)."""

    async def _out_of_range(self, positions: dict) -> None:
        """A fetch position the broker says it does not have (Kafka; Tansu answers such a fetch
        with no records, see :meth:`_check_log_ends`). Below the log start: retention deleted
        messages before they were consumed, a reset at once. Above the end: a reset once the
        end has stayed below for the grace (a lagging high watermark catches up meanwhile)."""
        assert self._consumer is not None
        async with self._lock:
            for tp, offset in positions.items():
                state = self.partitions.get(tp.partition)
                if state is None or tp not in self._consumer.assignment():
                    continue
                first, end = await self._log_bounds(tp)
                stored = state.stored_offset or 0
                if stored < first:
                    await self._reset(tp.partition, "before_start", (first, end))
                    continue
                if offset < first:  # (the message checked by ``verify`` was deleted)
                    state.verify = None
                    self._consumer.seek(tp, stored)
                    continue
                if self._short(state, end, poll=time.monotonic_ns()):
                    await self._reset(tp.partition, "beyond_end", (first, end))
                    continue
                self._consumer.seek(tp, offset)
        await asyncio.sleep(0.1)

    async def _check_log_ends(self, busy: set[int]) -> None:
        """After a fetch: a partition whose log ends below the worker's position (the high
        watermark of the broker's last fetch answer) lost its log, once that has held for the
        grace. (Under the lock.)"""
        assert self._consumer is not None
        assignment = self._consumer.assignment()
        for partition, state in list(self.partitions.items()):
            tp = TopicPartition(self.topic, partition)
            if partition in busy or state.position is None or tp not in assignment:
                continue
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            if self._short(state, highwater, poll=self._consumer.last_poll_timestamp(tp)):
                await self._reset(partition, "beyond_end")

    def _short(self, state: PartitionState, end: int, poll: int | None) -> bool:
        """Note a log end ``end`` seen by a fetch answer (``poll``: when it came); True once it
        has been below the position for ``RESET_GRACE_S`` and ``RESET_GRACE_CHECKS`` answers."""
        position = state.position or 0
        if end >= position:
            if state.short_since is not None:
                log.info("log end caught up: no offset reset", end=end, position=position)
            state.short_since, state.short_checks = None, 0
            return False
        if poll is None or poll == state.last_poll:
            return False  # no new answer since the last look
        state.last_poll = poll
        now = time.monotonic()
        if state.short_since is None:
            state.short_since = now
            log.warning(
                "log ends below the stored position: checking again",
                end=end,
                position=position,
                grace_s=RESET_GRACE_S,
            )
        state.short_checks += 1
        return state.short_checks >= RESET_GRACE_CHECKS and now - state.short_since >= RESET_GRACE_S

    async def _log_bounds(self, tp: TopicPartition) -> tuple[int, int]:
        """The partition's log start and end: ListOffsets, with the end raised to the high
        watermark of the last fetch answer (Tansu's ListOffsets end lags by a producer batch)."""
        assert self._consumer is not None
        first = (await self._consumer.beginning_offsets([tp]))[tp]
        end = (await self._consumer.end_offsets([tp]))[tp]
        return first, max(end, self._consumer.highwater(tp) or 0)

    async def _reset(
        self, partition: int, kind: str, bounds: tuple[int, int] | None = None
    ) -> None:
        """Record an offset reset and follow ``CANDLEKEEP_OFFSET_RESET`` (under the lock): with
        ``earliest`` the partition goes on from the log start with its window state (trades
        below its watermark are then late, as they are), with ``fail`` the worker stops."""
        assert self._consumer is not None and self._conn is not None
        await self._drain()  # the partition's batches in flight commit (or fail) first
        state = self.partitions.get(partition)
        if state is None or state.stored_offset is None:
            return
        tp = TopicPartition(self.topic, partition)
        first, end = bounds or await self._log_bounds(tp)
        clock = state.windows.clock
        reset = OffsetReset(
            partition,
            kind,
            state.stored_offset,
            first,
            end,
            self.settings.offset_reset,
            None if clock.watermark_us is None else ts_to_datetime(clock.watermark_us),
            None if clock.max_ts_us is None else ts_to_datetime(clock.max_ts_us),
        )
        committed, reset_id = await self._loop_transaction(
            partition,
            lambda conn: asyncio.to_thread(record_reset, conn, self.group, self.topic, reset),
        )
        if not committed:
            return
        metrics.OFFSET_RESETS.labels(str(partition), kind).inc()
        metrics.MESSAGES_SKIPPED.labels(str(partition)).inc(reset.skipped)
        self.summary.resets += 1
        self.summary.skipped += reset.skipped
        log.error(
            "offset reset",
            topic=self.topic,
            partition=partition,
            kind=kind,
            stored_offset=reset.stored_offset,
            log_start=first,
            log_end=end,
            skipped=reset.skipped,
            watermark=reset.watermark.isoformat() if reset.watermark else None,
            policy=reset.policy,
            reset_id=reset_id,
        )
        if reset.policy == "fail":
            raise OffsetResetStop(
                f"{reset.describe(self.topic)}. Recorded in offset_resets (id {reset_id}); "
                "nothing was committed past it. To go on from the log's start, restart with "
                "CANDLEKEEP_OFFSET_RESET=earliest; to lose nothing, first replay the missing "
                "trades from their source (candlekeep feed replay). See docs/operations.md"
            )
        state.stored_offset = state.position = first
        state.last_digest = state.verify = None
        state.short_since, state.short_checks = None, 0
        state.reset_id = reset_id
        # (The group's offset in Kafka follows with the next batch's commit: committing here,
        # under the lock, could wait on a group coordinator that is itself recovering.)
        self._consumer.seek(tp, first)

    async def _loop_transaction(
        self, partition: int, work: Callable[[psycopg.Connection], Awaitable[T]]
    ) -> tuple[bool, T | None]:
        """Run ``work`` in a transaction on the loop's connection and commit it: (True, what it
        returned). A partition fenced by another worker is rolled back and reloaded from what
        is stored: (False, None). Any other failure is rolled back and raised."""
        conn = self._conn
        assert conn is not None
        try:
            value = await work(conn)
            await asyncio.to_thread(conn.commit)
        except Fenced:
            await asyncio.to_thread(conn.rollback)
            await self._reload(partition)
            return False, None
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(conn.rollback)
            raise
        return True, value

    async def _reconnect(self) -> None:
        """(Re)open every connection that is not open and well (nothing may be in flight)."""
        restored = self._conn is not None
        if not usable(self._conn):
            self._conn = closed(self._conn)  # (None until the new one is up)
            self._conn = await asyncio.to_thread(self._connect)
        for writer in self._writers:
            if not usable(writer.conn):
                writer.conn = closed(writer.conn)
                writer.conn = await asyncio.to_thread(db.connect, self.database_url)
                await asyncio.to_thread(keep_staging_table, writer.conn)
        if restored:
            log.info("database connection restored")

    async def _rewind(self) -> None:
        """After a failed batch: back to the last committed state and offsets."""
        with contextlib.suppress(*RETRYABLE):  # (the batch in flight failed too, or commits)
            await self._drain()
        async with self._lock:
            for partition, state in self.partitions.items():
                state.windows = PartitionWindows.restore(
                    self.window_settings, state.committed_state
                )
                state.continuity = IdContinuity.restore(
                    self.settings.consecutive_exchanges, state.committed_continuity
                )
                state.position = state.stored_offset
                await self._seek(partition, state.stored_offset, state.verify)

    async def _reload(self, partition: int, conn: psycopg.Connection | None = None) -> None:
        """(Re)load a partition's committed progress from PostgreSQL and seek to it (``conn``:
        a writer's, between its transactions; by default the loop's, which also checks that the
        stored position is not before the log start)."""
        on_loop = conn is None
        conn = conn or self._conn
        assert conn is not None
        progress = await asyncio.to_thread(load_progress, conn, self.group, self.topic, partition)
        try:
            windows = PartitionWindows.restore(self.window_settings, progress.window_state)
            continuity = IdContinuity.restore(
                self.settings.consecutive_exchanges, progress.continuity_state
            )
        except (StateMismatch, ValueError) as exc:
            raise CandlekeepError(f"partition {partition}: {exc}") from None
        state = PartitionState(
            windows,
            progress.window_state,
            progress.next_offset,
            last_digest=progress.last_digest,
            reset_id=progress.pending_reset,
            continuity=continuity,
            committed_continuity=progress.continuity_state,
        )
        if progress.next_offset and progress.last_digest is not None:
            state.verify = (progress.next_offset - 1, progress.last_digest)
        self.partitions[partition] = state
        tp = TopicPartition(self.topic, partition)
        if on_loop and progress.next_offset is not None and tp in self._consumer.assignment():
            first, end = await self._log_bounds(tp)
            if progress.next_offset < first:
                await self._reset(partition, "before_start", (first, end))
                return
        await self._seek(partition, progress.next_offset, state.verify)

    async def _seek(
        self, partition: int, offset: int | None, verify: tuple[int, int] | None = None
    ) -> None:
        """Position the consumer at ``offset`` (None: the log start), or at the message to
        check again first (``verify``)."""
        assert self._consumer is not None
        tp = TopicPartition(self.topic, partition)
        if tp not in self._consumer.assignment():
            return
        if offset is None:
            await self._consumer.seek_to_beginning(tp)
        else:
            self._consumer.seek(tp, verify[0] if verify else offset)


def usable(conn: psycopg.Connection | None) -> bool:
    return conn is not None and not conn.closed and not conn.broken


def closed(conn: psycopg.Connection | None) -> None:
    """Close ``conn`` if there is one, whatever state it is in."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
