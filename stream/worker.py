"""The streaming worker: Kafka trades → windowing core → PostgreSQL and Kafka (SPEC §4, §5).

One loop, read top to bottom in :meth:`StreamWorker._step`: consume (``getmany``) → parse
(``stream.parse``) → write (``stream.writers``: per batch one PostgreSQL transaction with the
rows, offsets and window state, written through ``shared.store``) → commit. Outputs to Kafka
(``stream.outputs``) are produced and acknowledged before that commit, so they are at least
once. The worker resumes from the offsets and window state in PostgreSQL, never from Kafka's
committed offsets (those are committed afterwards only so that the usual lag tools work).

The loop is a pipeline: while batches are written and committed (tasks, their database calls
in threads), the next ones are fetched, parsed and queued. Between batches, quiet partitions
advance with the wall clock (``stream.idle``). When PostgreSQL or the broker fails mid-batch,
the in-memory windows go back to their last committed snapshot, the consumer seeks back to the
committed offsets, and the batch is retried with backoff (``stream.recovery``): nothing lost,
nothing counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import time
from collections.abc import Callable

import psycopg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)

from shared.config import Settings
from shared.errors import CandlekeepError
from shared.store import db
from stream import metrics
from stream.gaps import OpenGapIds
from stream.idle import IdleTick
from stream.outputs import Outputs
from stream.parse import Parser
from stream.recovery import RETRYABLE, OffsetResetStop, Recovery, closed, usable
from stream.state import PartitionState, RunSummary
from stream.writers import BatchWriting, Writer

__all__ = ["BrokerUnavailable", "OffsetResetStop", "RunSummary", "StreamWorker"]

log = structlog.get_logger("candlekeep.stream")

MAX_BACKOFF_S = 30.0
#: How long starting the Kafka clients may take: a broker that accepts connections but never
#: answers (stopped, wrong service on the port) would otherwise hold the start for minutes.
KAFKA_START_TIMEOUT_S = 10.0
#: How the consumer fetches (the benchmark's bare consumer uses the same). aiokafka keeps one
#: fetch in flight per broker and sends it only for partitions whose fetched messages are all
#: consumed; a fetch for partitions at the end of their log waits up to ``fetch_max_wait_ms`` on
#: the broker for new data. At Kafka's default of 500 ms the busy partitions on that broker
#: wait as long behind it: with a quiet partition next to busy ones, reading a backlog stalled
#: half of the time. 50 ms costs an idle worker 20 small requests a second.
CONSUMER_FETCH = {"max_partition_fetch_bytes": 4 * 1024 * 1024, "fetch_max_wait_ms": 50}
GC_THRESHOLD = 50_000
SWITCH_INTERVAL_S = 0.0005


class BrokerUnavailable(CandlekeepError):
    pass


class StreamWorker(BatchWriting, IdleTick, Recovery):
    """Consumes ``trades`` in a consumer group until stopped, or until idle long enough.

    Its parts live beside it: the batches in flight (``stream.writers.BatchWriting``), the idle
    tick (``stream.idle``) and recovery (``stream.recovery``); the state they share is this
    object's.
    """

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
        self.linger_s = settings.stream_linger.total_seconds()
        #: A fetch error met while gathering (``_gather``), raised by the next fetch instead.
        self._fetch_error: Exception | None = None
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
        self._writers = [Writer() for _ in range(settings.stream_writers)]
        #: Committed batches' offsets not yet committed to Kafka (``stream.writers``), and when.
        self._kafka_offsets: dict = {}
        self._kafka_committed_at = float("-inf")
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._last_message_at = wall_clock()
        self._joined = False  # set by the first assignment, even an empty one
        max_future_us = int(settings.max_future_skew.total_seconds() * 1_000_000)
        self._parser = Parser(self.topic, max_future_us)
        self._outputs: Outputs | None = None
        #: The open trade-id gaps as last read (``stream.gaps``), and when (monotonic).
        self.open_ids = OpenGapIds()
        self._gaps_refreshed = float("-inf")
        #: The topic's partitions' log bounds (``stream.gaps``), and when they were read.
        self._topic_bounds: dict[int, tuple[int, int]] | None = None
        self._bounds_read = float("-inf")

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
        self._outputs = Outputs(self._producer, self.settings)
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
                await self._refresh_gaps(force=True)  # gaps the last batches filled
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
        self._conn = closed(self._conn)
        for writer in self._writers:
            writer.conn = closed(writer.conn)

    # -- one step ---------------------------------------------------------------------------

    async def _step(self) -> None:
        """One turn of the loop: (re)connect and load newly assigned partitions if need be,
        consume (``getmany``), parse, and hand the batches to the writers, which write and
        commit them behind the batches before them while the loop goes on."""
        assert self._consumer is not None
        if not all(map(usable, (self._conn, *(w.conn for w in self._writers)))):
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
            if self._fetch_error is not None:
                error, self._fetch_error = self._fetch_error, None
                raise error
            fetched = await self._consumer.getmany(timeout_ms=200, max_records=self.max_records)
            fetched_at = self.wall_clock()
            await self._gather(fetched)
        except OffsetOutOfRangeError as exc:
            await self._out_of_range(exc.args[0] if exc.args else {})
            return
        except NoOffsetForPartitionError:
            await asyncio.sleep(0.05)  # assigned, not yet positioned by on_assigned
            return
        async with self._lock:  # parse, check the logs, tick the quiet ones, hand out to write
            replaced: list[int] = []
            parsed = await self._parser.parse(fetched, self.partitions, self.wall_clock(), replaced)
            for partition in replaced:
                await self._reset(partition, "replaced")
            await self._check_log_ends({b.partition for _, b in parsed})
            await self._tick(busy={b.partition for _, b in parsed})
            await self._read_log_bounds()
            await self._refresh_gaps()
            if parsed:
                self._last_message_at = self.wall_clock()
            await self._hand_out(parsed, fetched_at)  # written and committed in order
        await self._commit_kafka_offsets([])  # a quiet stream's last ones, after the interval

    async def _gather(self, fetched: dict) -> None:
        """Add to a batch that is not full what arrives within ``linger_s`` of its first
        message (a live stream; a backlog fills its batches at once).

        An error met meanwhile is raised by the next fetch: what was fetched before it is
        written first (the consumer's position is past it already).
        """
        count = sum(map(len, fetched.values()))
        deadline = time.monotonic() + self.linger_s
        while count and count < self.max_records and not self.stopping.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return
            try:
                more = await self._consumer.getmany(  # type: ignore[union-attr]
                    timeout_ms=left_ms, max_records=self.max_records - count
                )
            except (OffsetOutOfRangeError, NoOffsetForPartitionError) as exc:
                self._fetch_error = exc
                return
            for tp, records in more.items():
                fetched[tp] = fetched[tp] + records if tp in fetched else records
                count += len(records)

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


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: StreamWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        await self.worker.on_assigned(assigned)
