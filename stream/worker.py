"""The streaming worker: Kafka trades → windowing core → PostgreSQL and Kafka (SPEC §4, §5).

One loop, explicit batches: fetch, parse, then per batch one PostgreSQL transaction with the rows,
offsets and window state (``stream.sink``). Outputs to Kafka are produced and acknowledged before
that commit, so they are at least once. The worker resumes from the offsets and window state in
PostgreSQL, never from Kafka's committed offsets (those are committed afterwards only so that the
usual lag tools work).

The loop is a pipeline: while batches are written and committed (tasks, their database calls
in threads), the next ones are fetched, parsed and queued. The partitions are spread over
``stream_writers`` writers, each with its own PostgreSQL connection, so that one writer's
Python runs while another waits on PostgreSQL. A writer takes its batches one at a time, in
order (``PIPELINE_DEPTH`` in flight at most), each in its own transaction: the write of a batch
starts only once the writer's previous one has committed (or failed, which throws the batches
queued behind it away with the rest). A partition always goes to the same writer, so its
batches, offsets and window state commit in order.

When PostgreSQL or the broker fails mid-batch, the in-memory windows go back to their last
committed snapshot, the consumer seeks back to the committed offsets, and the batch is retried
with backoff: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)

from shared.config import Settings
from shared.core.candles import Candle
from shared.core.trade_messages import check_key, parse_common_trade, parse_trade_message
from shared.core.trades import Rejection, ts_to_datetime
from shared.core.windows import Emission, PartitionWindows, StateMismatch
from shared.errors import CandlekeepError
from shared.store import db
from shared.store.trade_store import InvalidMessage
from stream import messages, metrics
from stream.sink import (
    BatchResult,
    Fenced,
    OffsetReset,
    PartitionBatch,
    apply_batch,
    load_progress,
    merged_candles,
    prepare_trades,
    record_batch,
    record_digest,
    record_reset,
    write_tick,
)

log = structlog.get_logger("candlekeep.stream")

MAX_BACKOFF_S = 30.0
#: How long starting the Kafka clients may take: a broker that accepts connections but never
#: answers (stopped, wrong service on the port) would otherwise hold the start for minutes.
KAFKA_START_TIMEOUT_S = 10.0
#: Failures that a retry with backoff can outlive: PostgreSQL or the broker away for a while.
RETRYABLE = (
    psycopg.OperationalError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    db.DatabaseError,
    KafkaError,
    OSError,
)
TICK_EVERY_S = 1.0
#: How the consumer fetches (the benchmark's bare consumer uses the same). aiokafka keeps one
#: fetch in flight per broker and sends it only for partitions whose fetched messages are all
#: consumed; a fetch for partitions at the end of their log waits up to ``fetch_max_wait_ms`` on
#: the broker for new data. At Kafka's default of 500 ms the busy partitions on that broker
#: wait as long behind it: with a quiet partition next to busy ones, reading a backlog stalled
#: half of the time. 50 ms costs an idle worker 20 small requests a second.
CONSUMER_FETCH = {"max_partition_fetch_bytes": 4 * 1024 * 1024, "fetch_max_wait_ms": 50}
KEY_CACHE_MAX = 10_000
GC_THRESHOLD = 50_000
SWITCH_INTERVAL_S = 0.0005
#: Parse this many messages, then let the batch being written go on (its next step may wait on
#: the event loop).
PARSE_CHUNK = 1000
#: Batches handed to a writer and not committed yet, at most: one being written, one parsed and
#: waiting its turn, so that parsing goes on while the writer waits on PostgreSQL. (3 was no
#: faster in the benchmark, and a batch read from a backlog waited twice as long to commit.)
PIPELINE_DEPTH = 2
#: A log end below the stored position is believed only after this long and this many fetch
#: answers in a row that say so. Measured on the embedded Tansu broker: the high watermark of
#: its fetch answers never fell below what a consumer had read (0 of 1,644 checks under a live
#: producer), while its ListOffsets end lags by the last producer batch (up to 149 messages)
#: for as long as the partition stays quiet, so ListOffsets alone never decides a reset. Kafka's
#: high watermark can lag briefly after a leader change. A few seconds cover both, and a lost
#: log is still noticed within seconds instead of waited on forever.
RESET_GRACE_S = 3.0
RESET_GRACE_CHECKS = 3


class BrokerUnavailable(CandlekeepError):
    pass


class OffsetResetStop(CandlekeepError):
    """An offset reset under ``CANDLEKEEP_OFFSET_RESET=fail``: recorded, then the worker stops."""


@dataclass(eq=False)
class PartitionState:
    """What the worker holds for one assigned partition (replaced whole when it is reloaded,
    so a batch parsed for the old one is recognised and dropped)."""

    windows: PartitionWindows
    committed_state: dict | None
    stored_offset: int | None  # next offset in stream_progress (None: no row yet)
    last_tick: float = 0.0
    #: Next offset after the last batch handed to the writer (committed or in flight).
    position: int | None = None
    #: Batches of this partition handed to a writer and not finished yet.
    inflight: int = 0
    #: record_digest of the message before stored_offset, as committed.
    last_digest: int | None = None
    #: (offset, digest) of the stored message the first fetch must show again: the log is the
    #: one the worker read (None: nothing to check).
    verify: tuple[int, int] | None = None
    #: An offset_resets row waiting for the first trade read after it.
    reset_id: int | None = None
    #: Since when (monotonic) fetches say the log ends below the position, and how many did.
    short_since: float | None = None
    short_checks: int = 0
    last_poll: int | None = None

    def __post_init__(self) -> None:
        if self.position is None:
            self.position = self.stored_offset


@dataclass(eq=False)
class _Writer:
    """One PostgreSQL connection that writes batches, and its batches in flight, oldest first:
    the first is being written and committed, each of the others waits for the one before it."""

    conn: psycopg.Connection | None = None
    inflight: list[asyncio.Task] = field(default_factory=list)


@dataclass
class RunSummary:
    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    conflicting: int = 0  # of the duplicates, those that differ from the stored first copy
    invalid: int = 0
    late: int = 0
    candles: int = 0
    retries: int = 0
    resets: int = 0
    skipped: int = 0  # messages passed over by offset resets (consumed + skipped = read range)
    partitions: set[int] = field(default_factory=set)


class StreamWorker:
    """Consumes ``trades`` in a consumer group until stopped, or until idle long enough."""

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        bootstrap_servers: str,
        *,
        exit_when_idle_s: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.window_settings = settings.window_settings()
        self.database_url = database_url
        self.bootstrap_servers = bootstrap_servers
        self.exit_when_idle_s = exit_when_idle_s
        self.wall_clock = wall_clock
        self.max_records = settings.batch_size
        self.topic = settings.topic_trades
        self.group = settings.consumer_group
        self.partitions: dict[int, PartitionState] = {}
        #: Assigned, progress not loaded from PostgreSQL yet (done by the loop, with retries).
        self._pending: set[int] = set()
        self.summary = RunSummary()
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        #: For what the loop writes between batches (idle advances) and reads (progress).
        self._conn: psycopg.Connection | None = None
        self._writers = [_Writer() for _ in range(settings.stream_writers)]
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._last_message_at = wall_clock()
        self._joined = False  # set by the first assignment, even an empty one
        self._max_future_us = int(settings.max_future_skew.total_seconds() * 1_000_000)
        #: Message keys already seen to be a valid symbol, with the symbol they name.
        self._key_symbols: dict[bytes, str] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> RunSummary:
        """Run until SIGTERM/SIGINT (drain and commit) or ``exit_when_idle_s`` of quiet."""
        await self._reconnect()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, acks="all", linger_ms=5
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group,
            enable_auto_commit=False,
            # Never let the client jump on its own: positions come from PostgreSQL, and an
            # out-of-range fetch is handled in _out_of_range.
            auto_offset_reset="none",
            **CONSUMER_FETCH,
            session_timeout_ms=int(self.settings.session_timeout.total_seconds() * 1000),
            heartbeat_interval_ms=int(self.settings.heartbeat_interval.total_seconds() * 1000),
        )
        thresholds = gc.get_threshold()
        switch_interval = sys.getswitchinterval()
        # One message makes a few dozen objects: collect the young generation every 50,000
        # allocations rather than every 700, and leave what start-up made out of the scans.
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
        # The writer thread waits on PostgreSQL a dozen times a batch; each time it wants the
        # GIL back, the parsing thread holds it for up to the switch interval (5 ms by default).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            await self._start_kafka()
            self._consumer.subscribe([self.topic], listener=_Rebalance(self))
            log.info(
                "worker started",
                topic=self.topic,
                group=self.group,
                brokers=self.bootstrap_servers,
                database=db.redact(self.database_url),
            )
            backoff = 0.5
            while not self.stopping.is_set():
                try:
                    await self._step()
                    backoff = 0.5
                except RETRYABLE as exc:
                    cause = "kafka" if isinstance(exc, KafkaError) else "database"
                    metrics.RETRIES.labels(cause).inc()
                    self.summary.retries += 1
                    log.warning(
                        "batch failed, retrying", cause=cause, error=str(exc), backoff_s=backoff
                    )
                    await self._rewind()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    # Failing is not idle: messages may be waiting behind the outage.
                    self._last_message_at = self.wall_clock()
                if self._idle_long_enough():
                    log.info("idle: exiting", idle_s=self.exit_when_idle_s)
                    break
            try:
                await self._drain()  # the last batch commits before the worker leaves
            except RETRYABLE as exc:
                log.warning("last batch failed: not committed", error=str(exc))
        finally:
            with contextlib.suppress(Exception):  # (already failed and said so: rolled back)
                await self._drain()
            await self._shutdown()
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            sys.setswitchinterval(switch_interval)
        return self.summary

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and exit."""
        log.info("stop requested: draining")
        self.stopping.set()

    def _connect(self) -> psycopg.Connection:
        conn = db.connect(self.database_url)
        db.require_schema(conn, self.database_url)
        return conn

    async def _start_kafka(self) -> None:
        assert self._producer is not None and self._consumer is not None
        try:
            async with asyncio.timeout(KAFKA_START_TIMEOUT_S):
                await self._producer.start()
                await self._consumer.start()
        except (KafkaConnectionError, TimeoutError) as exc:
            await self._shutdown()
            reason = (
                f"no answer within {KAFKA_START_TIMEOUT_S:g} s"
                if isinstance(exc, TimeoutError)
                else "connection failed"
            )
            raise BrokerUnavailable(
                f"cannot reach Kafka at {self.bootstrap_servers} ({reason}). Check that the "
                "broker is running and KAFKA_BOOTSTRAP_SERVERS is right, or unset it to use the "
                "embedded broker"
            ) from None

    async def _shutdown(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        self._conn = _closed(self._conn)
        for writer in self._writers:
            writer.conn = _closed(writer.conn)

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

    # -- one step ---------------------------------------------------------------------------

    async def _step(self) -> None:
        assert self._consumer is not None
        if not all(map(_usable, (self._conn, *(w.conn for w in self._writers)))):
            await self._drain()
            await self._reconnect()
        if self._pending:
            await self._drain()
            async with self._lock:
                for partition in sorted(self._pending):
                    await self._reload(partition)
                    self._pending.discard(partition)
                log.info("partitions loaded", partitions=sorted(self.partitions))
        try:
            fetched = await self._consumer.getmany(timeout_ms=200, max_records=self.max_records)
        except OffsetOutOfRangeError as exc:
            await self._out_of_range(exc.args[0] if exc.args else {})
            return
        except NoOffsetForPartitionError:
            await asyncio.sleep(0.05)  # assigned, not yet positioned by on_assigned
            return
        fetched_at = self.wall_clock()
        async with self._lock:
            replaced: list[int] = []
            parsed = await self._parse(fetched, replaced)
            for partition in replaced:
                await self._reset(partition, "replaced")
            await self._check_log_ends({b.partition for _, b in parsed})
            await self._tick(busy={b.partition for _, b in parsed})
            if parsed:
                self._last_message_at = self.wall_clock()
            by_writer: dict[int, list[tuple[PartitionState, PartitionBatch]]] = {}
            for state, batch in parsed:
                state.position = batch.next_offset
                state.inflight += 1
                by_writer.setdefault(batch.partition % len(self._writers), []).append(
                    (state, batch)
                )
            for index, part in sorted(by_writer.items()):
                writer = self._writers[index]
                await self._make_room(writer)
                previous = writer.inflight[-1] if writer.inflight else None
                writer.inflight.append(
                    asyncio.ensure_future(self._commit(writer, part, fetched_at, previous))
                )

    async def _make_room(self, writer: _Writer) -> None:
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
        """Wait for every batch in flight to be committed; the first failure is raised here
        (the batches behind a failed one are not written)."""
        tasks = self._inflight()
        for writer in self._writers:
            writer.inflight = []
        if not tasks:
            return
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if not isinstance(failure, _Abandoned):
                raise failure
        if failures:
            raise failures[0]

    async def _parse(
        self, fetched, replaced: list[int]
    ) -> list[tuple[PartitionState, PartitionBatch]]:
        """Parse fetched records into batches; partitions whose log turned out to be another
        one than the worker read (see ``PartitionState.verify``) go to ``replaced``."""
        now_us = int(self.wall_clock() * 1_000_000)
        max_ts_us = now_us + self._max_future_us
        key_symbols = self._key_symbols
        fast = parse_common_trade
        source = f"kafka:{self.topic}"
        batches = []
        for tp, records in fetched.items():
            state = self.partitions.get(tp.partition)
            if state is None or not records or tp.topic != self.topic:
                continue  # revoked meanwhile
            if state.verify is not None:
                offset, digest = state.verify
                if records[0].offset == offset:
                    if record_digest(records[0].key, records[0].value) != digest:
                        replaced.append(tp.partition)
                        continue
                    records = records[1:]  # the same message: the same log
                state.verify = None
                if not records:
                    continue
            if state.position is not None and records[0].offset < state.position:
                # Fetched before the seek to the stored offset took effect (e.g. from the offset
                # committed to Kafka, which lags PostgreSQL): already in the store.
                records = [r for r in records if r.offset >= state.position]
                if not records:
                    continue
            # resumed_from is set when the batch is written: after the one before it commits.
            batch = PartitionBatch(tp.partition, None, records[-1].offset + 1)
            batch.last_digest = record_digest(records[-1].key, records[-1].value)
            batch.reset_id = state.reset_id
            trades = batch.trades
            offsets = batch.offsets
            for start in range(0, len(records), PARSE_CHUNK):
                if start:
                    await asyncio.sleep(0)  # let the batch in flight take its next step
                for record in records[start : start + PARSE_CHUNK]:
                    key = record.key
                    value = record.value
                    parsed = fast(value, max_ts_us) if value.__class__ is bytes else None
                    if parsed is None:
                        parsed = parse_trade_message(value, max_ts_us=max_ts_us)
                    if parsed.__class__ is not Rejection:
                        if key_symbols.get(key) == parsed.symbol:  # type: ignore[union-attr]
                            trades.append(parsed)  # type: ignore[arg-type]
                            offsets.append(record.offset)
                            continue
                        bad_key = check_key(key, parsed)  # type: ignore[arg-type]
                        if bad_key is None:
                            if len(key_symbols) < KEY_CACHE_MAX:
                                key_symbols[key] = parsed.symbol  # type: ignore[index,union-attr]
                            trades.append(parsed)  # type: ignore[arg-type]
                            offsets.append(record.offset)
                            continue
                        parsed = bad_key
                    batch.invalid.append(
                        InvalidMessage(
                            source,
                            tp.partition,
                            record.offset,
                            key,
                            record.value,
                            parsed.code,  # type: ignore[union-attr]
                            parsed.reason,  # type: ignore[union-attr]
                        )
                    )
            batch.consumed = len(records)
            batch.prepared = prepare_trades(trades)  # (the COPY rows too, off the writer's path)
            batches.append((state, batch))
        return batches

    async def _commit(
        self,
        writer: _Writer,
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
                    raise _Abandoned("the batch before this one failed")
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
        loop = asyncio.get_running_loop()
        try:
            results = await asyncio.to_thread(self._write, conn, batches, windows, now_us, loop)
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
            self._account(
                batch,
                result.emission,
                result.stored,
                result.duplicates,
                result.conflicting,
                self.wall_clock() - fetched_at,
            )
        await self._commit_kafka_offsets(batches)

    def _write(
        self,
        conn: psycopg.Connection,
        batches: list[PartitionBatch],
        windows: list[PartitionWindows],
        now_us: int,
        loop: asyncio.AbstractEventLoop,
    ) -> list[tuple[PartitionBatch, BatchResult]]:
        """The batch's transaction, in a thread, up to and including the commit.

        Per partition the fence, trades
        and windows; once every fence has passed, the late and invalid outputs are produced (on
        the event loop) while the candles' parts, late and invalid rows and progress are
        written. Then the merged candles of the keys those parts belong to (a symbol may be on
        several partitions, SPEC §4) are written and produced, with their revision; the commit
        waits for the broker's acknowledgement of everything.
        """
        results = [
            (batch, apply_batch(conn, self.group, self.topic, batch, w, now_us))
            for batch, w in zip(batches, windows, strict=True)
        ]
        produced = [asyncio.run_coroutine_threadsafe(self._produce(results), loop)]
        try:
            candles = [c for _, result in results for c in result.emission.candles]
            cur = None
            for n, ((batch, result), w) in enumerate(zip(results, windows, strict=True)):
                last = n == len(results) - 1
                merge = candles if last else ()
                cur = record_batch(conn, self.group, self.topic, batch, w, result, merge)
            merged = merged_candles(cur)
            if merged:
                produced.append(
                    asyncio.run_coroutine_threadsafe(self._produce_candles(merged), loop)
                )
            for future in produced:
                future.result()
        except BaseException:
            for future in produced:
                future.cancel()
            raise
        conn.commit()
        return results

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
            self._set_gauges(partition, state, now)
            if not emission.candles and state.windows.watermark_us == before:
                continue
            conn = self._conn
            try:
                merged = await asyncio.to_thread(
                    write_tick,
                    conn,
                    self.group,
                    self.topic,
                    partition,
                    state.stored_offset,
                    emission,
                    state.windows,
                )
                await self._produce_candles(merged)
                await asyncio.to_thread(conn.commit)
            except Fenced:
                await asyncio.to_thread(conn.rollback)
                await self._reload(partition)
                continue
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(conn.rollback)
                raise
            state.committed_state = state.windows.snapshot()
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

    async def _produce(self, results) -> None:
        """Send the batch's late and invalid outputs and wait for the broker's acknowledgement
        (its candles are the merged ones: :meth:`_produce_candles`)."""
        assert self._producer is not None
        futures = []
        send = self._producer.send
        for batch, result in results:
            emission: Emission = result.emission
            for late in emission.late:
                offset = batch.offset_of(late.trade)
                offset = -1 if offset is None else offset
                key, value = messages.late_message(late, batch.partition, offset)
                futures.append(await send(self.settings.topic_late, value, key=key))
            for invalid in batch.invalid:
                key, value = messages.invalid_message(invalid)
                futures.append(await send(self.settings.topic_invalid, value, key=key))
        if futures:
            await asyncio.gather(*futures)

    async def _produce_candles(self, candles: list[Candle]) -> None:
        """Send merged candles (``stream_candles`` rows, with their revision) and wait for the
        broker's acknowledgement."""
        assert self._producer is not None
        send = self._producer.send
        futures = []
        for candle in candles:
            key, value = messages.candle_message(candle)
            futures.append(await send(self.settings.topic_candles, value, key=key))
        if futures:
            await asyncio.gather(*futures)

    async def _commit_kafka_offsets(self, batches: list[PartitionBatch]) -> None:
        """Best effort, for lag monitoring only: the truth is in stream_progress."""
        assert self._consumer is not None
        offsets = {TopicPartition(self.topic, b.partition): b.next_offset for b in batches}
        with contextlib.suppress(KafkaError):
            await self._consumer.commit(offsets)

    def _account(
        self,
        batch: PartitionBatch,
        emission: Emission,
        stored: int,
        duplicates: int,
        conflicting: int,
        close_delay_s: float,
    ) -> None:
        s = self.summary
        s.consumed += batch.consumed
        s.stored += stored
        s.duplicates += duplicates
        s.conflicting += conflicting
        s.invalid += len(batch.invalid)
        s.late += len(emission.late)
        s.candles += len(emission.candles)
        s.partitions.add(batch.partition)
        metrics.MESSAGES_CONSUMED.labels(str(batch.partition)).inc(batch.consumed)
        metrics.TRADES_STORED.inc(stored)
        metrics.DUPLICATES.inc(duplicates)
        metrics.CONFLICTING.inc(conflicting)
        metrics.LATE.inc(len(emission.late))
        for invalid in batch.invalid:
            metrics.INVALID.labels(invalid.code).inc()
        for candle in emission.candles:
            metrics.CANDLES.labels(candle.interval).inc()
            metrics.CLOSE_TO_COMMIT.observe(close_delay_s)
        self._set_gauges(batch.partition, self.partitions[batch.partition], self.wall_clock())

    def _set_gauges(self, partition: int, state: PartitionState, now: float) -> None:
        label = str(partition)
        wm = state.windows.watermark_us
        if wm is not None:
            metrics.WATERMARK_LAG.labels(label).set(now - wm / 1_000_000)
        metrics.OPEN_WINDOWS.labels(label).set(state.windows.open_window_count)

    # -- recovery -----------------------------------------------------------------------------

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
        conn = self._conn
        try:
            reset_id = await asyncio.to_thread(record_reset, conn, self.group, self.topic, reset)
            await asyncio.to_thread(conn.commit)
        except Fenced:
            await asyncio.to_thread(conn.rollback)
            await self._reload(partition)
            return
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(conn.rollback)
            raise
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

    async def _reconnect(self) -> None:
        """(Re)open every connection that is not open and well (nothing may be in flight)."""
        restored = self._conn is not None
        if not _usable(self._conn):
            self._conn = _closed(self._conn)  # (None until the new one is up)
            self._conn = await asyncio.to_thread(self._connect)
        for writer in self._writers:
            if not _usable(writer.conn):
                writer.conn = _closed(writer.conn)
                writer.conn = await asyncio.to_thread(db.connect, self.database_url)
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
        except StateMismatch as exc:
            raise CandlekeepError(f"partition {partition}: {exc}") from None
        state = PartitionState(
            windows,
            progress.window_state,
            progress.next_offset,
            last_digest=progress.last_digest,
            reset_id=progress.pending_reset,
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

    async def on_assigned(self, assigned) -> None:
        """Only note the partitions: the loop loads their progress before its next fetch.

        (Not here: aiokafka logs and swallows an exception raised by this callback, so a
        PostgreSQL outage during a rebalance would leave the partition silently unconsumed.)
        """
        async with self._lock:
            self._joined = True
            self._last_message_at = self.wall_clock()  # idle time counts from the assignment
            self._pending |= {tp.partition for tp in assigned if tp.topic == self.topic}
            log.info("partitions assigned", partitions=sorted(self._pending | set(self.partitions)))

    async def on_revoked(self, revoked) -> None:
        async with self._lock:  # waits for the loop's step, then for the batch in flight
            inflight = self._inflight()
            if inflight:
                # Only wait: if a batch failed, the loop's next step raises it and rewinds.
                await asyncio.wait(inflight)
            for tp in revoked:
                self.partitions.pop(tp.partition, None)
                self._pending.discard(tp.partition)
            if revoked:  # (the first join revokes nothing)
                log.info("partitions revoked", partitions=sorted(tp.partition for tp in revoked))


def _usable(conn: psycopg.Connection | None) -> bool:
    return conn is not None and not conn.closed and not conn.broken


def _closed(conn: psycopg.Connection | None) -> None:
    """Close ``conn`` if there is one, whatever state it is in."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


class _Abandoned(Exception):
    """A batch not written because the one before it failed (that failure is the one raised)."""


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: StreamWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        await self.worker.on_assigned(assigned)
