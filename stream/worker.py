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

from shared import db
from shared.config import Settings
from shared.errors import CandlekeepError
from shared.trade_store import InvalidMessage
from shared.trades import Rejection, check_key, parse_common_trade, parse_trade_message
from shared.windows import Emission, PartitionWindows, StateMismatch
from stream import messages, metrics
from stream.sink import (
    BatchResult,
    Fenced,
    PartitionBatch,
    apply_batch,
    load_progress,
    prepare_trades,
    record_batch,
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


class BrokerUnavailable(CandlekeepError):
    pass


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
            parsed = await self._parse(fetched)
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

    async def _parse(self, fetched) -> list[tuple[PartitionState, PartitionBatch]]:
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
            if state.position is not None and records[0].offset < state.position:
                # Fetched before the seek to the stored offset took effect (e.g. from the offset
                # committed to Kafka, which lags PostgreSQL): already in the store.
                records = [r for r in records if r.offset >= state.position]
                if not records:
                    continue
            # resumed_from is set when the batch is written: after the one before it commits.
            batch = PartitionBatch(tp.partition, None, records[-1].offset + 1)
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

        Per partition the fence, trades and windows; once every fence has passed, the outputs
        are produced (on the event loop) while the candles, late and invalid rows and progress
        are written; the commit waits for the broker's acknowledgement.
        """
        results = [
            (batch, apply_batch(conn, self.group, self.topic, batch, w, now_us))
            for batch, w in zip(batches, windows, strict=True)
        ]
        produced = asyncio.run_coroutine_threadsafe(self._produce(results), loop)
        try:
            for (batch, result), w in zip(results, windows, strict=True):
                record_batch(conn, self.group, self.topic, batch, w, result)
            produced.result()
        except BaseException:
            produced.cancel()
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
                await asyncio.to_thread(
                    write_tick,
                    conn,
                    self.group,
                    self.topic,
                    partition,
                    state.stored_offset,
                    emission,
                    state.windows,
                )
                await self._produce([(None, _Only(emission))])
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
        highwater = self._consumer.highwater(tp)
        if highwater is None:
            return False
        return (state.stored_offset or 0) >= highwater

    async def _produce(self, results) -> None:
        """Send the batch's outputs and wait for the broker's acknowledgement."""
        assert self._producer is not None
        futures = []
        send = self._producer.send
        for batch, result in results:
            emission: Emission = result.emission
            for candle in emission.candles:
                key, value = messages.candle_message(candle)
                futures.append(await send(self.settings.topic_candles, value, key=key))
            for late in emission.late:
                offset = batch.offset_of(late.trade) if batch else None
                offset = -1 if offset is None else offset
                key, value = messages.late_message(late, batch.partition if batch else -1, offset)
                futures.append(await send(self.settings.topic_late, value, key=key))
            for invalid in batch.invalid if batch else ():
                key, value = messages.invalid_message(invalid)
                futures.append(await send(self.settings.topic_invalid, value, key=key))
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
        """A fetch position the broker does not have. Below the log start, retention deleted
        messages before they were consumed: say so loudly and go on from the log start. Above
        the end, the broker's high watermark lags what it acknowledged: wait and retry."""
        assert self._consumer is not None
        for tp, offset in positions.items():
            first = (await self._consumer.beginning_offsets([tp]))[tp]
            if offset < first:
                log.error(
                    "messages deleted by retention before they were consumed",
                    partition=tp.partition,
                    lost_from=offset,
                    lost_to=first - 1,
                )
                self._consumer.seek(tp, first)
            else:
                await asyncio.sleep(0.1)
                self._consumer.seek(tp, offset)

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
                await self._seek(partition, state.stored_offset)

    async def _reload(self, partition: int, conn: psycopg.Connection | None = None) -> None:
        """(Re)load a partition's committed progress from PostgreSQL and seek to it (``conn``:
        a writer's, between its transactions; by default the loop's)."""
        conn = conn or self._conn
        assert conn is not None
        progress = await asyncio.to_thread(load_progress, conn, self.group, self.topic, partition)
        try:
            windows = PartitionWindows.restore(self.window_settings, progress.window_state)
        except StateMismatch as exc:
            raise CandlekeepError(f"partition {partition}: {exc}") from None
        self.partitions[partition] = PartitionState(
            windows, progress.window_state, progress.next_offset
        )
        await self._seek(partition, progress.next_offset)

    async def _seek(self, partition: int, offset: int | None) -> None:
        assert self._consumer is not None
        tp = TopicPartition(self.topic, partition)
        if tp not in self._consumer.assignment():
            return
        if offset is None:
            await self._consumer.seek_to_beginning(tp)
        else:
            self._consumer.seek(tp, offset)

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


@dataclass
class _Only:
    emission: Emission


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: StreamWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        await self.worker.on_assigned(assigned)
