"""The stream's progress, ``stream_progress`` and ``offset_resets``: the one module that writes
and reads them. How far the stream has got (SPEC §4 "progress is visible", §6 step 1), and what
the worker commits with each batch and resumes from (SPEC §5)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from shared.core.trades import ts_to_datetime
from shared.core.windows import PartitionWindows
from shared.store.stale_periods import RECONCILED_UNTIL, UNKNOWN


@dataclass
class StreamPosition:
    """The slowest partition's watermark, and whether it has passed a point in time."""

    watermark: datetime | None
    passed: bool
    waited_s: float
    lag_s: float | None  # how far the watermark is behind the point (None: no watermark yet)


def stream_watermark(conn: psycopg.Connection, group: str, topic: str) -> datetime | None:
    """The least watermark over the partitions that have one: every candle before it is final."""
    row = conn.execute(
        "SELECT min(watermark) FROM stream_progress"
        " WHERE consumer_group = %s AND topic = %s AND watermark IS NOT NULL",
        (group, topic),
    ).fetchone()
    if not conn.autocommit:
        conn.rollback()
    return row[0]


def wait_for_watermark(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    point: datetime,
    timeout_s: float,
    *,
    poll_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> StreamPosition:
    """Poll until the stream's watermark reaches ``point``, at most ``timeout_s``."""
    started = monotonic()
    while True:
        watermark = stream_watermark(conn, group, topic)
        waited = monotonic() - started
        if watermark is not None and watermark >= point:
            return StreamPosition(watermark, True, waited, 0.0)
        if waited >= timeout_s:
            lag = None if watermark is None else (point - watermark).total_seconds()
            return StreamPosition(watermark, False, waited, lag)
        sleep(min(poll_s, max(0.0, timeout_s - waited)))


# -- the stream worker's side: one row per (consumer group, topic, partition) ----------------------
#
# The worker commits a partition's progress (next offset, watermark, counters, open-window state)
# in the same transaction as the rows of its batch (SPEC §5). A *fence* makes this hold across
# rebalances: each transaction first locks the partition's row and checks that the stored next
# offset is the one this worker resumed from. A worker that lost the partition (a zombie) finds
# another offset there and its transaction is rolled back.


class Fenced(Exception):
    """Another worker moved this partition on: drop it and resume from what is stored."""


@dataclass
class StoredProgress:
    """A partition's committed progress, as a worker resumes from it."""

    next_offset: int | None
    window_state: dict | None
    #: Fingerprint of the message before next_offset (``stream.parse.record_digest``).
    last_digest: int | None = None
    #: An ``offset_resets`` row (policy earliest) that no trade has been read after yet.
    pending_reset: int | None = None
    #: The partition's trade-id continuity (``IdContinuity.snapshot()``; None: none yet).
    continuity_state: dict | None = None


def load_progress(
    conn: psycopg.Connection, group: str, topic: str, partition: int
) -> StoredProgress:
    row = conn.execute(
        "SELECT next_offset, window_state, last_digest, (SELECT max(id) FROM offset_resets r"
        "  WHERE r.consumer_group = p.consumer_group AND r.topic = p.topic"
        "  AND r.partition = p.partition AND r.policy = 'earliest' AND r.resumed_at IS NULL),"
        " continuity_state FROM stream_progress p"
        " WHERE consumer_group = %s AND topic = %s AND partition = %s",
        (group, topic, partition),
    ).fetchone()
    conn.rollback()
    return StoredProgress(*row) if row else StoredProgress(None, None)


def fence(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    partition: int,
    resumed_from: int | None,
    savepoint: str | None = None,
):
    """Lock the partition's progress row and check that its offset is ``resumed_from`` (None: no
    row yet), else raise :class:`Fenced`; ``savepoint``: also take that savepoint, in the same
    round trip (as the transaction's ``BEGIN``).

    Returns the end of the newest reconciled period as this transaction first sees it (None:
    none; ``stale_periods.UNKNOWN`` without a progress row), read in the same statement, so
    that storing the batch's trades marks stale periods without a statement of its own.
    """
    with conn.pipeline():
        cur = conn.execute(
            f"SELECT next_offset, {RECONCILED_UNTIL} FROM stream_progress"
            " WHERE consumer_group = %s AND topic = %s AND partition = %s FOR UPDATE",
            (group, topic, partition),
        )
        if savepoint is not None:
            conn.execute(f"SAVEPOINT {savepoint}")
    row = cur.fetchone()
    stored = row[0] if row else None
    if stored != resumed_from:
        raise Fenced(
            f"partition {partition}: stored offset {stored}, this worker resumed from "
            f"{resumed_from}"
        )
    return row[1] if row else UNKNOWN


def write_progress(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    partition: int,
    next_offset: int,
    windows: PartitionWindows,
    *,
    consumed: int = 0,
    stored: int = 0,
    duplicates: int = 0,
    conflicting: int = 0,
    invalid: int = 0,
    late: int = 0,
    snapshot: dict | None = None,
    last_digest: int | None = None,
    continuity: dict | None = None,
) -> None:
    """Upsert the partition's progress row; ``snapshot``: ``windows.snapshot()`` if already
    taken; ``last_digest``: that of the message before ``next_offset`` (None: unchanged);
    ``continuity``: the partition's ``IdContinuity.snapshot()`` (None: unchanged)."""
    clock = windows.clock
    watermark = None if clock.watermark_us is None else ts_to_datetime(clock.watermark_us)
    max_ts = None if clock.max_ts_us is None else ts_to_datetime(clock.max_ts_us)
    conn.execute(
        "INSERT INTO stream_progress (consumer_group, topic, partition, next_offset, watermark,"
        " max_trade_ts, window_state, consumed, stored, duplicates, conflicting, invalid, late,"
        " last_digest, continuity_state)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET"
        " next_offset = EXCLUDED.next_offset, watermark = EXCLUDED.watermark,"
        " max_trade_ts = EXCLUDED.max_trade_ts, window_state = EXCLUDED.window_state,"
        " consumed = stream_progress.consumed + EXCLUDED.consumed,"
        " stored = stream_progress.stored + EXCLUDED.stored,"
        " duplicates = stream_progress.duplicates + EXCLUDED.duplicates,"
        " conflicting = stream_progress.conflicting + EXCLUDED.conflicting,"
        " invalid = stream_progress.invalid + EXCLUDED.invalid,"
        " late = stream_progress.late + EXCLUDED.late,"
        " last_digest = coalesce(EXCLUDED.last_digest, stream_progress.last_digest),"
        " continuity_state = coalesce(EXCLUDED.continuity_state,"
        "  stream_progress.continuity_state),"
        " updated_at = now()",
        (
            group,
            topic,
            partition,
            next_offset,
            watermark,
            max_ts,
            Jsonb(windows.snapshot() if snapshot is None else snapshot),
            consumed,
            stored,
            duplicates,
            conflicting,
            invalid,
            late,
            last_digest,
            None if continuity is None else Jsonb(continuity),
        ),
    )


#: What :func:`others_watermark_us` returns for a partition that holds trades not committed yet
#: and has no watermark: nothing is known to be past.
NOTHING_PAST_US = -(2**62)


def others_watermark_us(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    partition: int,
    log_bounds: dict[int, tuple[int, int]],
) -> int | None:
    """How far the topic's other partitions have committed every on-time trade (epoch µs): the
    least committed watermark of those (of ``log_bounds``: partition -> its log's start and
    end) that have not committed their whole log; None when all have (nothing of theirs is
    still to come). A symbol's trades may arrive on several partitions (SPEC §4): one of them
    may still hold what another seems to miss. A partition with messages and no watermark yet
    (nothing committed: a backlog just started) holds everything back."""
    others = sorted(p for p in log_bounds if p != partition)
    if not others:
        return None
    row = conn.execute(
        "SELECT min(CASE WHEN coalesce(s.next_offset, b.log_start) >= b.log_end THEN NULL"
        "  WHEN s.watermark IS NULL THEN %s"
        "  ELSE (extract(epoch FROM s.watermark) * 1000000)::int8 END)"
        " FROM unnest(%s::int4[], %s::int8[], %s::int8[]) AS b(partition, log_start, log_end)"
        " LEFT JOIN stream_progress s ON s.consumer_group = %s AND s.topic = %s"
        "  AND s.partition = b.partition",
        (
            NOTHING_PAST_US,
            others,
            [log_bounds[p][0] for p in others],
            [log_bounds[p][1] for p in others],
            group,
            topic,
        ),
    ).fetchone()
    return row[0]


@dataclass
class OffsetReset:
    """A partition's stored position no longer in its log (SPEC §4 "Offset resets")."""

    partition: int
    kind: str  # beyond_end | replaced | before_start
    stored_offset: int
    log_start: int
    log_end: int
    policy: str  # earliest | fail
    watermark: datetime | None
    max_trade_ts: datetime | None

    @property
    def skipped(self) -> int:
        """Messages known to be passed over by going on from the log start: the deleted range
        (before_start), or those of a new log already gone before its start. What an old log
        held past the stored position is gone with it and not known."""
        if self.kind == "before_start":
            return self.log_start - self.stored_offset
        return self.log_start

    def describe(self, topic: str) -> str:
        where = f"partition {self.partition} of topic {topic}: stored offset {self.stored_offset}"
        if self.kind == "before_start":
            return (
                f"{where} is before the log's start {self.log_start} (retention deleted "
                f"{self.skipped} message(s) before they were consumed)"
            )
        if self.kind == "replaced":
            return (
                f"{where}, but the log (end {self.log_end}) holds another message before it "
                "(the broker lost its log or the topic was recreated)"
            )
        return (
            f"{where} is beyond the log's end {self.log_end} (the broker lost its log or the "
            "topic was recreated)"
        )


def record_reset(conn: psycopg.Connection, group: str, topic: str, reset: OffsetReset) -> int:
    """Record ``reset`` in ``offset_resets`` and, with policy ``earliest``, move the partition's
    progress to the log start (counting what that skips), in the caller's transaction; returns
    the row's id.

    A reset detected again at the same stored offset after a ``fail`` (the operator restarted
    with another policy) updates that row: one row per reset.
    """
    fence(conn, group, topic, reset.partition, reset.stored_offset)
    values = (
        reset.kind,
        reset.log_start,
        reset.log_end,
        reset.skipped,
        reset.policy,
        reset.watermark,
        reset.max_trade_ts,
    )
    row = conn.execute(
        "UPDATE offset_resets SET kind = %s, log_start_offset = %s, log_end_offset = %s,"
        " skipped = %s, policy = %s, watermark = %s, max_trade_ts = %s"
        " WHERE id = (SELECT max(id) FROM offset_resets WHERE consumer_group = %s"
        "  AND topic = %s AND partition = %s) AND policy = 'fail' AND stored_offset = %s"
        " RETURNING id",
        (*values, group, topic, reset.partition, reset.stored_offset),
    ).fetchone()
    if row is None:
        row = conn.execute(
            "INSERT INTO offset_resets (kind, log_start_offset, log_end_offset, skipped, policy,"
            " watermark, max_trade_ts, consumer_group, topic, partition, stored_offset)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (*values, group, topic, reset.partition, reset.stored_offset),
        ).fetchone()
    if reset.policy == "earliest":
        conn.execute(
            "UPDATE stream_progress SET next_offset = %s, skipped = skipped + %s,"
            " last_digest = NULL, updated_at = now()"
            " WHERE consumer_group = %s AND topic = %s AND partition = %s",
            (reset.log_start, reset.skipped, group, topic, reset.partition),
        )
    return row[0]


def mark_resumed(conn: psycopg.Connection, reset_id: int, first_trade_us: int) -> None:
    """Complete an offset reset with the time of the first trade read after it: the end of the
    event times that the messages it skipped may have had."""
    conn.execute(
        "UPDATE offset_resets SET resumed_at = %s WHERE id = %s AND resumed_at IS NULL",
        (ts_to_datetime(first_trade_us), reset_id),
    )


def stream_totals(conn: psycopg.Connection) -> tuple[int, int]:
    """Messages consumed and found invalid by the stream so far, over every partition."""
    consumed, invalid = conn.execute(
        "SELECT coalesce(sum(consumed), 0), coalesce(sum(invalid), 0) FROM stream_progress"
    ).fetchone()
    return int(consumed), int(invalid)


def resets_between(
    conn: psycopg.Connection, group: str, topic: str, start: datetime, end: datetime
) -> list[dict]:
    """The ``offset_resets`` rows of consumer ``group`` on ``topic`` whose span
    ``[watermark, resumed_at]`` (open where NULL) meets ``[start, end)``, oldest first; the
    batch side's ``quality.offset_resets`` says why that span."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT id, consumer_group, topic, partition, kind, stored_offset, log_start_offset,"
            " log_end_offset, skipped, policy, watermark, resumed_at, detected_at"
            " FROM offset_resets WHERE consumer_group = %s AND topic = %s"
            " AND (watermark IS NULL OR watermark < %s)"
            " AND (resumed_at IS NULL OR resumed_at >= %s) ORDER BY detected_at, id",
            (group, topic, end, start),
        ).fetchall()
    if not conn.autocommit:
        conn.rollback()
    return rows
