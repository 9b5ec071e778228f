"""The writers: each a PostgreSQL connection that writes batches, one transaction per batch
with everything in it (SPEC §5), and the batches in flight on it.

The trades, candles, late and invalid rows of a batch, the partition's next offset, its
watermark, counters and open-window state are committed together (through ``shared.store``),
so a worker killed at any instant resumes from exactly what was committed: nothing lost,
nothing counted twice. A fence (``shared.store.progress.fence``) makes this hold across
rebalances too.

The partitions are spread over the writers, so that one writer's Python runs while another
waits on PostgreSQL. A writer takes its batches one at a time, in order (``PIPELINE_DEPTH`` in
flight at most): the write of a batch starts only once the writer's previous one has committed
(or failed, which throws the batches queued behind it away with the rest). A partition always
goes to the same writer, so its batches, offsets and window state commit in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from shared.core.candles import Candle
from shared.core.trades import Trade
from shared.core.windows import Emission, PartitionWindows
from shared.store.late_trades import write_late
from shared.store.progress import Fenced, fence, mark_resumed, write_progress
from shared.store.stream_candles import merge_parts, merged_candles, write_candles, write_parts
from shared.store.trade_store import (
    FRESH_SAVEPOINT,
    Source,
    prepare_trades,
    store_invalid,
    store_prepared,
)
from stream import metrics
from stream.gaps import GapCheck, GapWatch
from stream.parse import PartitionBatch
from stream.state import PartitionState

log = structlog.get_logger("candlekeep.stream")

#: Batches handed to a writer and not committed yet, at most: one being written, one parsed and
#: waiting its turn, so that parsing goes on while the writer waits on PostgreSQL. (3 was no
#: faster in the benchmark, and a batch read from a backlog waited twice as long to commit.)
PIPELINE_DEPTH = 2
#: The group's offsets in Kafka (for lag tools only: the worker resumes from PostgreSQL) are
#: committed at most this often, and when the batches in flight are drained (a stop): one
#: commit per batch cost a live stream's small batches a broker round trip each.
KAFKA_COMMIT_INTERVAL_S = 1.0


@dataclass(eq=False)
class Writer:
    """One PostgreSQL connection that writes batches, and its batches in flight, oldest first:
    the first is being written and committed, each of the others waits for the one before it."""

    conn: psycopg.Connection | None = None
    inflight: list[asyncio.Task] = field(default_factory=list)


class Abandoned(Exception):
    """A batch not written because the one before it failed (that failure is the one raised)."""


@dataclass
class BatchResult:
    emission: Emission
    stored: int
    duplicates: int
    conflicting: int = 0  # of the duplicates, those that differ from the stored first copy
    snapshot: dict | None = None  # the window state written with the batch (by record_batch)
    gaps: GapCheck | None = None  # its trade-id continuity step (None: not checked)


def apply_batch(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    batch: PartitionBatch,
    windows: PartitionWindows,
    now_us: int,
    gaps: GapCheck | None = None,
) -> BatchResult:
    """Apply one partition's batch inside the caller's open transaction, first half: the fence,
    the trades, the windows they advance and, with ``gaps``, the trade-id holes now due and
    the open gaps they may fill. What it emits (candles, late trades) is known from here on;
    :func:`record_batch` writes the rest, then the caller commits.

    ``windows`` (and ``gaps``' continuity) are advanced in memory (folding while the server
    inserts the fresh trades' COPY); if the transaction fails the caller restores them from the
    last committed snapshot.
    """
    prepared = batch.prepared
    if prepared is None:
        prepared = batch.prepared = prepare_trades(batch.trades)
    reconciled_until = fence(
        conn,
        group,
        topic,
        batch.partition,
        batch.resumed_from,
        FRESH_SAVEPOINT if prepared.fresh else None,
    )
    before = windows.snapshot() if prepared.fresh else None
    emission: Emission | None = None

    def fold(new: list[Trade]) -> None:
        nonlocal emission
        if emission is not None:  # (the COPY met a stored trade: fold what turned out new)
            windows.reset(before)
        emission = windows.process(new, now_us)

    name = f"kafka:{topic}"
    stored = store_prepared(
        conn,
        prepared,
        lambda trades: Source(name, batch.partition, batch.offsets_of(trades)),
        savepoint_taken=True,
        fold=fold,
        reconciled_until=reconciled_until,
    )
    assert emission is not None
    if gaps is not None:
        gaps.find(conn, group, topic, batch.partition, prepared.unique, windows.watermark_us)
    return BatchResult(emission, stored.stored, stored.duplicates, stored.conflicting, gaps=gaps)


def record_batch(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    batch: PartitionBatch,
    windows: PartitionWindows,
    result: BatchResult,
    merge: Sequence[Candle] = (),
) -> psycopg.Cursor | None:
    """The second half of a batch (after :func:`apply_batch`): the candles' parts, late and
    invalid rows, trade-id gaps, and the progress row with the offsets, window state and
    continuity, sent together (one round trip), with :func:`merge_parts` of ``merge`` last: the
    candles of every batch of the transaction, given with its last batch, after all of their
    parts. Returns its cursor."""
    emission = result.emission
    result.snapshot = windows.snapshot()
    gaps = result.gaps
    with conn.pipeline():
        sent = gaps.send(conn, topic, batch.partition) if gaps is not None else None
        if batch.reset_id is not None and batch.trades:
            mark_resumed(conn, batch.reset_id, batch.trades[0].ts_us)
        write_parts(conn, topic, batch.partition, emission.candles)
        write_late(
            conn, emission.late, batch.partition, batch.offsets_of([x.trade for x in emission.late])
        )
        store_invalid(conn, batch.invalid)
        write_progress(
            conn,
            group,
            topic,
            batch.partition,
            batch.next_offset,
            windows,
            consumed=batch.consumed,
            stored=result.stored,
            duplicates=result.duplicates,
            conflicting=result.conflicting,
            invalid=len(batch.invalid),
            late=len(emission.late),
            snapshot=result.snapshot,
            last_digest=batch.last_digest,
            continuity=gaps.snapshot if gaps is not None else None,
        )
        cur = merge_parts(conn, merge)
    if gaps is not None and sent is not None:
        gaps.receive(sent)
    return cur


def write_tick(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    partition: int,
    resumed_from: int | None,
    emission: Emission,
    windows: PartitionWindows,
    gaps: GapCheck | None = None,
) -> list[Candle]:
    """Persist an idle advance: candles it closed, the trade-id gaps its watermark makes due
    (``gaps``), the new watermark and state (no offsets). Returns the merged candles to
    publish."""
    if resumed_from is None:
        return []  # nothing consumed yet, nothing to advance
    fence(conn, group, topic, partition, resumed_from)
    continuity = None
    if gaps is not None:
        gaps.find(conn, group, topic, partition, (), windows.watermark_us)
        gaps.receive(gaps.send(conn, topic, partition))
        continuity = gaps.snapshot
    merged = write_candles(conn, emission.candles, topic, partition)
    write_progress(conn, group, topic, partition, resumed_from, windows, continuity=continuity)
    return merged


class BatchWriting(GapWatch):
    """The stream worker's batches in flight (part of ``StreamWorker``): handed to the writers,
    written and committed in order, drained on a failure, a rebalance or the stop."""

    async def _hand_out(
        self, parsed: list[tuple[PartitionState, PartitionBatch]], fetched_at: float
    ) -> None:
        """Queue parsed batches on their writers (a partition always on the same one), one
        transaction per writer for its share, behind the writer's batch before it."""
        by_writer: dict[int, list[tuple[PartitionState, PartitionBatch]]] = {}
        for state, batch in parsed:
            state.position = batch.next_offset
            state.inflight += 1
            by_writer.setdefault(batch.partition % len(self._writers), []).append((state, batch))
        for index, part in sorted(by_writer.items()):
            writer = self._writers[index]
            await self._make_room(writer)
            previous = writer.inflight[-1] if writer.inflight else None
            writer.inflight.append(
                asyncio.ensure_future(self._commit(writer, part, fetched_at, previous))
            )

    async def _make_room(self, writer: Writer) -> None:
        """Wait until fewer than ``PIPELINE_DEPTH`` batches are in flight on ``writer`` (a
        failure among the finished ones is raised here, with the batches behind it dropped)."""
        while len(writer.inflight) >= PIPELINE_DEPTH:
            first = writer.inflight[0]
            await asyncio.wait([first])
            if first.cancelled() or first.exception() is not None:
                await self._drain()  # raises
            writer.inflight.pop(0)

    def _inflight(self) -> list[asyncio.Task]:
        return [task for writer in self._writers for task in writer.inflight]

    async def _drain(self) -> None:
        """Wait for every batch in flight to be committed, then send their offsets to Kafka;
        the first failure is raised here (the batches behind a failed one are not written)."""
        tasks = self._inflight()
        for writer in self._writers:
            writer.inflight = []
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if not isinstance(failure, Abandoned):
                raise failure
        if failures:
            raise failures[0]
        await self._commit_kafka_offsets([], force=True)

    async def _commit(
        self,
        writer: Writer,
        parsed: list[tuple[PartitionState, PartitionBatch]],
        fetched_at: float,
        previous: asyncio.Task | None,
    ) -> None:
        """One transaction on ``writer``'s connection for the whole batch, once ``previous`` (the
        writer's batch before it) has committed; outputs produced before the commit.

        ``fetched_at``: when the batch's messages were received (the close-to-commit delay of
        the windows they close counts from there, their parsing included). Runs as a task in
        flight: it never takes the lock (the loop may hold it while it waits for this task).
        """
        try:
            if previous is not None:
                await asyncio.wait([previous])
                if previous.cancelled() or previous.exception() is not None:
                    raise Abandoned("the batch before this one failed")
            # A partition reloaded meanwhile (moved away and back, fenced) resumes from what is
            # stored: what was parsed for it before is not written.
            batches = [b for state, b in parsed if self.partitions.get(b.partition) is state]
            if batches:
                await self._write_batches(writer.conn, batches, fetched_at)
        finally:
            for state, _ in parsed:
                state.inflight -= 1

    async def _write_batches(
        self, conn: psycopg.Connection | None, batches: list[PartitionBatch], fetched_at: float
    ) -> None:
        started = time.perf_counter()
        received_at = self.wall_clock()
        assert conn is not None
        now_us = int(received_at * 1_000_000)
        for batch in batches:
            batch.resumed_from = self.partitions[batch.partition].stored_offset
        windows = [self.partitions[batch.partition].windows for batch in batches]
        checks = [self._gap_check(batch.partition) for batch in batches]
        loop = asyncio.get_running_loop()
        try:
            results = await asyncio.to_thread(
                self._write, conn, batches, list(zip(windows, checks, strict=True)), now_us, loop
            )
        except Fenced as exc:
            await asyncio.to_thread(conn.rollback)
            log.warning("partition moved to another worker: dropping it", reason=str(exc))
            for batch in batches:
                await self._reload(batch.partition, conn)
            return
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(conn.rollback)
            raise
        elapsed = time.perf_counter() - started
        metrics.BATCH_COMMIT.observe(elapsed)
        for batch, result in results:
            state = self.partitions[batch.partition]
            state.stored_offset = batch.next_offset
            state.committed_state = result.snapshot
            state.last_digest = batch.last_digest
            if batch.reset_id is not None and batch.trades:
                state.reset_id = None
            metrics.account(self.summary, batch, result, self.wall_clock() - fetched_at)
            metrics.set_gauges(batch.partition, state, self.wall_clock())
            if result.gaps is not None:
                self._gaps_committed(batch.partition, result.gaps)
        await self._commit_kafka_offsets(batches)

    def _write(
        self,
        conn: psycopg.Connection,
        batches: list[PartitionBatch],
        windows: list[tuple[PartitionWindows, GapCheck]],
        now_us: int,
        loop: asyncio.AbstractEventLoop,
    ) -> list[tuple[PartitionBatch, BatchResult]]:
        """The batch's transaction, in a thread, up to and including the commit.

        Per partition the fence, trades and windows; once every fence has passed, the late and
        invalid outputs are produced (on the event loop) while the candles' parts, late and
        invalid rows and progress are written. Then the merged candles of the keys those parts
        belong to (a symbol may be on several partitions, SPEC §4) are written and produced,
        with their revision; the commit waits for the broker's acknowledgement of everything.

        The outputs are sent on the event loop (the producer's), scheduled from this thread,
        which goes on writing meanwhile: one hop to a thread per transaction. Returning to the
        loop between the steps instead waits each time for the parse stage's next yield (up to
        ``PARSE_CHUNK`` messages), which the writers would spend idle.
        """
        results = [
            (batch, apply_batch(conn, self.group, self.topic, batch, w, now_us, gaps))
            for batch, (w, gaps) in zip(batches, windows, strict=True)
        ]
        outputs = self._outputs
        produced = [asyncio.run_coroutine_threadsafe(outputs.send_late_and_invalid(results), loop)]
        try:
            candles = [c for _, result in results for c in result.emission.candles]
            cur = None
            for n, ((batch, result), (w, _)) in enumerate(zip(results, windows, strict=True)):
                last = n == len(results) - 1
                merge = candles if last else ()
                cur = record_batch(conn, self.group, self.topic, batch, w, result, merge)
            merged = merged_candles(cur)
            if merged:
                produced.append(
                    asyncio.run_coroutine_threadsafe(outputs.send_candles(merged), loop)
                )
            for future in produced:
                future.result()
        except BaseException:
            for future in produced:
                future.cancel()
            raise
        conn.commit()
        return results

    async def _commit_kafka_offsets(
        self, batches: list[PartitionBatch], force: bool = False
    ) -> None:
        """Best effort, for lag monitoring only: the truth is in stream_progress. Committed
        batches' offsets are kept and sent every ``KAFKA_COMMIT_INTERVAL_S`` (``force``: now),
        those of the partitions still assigned."""
        assert self._consumer is not None
        pending = self._kafka_offsets
        pending.update({TopicPartition(self.topic, b.partition): b.next_offset for b in batches})
        now = time.monotonic()
        if not pending or (not force and now - self._kafka_committed_at < KAFKA_COMMIT_INTERVAL_S):
            return
        assigned = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in pending.items() if tp in assigned}
        pending.clear()
        self._kafka_committed_at = now
        if offsets:
            with contextlib.suppress(KafkaError):
                await self._consumer.commit(offsets)
