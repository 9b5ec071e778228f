"""Data-quality checks of an interval (SPEC §6 step 4) and the pass/warn/fail verdict (step 5).

Checks run in SQL over the run's owned windows: OHLC sanity (low ≤ open, close ≤ high), the
rollup invariant (every larger candle equals the merge of its base candles) in both candle
tables, gaps (base windows without trades), late-trade and invalid-message rates, the stream's
lag, and the offset resets that may have touched the interval. ``verdict`` turns the summary into
a status with the reasons for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec
import psycopg

from shared.batch.candle_sql import candle_columns, candle_states, rollup, same
from shared.batch.recompute import owned_windows
from shared.batch.summary import (
    InvalidMessages,
    LatenessBucket,
    LateTrades,
    OffsetReset,
    ReportSummary,
)
from shared.config import Settings
from shared.core.intervals import IntervalSet
from shared.store.progress import resets_between, stream_totals

LATENESS_BUCKETS = ((0, 1), (1, 5), (5, 30), (30, 60), (60, 300), (300, 900), (900, None))


@dataclass(frozen=True)
class Thresholds:
    """When a report warns or fails: the ``CANDLEKEEP_DQ_*`` settings, whose defaults live in
    ``Settings`` only."""

    max_late_rate: float
    max_invalid_rate: float
    max_missing_in_stream: int
    max_gap_rate: float

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        return cls(
            max_late_rate=settings.dq_max_late_rate,
            max_invalid_rate=settings.dq_max_invalid_rate,
            max_missing_in_stream=settings.dq_max_missing_in_stream,
            max_gap_rate=settings.dq_max_gap_rate,
        )


def ohlc_violations(conn: psycopg.Connection, table: str, start: datetime, end: datetime) -> int:
    """Candles whose low/high do not bound open and close (should never happen)."""
    return conn.execute(
        f"SELECT count(*) FROM {table} WHERE window_start >= %s AND window_end <= %s"
        " AND NOT (low <= open AND low <= close AND open <= high AND close <= high)",
        (start, end),
    ).fetchone()[0]


def rollup_violations(
    conn: psycopg.Connection,
    table: str,
    start: datetime,
    end: datetime,
    intervals: IntervalSet,
    *,
    closed_before: datetime | None = None,
) -> int:
    """Larger candles that are not the merge of their base candles in the same table.

    ``closed_before``: the stream's watermark (the least over its partitions), for the stream's
    table. The stream writes a larger candle only once all of its base windows have closed, and a
    symbol spread over partitions gets each partition's part as that partition closes it; so
    until the watermark has passed a larger window's end, its base candles without it (or with
    parts the larger one has not got yet) are a stream that lags, not a broken invariant; the lag
    is a ``warn`` of its own. ``None`` (batch): every larger window is complete.
    """
    base = intervals.base.name
    total = 0
    for window_range in owned_windows(start, end, intervals)[1:]:
        interval = window_range.interval
        total += conn.execute(
            f"""
            WITH states AS (
                SELECT * FROM ({candle_states(table)}) AS c
                WHERE interval = %(base)s AND window_start >= %(first)s
                  AND window_end <= %(last_end)s
            ), merged AS (
                SELECT exchange, symbol, window_start, {candle_columns()}
                FROM ({rollup("%(len)s", "states")}) AS r
            ), larger AS (
                SELECT * FROM {table}
                WHERE interval = %(name)s AND window_start >= %(first)s
                  AND window_end <= %(last_end)s
            )
            SELECT count(*)
            FROM larger l FULL JOIN merged m USING (exchange, symbol, window_start)
            WHERE (%(closed_before)s::timestamptz IS NULL
                   OR window_start + %(len)s <= %(closed_before)s)
              AND (l.open IS NULL OR m.open IS NULL OR NOT ({same("l", "m")}))
            """,
            {
                "len": timedelta(microseconds=interval.length_us),
                "base": base,
                "name": interval.name,
                "first": window_range.first_start,
                "last_end": window_range.last_end,
                "closed_before": closed_before,
            },
        ).fetchone()[0]
    return total


def gaps(
    conn: psycopg.Connection, start: datetime, end: datetime, intervals: IntervalSet
) -> dict[str, int]:
    """Per symbol, base windows without a batch candle between its first and last candle."""
    base = intervals.base
    rows = conn.execute(
        "SELECT exchange || ':' || symbol, count(*),"
        " extract(epoch FROM max(window_start) - min(window_start)) * 1000000 / %s + 1"
        " FROM batch_candles WHERE interval = %s AND window_start >= %s AND window_end <= %s"
        " GROUP BY 1 ORDER BY 1",
        (base.length_us, base.name, start, end),
    ).fetchall()
    return {name: int(span) - count for name, count, span in rows}


def stored_trades_by_symbol(
    conn: psycopg.Connection, start: datetime, end: datetime
) -> dict[tuple[str, str], int]:
    """How many trades each (exchange, symbol) stored in ``[start, end)``: one grouped pass over
    the period's time range (the BRIN on ``ts``), shared by the late-trade rate and the lateness
    advice, which both divide by it."""
    return {
        (exchange, symbol): count
        for exchange, symbol, count in conn.execute(
            "SELECT exchange, symbol, count(*) FROM trades WHERE ts >= %s AND ts < %s"
            " GROUP BY 1, 2",
            (start, end),
        ).fetchall()
    }


def late_stats(
    conn: psycopg.Connection, start: datetime, end: datetime, stored: dict[tuple[str, str], int]
) -> LateTrades:
    """The period's late trades against its ``stored`` trades (:func:`stored_trades_by_symbol`),
    with how late they were, in :data:`LATENESS_BUCKETS`."""
    trades = sum(stored.values())
    buckets_sql = ", ".join(
        "count(*) FILTER (WHERE extract(epoch FROM lateness) >= %s"
        + (" AND extract(epoch FROM lateness) < %s)" if high is not None else ")")
        for _, high in LATENESS_BUCKETS
    )
    bounds = [b for low, high in LATENESS_BUCKETS for b in (low, high) if b is not None]
    late, max_lateness, *counts = conn.execute(
        f"SELECT count(*), coalesce(max(extract(epoch FROM lateness)), 0), {buckets_sql}"
        " FROM late_trades WHERE ts >= %s AND ts < %s",
        (*bounds, start, end),
    ).fetchone()
    buckets = [
        LatenessBucket(f"{low}-{high}s" if high is not None else f"≥{low}s", count)
        for (low, high), count in zip(LATENESS_BUCKETS, counts, strict=True)
    ]
    return LateTrades(
        trades=trades,
        late=late,
        rate=late / trades if trades else 0.0,
        max_lateness_s=float(max_lateness),
        lateness=buckets,
    )


def invalid_stats(conn: psycopg.Connection) -> InvalidMessages:
    """The stream's invalid-message rate so far (invalid messages carry no trade time)."""
    consumed, invalid = stream_totals(conn)
    reasons = dict(
        conn.execute(
            "SELECT reason_code, count(*) FROM invalid_trades WHERE source LIKE 'kafka:%%'"
            " GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
    )
    return InvalidMessages(
        consumed=int(consumed),
        invalid=int(invalid),
        rate=int(invalid) / int(consumed) if consumed else 0.0,
        reasons=reasons,
    )


def offset_resets(
    conn: psycopg.Connection, group: str, topic: str, start: datetime, end: datetime
) -> list[OffsetReset]:
    """The offset resets (SPEC §4) of the stream (consumer ``group`` on ``topic``) that may have
    touched ``[start, end)``.

    The messages a reset passed over were not read, so their event times are not known; they
    lie after the partition's watermark at the reset (earlier ones would have been late) and
    before the first trade read after it (``resumed_at``). A reset touches every interval that
    meets ``[watermark, resumed_at]``: without a watermark (nothing read before) from the
    beginning, without ``resumed_at`` (nothing read since, or the worker stopped under
    ``fail``) onwards.
    """
    rows = resets_between(conn, group, topic, start, end)
    return [
        OffsetReset(
            **{name: v.isoformat() if isinstance(v, datetime) else v for name, v in row.items()}
        )
        for row in rows
    ]


def describe_reset(reset: OffsetReset) -> str:
    """One line for a report's reasons."""
    where = f"offset reset on {reset.topic} partition {reset.partition}"
    what = {
        "beyond_end": f"stored offset {reset.stored_offset} beyond the log's end "
        f"{reset.log_end_offset} (broker lost its log or topic recreated)",
        "replaced": f"the log before stored offset {reset.stored_offset} was replaced "
        "(broker lost its log or topic recreated)",
        "before_start": f"stored offset {reset.stored_offset} before the log's start "
        f"{reset.log_start_offset} (deleted by retention)",
    }[reset.kind]
    return (
        f"{where} at {reset.detected_at}: {what}; {reset.skipped} message(s) known "
        f"skipped, policy {reset.policy}"
    )


def _venue_reasons(summary: ReportSummary) -> tuple[list[str], list[str]]:
    """SPEC §6.1: a candle the venue contradicts fails; a venue that could not be asked, gaps
    still open and expected symbols without a trade warn (never a silent pass)."""
    fail, warn = [], []
    venue = summary.venue
    if venue is not None:
        if venue.counts.get("exchange_mismatch"):
            fail.append(
                f"{venue.counts['exchange_mismatch']} candle(s) differ from the venue's "
                "(exchange_mismatch) beyond what the trade-id gaps explain"
            )
        for problem in venue.problems:
            where = " ".join(p for p in (problem.exchange, problem.symbol, problem.interval) if p)
            warn.append(f"not checked against the venue ({where}): {problem.reason}")
        if venue.counts.get("gap"):
            warn.append(f"{venue.counts['gap']} candle(s) short of trades lost in id gaps (gap)")
    for key, missing in summary.missing_by_symbol().items():
        warn.append(f"{key}: {missing} trade(s) missing in trade-id gaps still open")
    for silent in summary.silent_symbols:
        seen = f" (last seen {silent.last_seen})" if silent.last_seen else " (configured)"
        warn.append(f"{silent.exchange}:{silent.symbol} expected but has no trade{seen}")
    return fail, warn


def verdict(summary: ReportSummary, thresholds: Thresholds) -> tuple[str, list[str]]:
    """``fail`` for anything that means a bug or lost data, ``warn`` past a threshold."""
    counts = summary.counts
    fail, warn = [], []
    if counts["unexplained"]:
        fail.append(f"{counts['unexplained']} unexplained difference(s)")
    if counts["missing_in_batch"]:
        fail.append(f"{counts['missing_in_batch']} stream candle(s) with no stored trade")
    for table, n in msgspec.structs.asdict(summary.ohlc_violations).items():
        if n:
            fail.append(f"{n} {table} candle(s) with low/high not bounding open/close")
    for table, n in msgspec.structs.asdict(summary.rollup_violations).items():
        if n:
            fail.append(f"{n} {table} candle(s) that are not the merge of their base candles")
    # An offset reset that skipped messages lost them (for the stream and for batch alike, so
    # the two still agree): fail. One that skipped none known (the broker lost a log whose
    # unread end, if any, is not known) may have lost trades: warn.
    for reset in summary.offset_resets:
        (fail if reset.skipped else warn).append(describe_reset(reset))
    venue_fail, venue_warn = _venue_reasons(summary)
    fail += venue_fail
    warn += venue_warn
    if counts["missing_in_stream"] > thresholds.max_missing_in_stream:
        warn.append(f"{counts['missing_in_stream']} candle(s) missing in the stream")
    late = summary.late_trades
    if late.rate > thresholds.max_late_rate:
        warn.append(f"late-trade rate {late.rate:.2%} above {thresholds.max_late_rate:.2%}")
    invalid = summary.invalid_messages
    if invalid.rate > thresholds.max_invalid_rate:
        warn.append(
            f"invalid-message rate {invalid.rate:.2%} above {thresholds.max_invalid_rate:.2%}"
        )
    stream = summary.stream
    if not stream.passed:
        warn.append(
            "the stream's watermark had not passed the period's end"
            + (f" (lag {stream.lag_s:.0f}s)" if stream.lag_s is not None else "")
        )
    windows = summary.base_windows
    if windows and summary.gaps_total / windows > thresholds.max_gap_rate:
        warn.append(f"{summary.gaps_total} of {windows} base windows have no trade")
    if fail:
        return "fail", fail + warn
    return ("warn" if warn else "pass"), warn
