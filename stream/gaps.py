"""Trade-id gaps in the stream worker (SPEC §4 "Trade-id continuity"): each partition's
continuity (``shared.core.continuity``) is fed the trades of each batch; the holes it gives up
on are recorded in ``trade_gaps`` and the trades that fill an open gap mark it filled, in the
batch's own transaction, with the continuity state committed beside the offsets and window
state: effectively once, across restarts and rebalances.

A hole is a candidate once its upper neighbour is past the partition's watermark *and* past the
committed watermark of each of the topic's other partitions that has not committed its whole
log (``others_watermark_us``, with the logs' bounds read every ``LOG_BOUNDS_EVERY_S``): a
symbol's trades may arrive on several partitions (SPEC §4), and one that has not got that far
yet may still hold the missing trades. A hole held back so is looked at again by the batches
after, or by an idle tick when there is none. The candidates' ids are then checked against the
stored trades (``record_gaps``), so what was stored another way (another partition, ``load``)
is never a gap.

Nothing of this costs a statement when there is nothing to check: a batch reads the other
partitions' watermarks only when one of its holes is due, records only candidates, and marks
fills only when one of its trades falls in an open gap as this worker knows them
(:class:`OpenGapIds`, a hint refreshed every ``OPEN_GAPS_REFRESH_S``; the refresh also marks the
gaps recorded lately that a trade stored meanwhile filled, so a stale hint loses nothing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import psycopg
import structlog
from aiokafka import TopicPartition

from shared.core.continuity import Gap, IdContinuity
from shared.core.trades import Trade, ts_to_datetime
from shared.store.progress import others_watermark_us
from shared.store.trade_gaps import gaps_of, mark_filled, open_gap_ids, record_gaps
from stream import metrics
from stream.state import PartitionState, RunSummary

log = structlog.get_logger("candlekeep.stream")

#: How often the worker re-reads the open gaps (its hint) and marks those recorded in the last
#: ``RECENT_GAPS`` that trades stored meanwhile filled (a gap recorded by another worker just as
#: this one stored the trade that fills it).
OPEN_GAPS_REFRESH_S = 10.0
RECENT_GAPS = timedelta(minutes=2)
#: How often the worker reads the logs' bounds of the topic's partitions (two small requests):
#: a partition that has committed its whole log holds back no gap.
LOG_BOUNDS_EVERY_S = 1.0

Key = tuple[str, str]


class OpenGapIds:
    """The id ranges of the open gaps, per (exchange, symbol), as this worker last knew them: a
    hint that tells a batch whether it may fill one. Replaced whole, never changed in place
    (writers read it from their threads)."""

    __slots__ = ("_ranges", "_top")

    def __init__(self, ranges: dict[Key, list[tuple[int, int]]] | None = None):
        self._ranges = ranges or {}
        self._top = {key: max(last for _, last in spans) for key, spans in self._ranges.items()}

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def filling(self, trades: Iterable[Trade]) -> set[Key]:
        """The symbols of which some of ``trades`` fall in an open gap."""
        if not self._ranges:
            return set()
        ranges, top = self._ranges, self._top
        out: set[Key] = set()
        for trade in trades:
            key = (trade.exchange, trade.symbol)
            spans = ranges.get(key)
            if spans and trade.trade_id <= top[key] and key not in out:
                trade_id = trade.trade_id
                if any(first <= trade_id <= last for first, last in spans):
                    out.add(key)
        return out

    def changed(self, recorded: Sequence[Gap], filled: Sequence[Gap]) -> OpenGapIds:
        """This hint with ``recorded`` gaps added and ``filled`` ones taken out."""
        if not recorded and not filled:
            return self
        ranges = {key: list(spans) for key, spans in self._ranges.items()}
        for gap in recorded:
            ranges.setdefault((gap.exchange, gap.symbol), []).append(_span(gap))
        for gap in filled:
            spans = ranges.get((gap.exchange, gap.symbol), [])
            if _span(gap) in spans:
                spans.remove(_span(gap))
        return OpenGapIds({key: spans for key, spans in ranges.items() if spans})


def _span(gap: Gap) -> tuple[int, int]:
    return (gap.first_missing_id, gap.last_missing_id)


@dataclass
class GapCheck:
    """One partition's continuity step in one transaction (a batch's or an idle tick's):
    :meth:`find` after the trades are stored and folded, :meth:`send` with the batch's other
    rows, :meth:`receive` once they are sent. ``snapshot`` is the continuity state to commit."""

    continuity: IdContinuity
    open_ids: OpenGapIds
    #: The topic's partitions: their logs' start and end, as last read (None: not yet).
    log_bounds: dict[int, tuple[int, int]] | None
    candidates: list[Gap] = field(default_factory=list)
    fills: set[Key] = field(default_factory=set)
    recorded: list[Gap] = field(default_factory=list)
    filled: list[Gap] = field(default_factory=list)
    snapshot: dict | None = None

    def find(
        self,
        conn: psycopg.Connection,
        group: str,
        topic: str,
        partition: int,
        trades: Sequence[Trade],
        watermark_us: int | None,
    ) -> None:
        """Observe the transaction's trades (every first copy: a duplicate's id is stored too);
        take the holes now due as candidates, and the symbols whose open gaps they may fill."""
        continuity = self.continuity
        continuity.observe(trades)
        due = continuity.next_due_us()
        due_now = due is not None and watermark_us is not None and due < watermark_us
        if due_now and self.log_bounds is not None:  # (None: other partitions not known yet)
            others = others_watermark_us(conn, group, topic, partition, self.log_bounds)
            limit = watermark_us if others is None else min(watermark_us, others)
            self.candidates = continuity.gaps(limit)
        self.fills = self.open_ids.filling(trades)
        self.snapshot = continuity.snapshot()

    def send(
        self, conn: psycopg.Connection, topic: str, partition: int
    ) -> tuple[psycopg.Cursor | None, psycopg.Cursor | None]:
        """Record the candidates really missing and mark the gaps filled (in a pipeline: the
        batch's round trip)."""
        recorded = record_gaps(
            conn, self.candidates, detected_by="stream", topic=topic, partition=partition
        )
        filled = mark_filled(conn, "stream", self.fills) if self.fills else None
        return recorded, filled

    def receive(self, cursors: tuple[psycopg.Cursor | None, psycopg.Cursor | None]) -> None:
        self.recorded, self.filled = gaps_of(cursors[0]), gaps_of(cursors[1])


def account_gaps(summary: RunSummary, check: GapCheck, partition: int) -> None:
    """A committed step's gaps: one log line each, the metrics, the run's summary."""
    for gap in check.recorded:
        log.warning("trade gap", partition=partition, **gap_fields(gap))
    for gap in check.filled:
        log.info("trade gap filled", partition=partition, filled_by="stream", **gap_fields(gap))
    metrics.account_gaps(summary, check.recorded, check.filled)


def gap_fields(gap: Gap) -> dict:
    """A gap as a log line gives it (times as ISO-8601 UTC)."""
    return {
        "exchange": gap.exchange,
        "symbol": gap.symbol,
        "first_missing_id": gap.first_missing_id,
        "last_missing_id": gap.last_missing_id,
        "missing": gap.missing,
        "before": ts_to_datetime(gap.before_ts_us).isoformat(),
        "after": ts_to_datetime(gap.after_ts_us).isoformat(),
    }


class GapWatch:
    """The worker's side of open gaps (part of ``StreamWorker``): the hint, refreshed on the
    loop's connection."""

    open_ids: OpenGapIds
    _gaps_refreshed: float
    _topic_bounds: dict[int, tuple[int, int]] | None
    _bounds_read: float

    def _gap_check(self, partition: int) -> GapCheck:
        """The continuity step of a partition's next transaction (on the loop)."""
        continuity = self.partitions[partition].continuity
        assert continuity is not None
        return GapCheck(continuity, self.open_ids, self._topic_bounds)

    def _gaps_waiting(self, state: PartitionState) -> bool:
        """A hole of the partition is past its watermark, held back by another partition: an
        idle tick looks again (the partition may have no batch left to do it)."""
        due = state.continuity.next_due_us() if state.continuity is not None else None
        watermark = state.windows.watermark_us
        return due is not None and watermark is not None and due < watermark

    async def _read_log_bounds(self) -> None:
        """Every ``LOG_BOUNDS_EVERY_S``: the start and end of every partition's log (a topic of
        several partitions), for :func:`others_watermark_us` (on the loop, under the lock)."""
        assert self._consumer is not None
        now = time.monotonic()
        if now - self._bounds_read < LOG_BOUNDS_EVERY_S:
            return
        self._bounds_read = now
        numbers = self._consumer.partitions_for_topic(self.topic)
        if not numbers:
            return
        tps = [TopicPartition(self.topic, p) for p in sorted(numbers)]
        if len(tps) == 1:
            self._topic_bounds = {tps[0].partition: (0, 0)}  # (no other partition to wait for)
            return
        starts = await self._consumer.beginning_offsets(tps)
        ends = await self._consumer.end_offsets(tps)
        assigned = self._consumer.assignment()
        self._topic_bounds = {
            tp.partition: (
                starts[tp],
                # (a fetch answer's high watermark can be ahead of ListOffsets' end)
                max(ends[tp], (self._consumer.highwater(tp) or 0) if tp in assigned else 0),
            )
            for tp in tps
        }

    def _gaps_committed(self, partition: int, check: GapCheck) -> None:
        """After the commit of a transaction that ran ``check`` (on the loop)."""
        state = self.partitions.get(partition)
        if state is not None:
            state.committed_continuity = check.snapshot
        self.open_ids = self.open_ids.changed(check.recorded, check.filled)
        account_gaps(self.summary, check, partition)

    async def _refresh_gaps(self, force: bool = False) -> None:
        """Every ``OPEN_GAPS_REFRESH_S`` (``force``: now): mark the gaps recorded lately that
        stored trades fill, and re-read the open gaps' ids (on the loop's connection, under the
        lock or with nothing in flight)."""
        now = time.monotonic()
        if not force and now - self._gaps_refreshed < OPEN_GAPS_REFRESH_S:
            return
        self._gaps_refreshed = now
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return  # (reconnected by the loop's next step)

        def refresh() -> tuple[list[Gap], dict]:
            filled = gaps_of(mark_filled(conn, "stream", detected_within=RECENT_GAPS))
            conn.commit()
            return filled, open_gap_ids(conn)

        filled, ranges = await asyncio.to_thread(refresh)
        self.open_ids = OpenGapIds(ranges)
        for gap in filled:
            log.info("trade gap filled", filled_by="stream", **gap_fields(gap))
        metrics.account_gaps(self.summary, [], filled)
