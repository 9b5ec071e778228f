"""The steps of one batch run over ``[start, end)`` (SPEC §6), each a plain function.

The Airflow tasks and ``candlekeep reconcile`` call these same functions, in this order; each
takes the database URL and the run's *period* ``[start, end)`` (``interval`` is kept for candle
lengths, ``1m``) and returns JSON-able data, so that Airflow can pass it between tasks. Every
step is idempotent: rerunning a period replaces its results.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from datetime import datetime

import msgspec

from shared.batch.finality import (
    lateness_advice,
    prepare_corrections,
    recount,
    status_counts,
)
from shared.batch.quality import (
    Thresholds,
    gaps,
    invalid_stats,
    late_stats,
    offset_resets,
    ohlc_violations,
    rollup_violations,
    verdict,
)
from shared.batch.recompute import recompute_batch_candles
from shared.batch.reconcile import classify
from shared.batch.summary import ByTable, Period, ReportSummary, StreamProgress
from shared.config import Settings
from shared.core.intervals import IntervalSet
from shared.core.trades import parse_timestamp, ts_to_datetime
from shared.store import db
from shared.store.progress import wait_for_watermark
from shared.store.stale_periods import (
    clear_stale,
    is_stale,
    stale_periods,
    start_reconciling,
    stays_stale,
)


class PeriodError(ValueError):
    """A run's period ``[start, end)`` that is missing, reversed, or not made of times."""


TIME_EXAMPLES = "e.g. 2026-01-01T00:00Z, 2026-01-01T00:00:00+00:00 or 2026-01-01T02:00+02:00"


def parse_instant(name: str, text: str) -> int:
    """A time given on a command line or in a run's params, in epoch microseconds.

    Python's own words for a bad time ("Invalid isoformat string", "offset must be a timedelta
    strictly between…") are not for a person: the error says what the value is not and shows
    the forms that work.
    """
    value = text.strip()
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        if value.lstrip("-").isdigit():
            why = "a number, not a time (epoch numbers are not taken: say which instant)"
        elif "no UTC offset" in str(exc):
            why = "a time without a UTC offset"
        elif re.search(r"[+-](\d\d):?(\d\d)$", value) and not _offset_ok(value):
            why = "a time whose UTC offset is not between -23:59 and +23:59"
        else:
            why = "not a valid ISO-8601 time"
        raise PeriodError(
            f"{name} {text!r} is {why}: write ISO-8601 with an offset, {TIME_EXAMPLES}"
        ) from None


def _offset_ok(value: str) -> bool:
    hours, minutes = re.search(r"[+-](\d\d):?(\d\d)$", value).groups()
    return int(hours) < 24 and int(minutes) < 60


def parse_period(start: str | datetime | None, end: str | datetime | None) -> tuple:
    """``(start, end)`` as aware datetimes; a clear error when missing or reversed."""
    if start is None or end is None or start == "" or end == "":
        raise PeriodError(
            "no period to reconcile: give both start and end (ISO-8601, e.g. "
            "start=2026-01-01T00:00:00Z end=2026-01-01T01:00:00Z)"
        )
    values = []
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise PeriodError(f"{name} {value.isoformat()} has no UTC offset")
            values.append(value)
            continue
        values.append(ts_to_datetime(parse_instant(name, str(value))))
    if values[1] <= values[0]:
        raise PeriodError(f"end {values[1].isoformat()} is not after start {values[0].isoformat()}")
    return values[0], values[1]


def wait_step(
    url: str, settings: Settings, start, end, timeout_s: float, poll_s: float = 5.0
) -> dict:
    """Step 1: wait (bounded) until the stream's watermark has passed ``end``."""
    _, end = parse_period(start, end)
    with db.connect(url) as conn:
        db.require_schema(conn, url)  # the first step: a missing schema is said here, clearly
        position = wait_for_watermark(
            conn, settings.consumer_group, settings.topic_trades, end, timeout_s, poll_s=poll_s
        )
    out = asdict(position)
    out["watermark"] = position.watermark.isoformat() if position.watermark else None
    out.pop("waited_s")  # wall time spent waiting: logged, not part of the (idempotent) report
    return out


def recompute_step(url: str, settings: Settings, start, end) -> dict:
    """Step 2: recompute every candle of the period from ``trades``, in SQL. The period counts
    as reconciled from before ``trades`` is read: a trade stored from then on marks it stale."""
    start, end = parse_period(start, end)
    with db.connect(url) as conn:
        db.require_schema(conn, url)
        start_reconciling(conn, start, end)
        conn.commit()
        counts = recompute_batch_candles(conn, start, end, settings.interval_set)
        conn.commit()
    return counts


def reconcile_step(url: str, settings: Settings, start, end) -> dict:
    """Step 3: classify every candle key; mismatches into ``candle_mismatches``, and the batch
    candles that correct the stream's into the corrections' outbox, in the same transaction."""
    start, end = parse_period(start, end)
    with db.connect(url) as conn:
        result = classify(conn, start, end, settings.interval_set)
        corrections = prepare_corrections(conn, start, end, settings.interval_set)
        conn.commit()
    order = settings.interval_set.names
    by_interval = {i: result.by_interval[i] for i in order if i in result.by_interval}
    return {"counts": result.counts, "by_interval": by_interval, "corrections": corrections}


def checks_step(
    url: str, settings: Settings, start, end, reconciliation: dict, stream: dict
) -> ReportSummary:
    """Step 4: data-quality checks; returns the report's summary with its verdict."""
    start, end = parse_period(start, end)
    intervals: IntervalSet = settings.interval_set
    # Windows the stream has closed: before its watermark (none yet without one).
    stream_closed_before = (
        ts_to_datetime(parse_timestamp(stream["watermark"])) if stream.get("watermark") else start
    )
    with db.connect(url) as conn:
        recount(conn, start, end, intervals)  # a trade the recomputation just missed
        conn.commit()
        gap_counts = gaps(conn, start, end, intervals)
        base_windows = conn.execute(
            "SELECT count(DISTINCT (exchange, symbol)) FROM batch_candles WHERE interval = %s"
            " AND window_start >= %s AND window_end <= %s",
            (intervals.base.name, start, end),
        ).fetchone()[0] * int((end - start).total_seconds() * 1e6 // intervals.base.length_us)
        summary = ReportSummary(
            period=Period(start.isoformat(), end.isoformat()),
            intervals=intervals.names,
            counts=reconciliation["counts"],
            by_interval=reconciliation["by_interval"],
            ohlc_violations=ByTable(
                batch=ohlc_violations(conn, "batch_candles", start, end),
                stream=ohlc_violations(conn, "stream_candles", start, end),
            ),
            rollup_violations=ByTable(
                batch=rollup_violations(conn, "batch_candles", start, end, intervals),
                stream=rollup_violations(
                    conn,
                    "stream_candles",
                    start,
                    end,
                    intervals,
                    closed_before=stream_closed_before,
                ),
            ),
            gaps=gap_counts,
            gaps_total=sum(gap_counts.values()),
            base_windows=base_windows,
            late_trades=late_stats(conn, start, end),
            invalid_messages=invalid_stats(conn),
            stream=msgspec.convert(stream, StreamProgress),
            offset_resets=offset_resets(
                conn, settings.consumer_group, settings.topic_trades, start, end
            ),
            lateness_advice=lateness_advice(
                conn,
                start,
                end,
                max_rate=settings.dq_max_late_rate,
                max_delay_us=_us(settings.max_delay),
                allowed_lateness_us=_us(settings.allowed_lateness),
            ),
            statuses=status_counts(conn, start, end),
            stale=stays_stale(conn, start, end),
        )
    summary.status, summary.reasons = verdict(summary, Thresholds.of(settings))
    return summary


def publish_step(url: str, settings: Settings, summary: ReportSummary) -> dict:
    """Step 5: the ``dq_reports`` row and its self-contained HTML page."""
    from shared.batch.report import publish_report

    published = publish_report(url, settings, summary)
    start, end = parse_period(summary.period.start, summary.period.end)
    with db.connect(url) as conn:  # stale until now: this run's report has replaced it
        clear_stale(conn, start, end)
        conn.commit()
    return published


def _us(delta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def run_period(
    url: str, settings: Settings, start, end, *, wait_timeout_s: float = 0.0, poll_s: float = 5.0
) -> ReportSummary:
    """Every step, in order: what ``candlekeep reconcile`` does without Airflow."""
    stream = wait_step(url, settings, start, end, wait_timeout_s, poll_s)
    recompute_step(url, settings, start, end)
    reconciliation = reconcile_step(url, settings, start, end)
    summary = checks_step(url, settings, start, end, reconciliation, stream)
    publish_step(url, settings, summary)
    return summary


def reconcile_stale_step(url: str, settings: Settings, exclude=None) -> list[dict]:
    """Reconcile again the stale periods (the oldest marks first, at most
    ``CANDLEKEEP_DQ_STALE_PER_RUN``), each as a run of its own would; ``exclude``: a period
    reconciled just now. Returns each period with its new status."""
    skip = parse_period(*exclude) if exclude else None
    with db.connect(url) as conn:
        periods = stale_periods(conn, settings.dq_stale_per_run + 1)
    done = []
    for start, end in periods:
        if (start, end) == skip or len(done) == settings.dq_stale_per_run:
            continue
        summary = run_period(url, settings, start, end)
        done.append({"start": start.isoformat(), "end": end.isoformat(), "status": summary.status})
    return done


def stored_counts(url: str, settings: Settings, start, end) -> dict:
    """Reconciliation counts of any range from the tables as they are (no reclassification):
    kinds from ``candle_mismatches``, matches = keys in both candle tables and not there."""
    start, end = parse_period(start, end)
    counts_by_interval: dict[str, dict[str, int]] = {}
    with db.connect(url) as conn:
        for interval, kind, n in conn.execute(
            "SELECT interval, kind, count(*) FROM candle_mismatches"
            " WHERE window_start >= %s AND window_start < %s GROUP BY 1, 2",
            (start, end),
        ).fetchall():
            counts_by_interval.setdefault(interval, {})[kind] = n
        for interval, n in conn.execute(
            "SELECT s.interval, count(*) FROM stream_candles s JOIN batch_candles b"
            " USING (exchange, symbol, interval, window_start)"
            " WHERE s.window_start >= %s AND s.window_end <= %s AND NOT EXISTS ("
            "  SELECT 1 FROM candle_mismatches m WHERE m.exchange = s.exchange"
            "  AND m.symbol = s.symbol AND m.interval = s.interval"
            "  AND m.window_start = s.window_start) GROUP BY 1",
            (start, end),
        ).fetchall():
            counts_by_interval.setdefault(interval, {})["match"] = n
    from shared.batch.reconcile import KINDS

    by_interval = {
        i: {k: counts_by_interval[i].get(k, 0) for k in KINDS}
        for i in settings.interval_set.names
        if i in counts_by_interval
    }
    counts = {k: sum(c[k] for c in by_interval.values()) for k in KINDS}
    return {"counts": counts, "by_interval": by_interval}


def report_summary(url: str, settings: Settings, start, end) -> ReportSummary:
    """The summary of any range: the stored report if that exact period has one, otherwise
    one built from the tables as they are."""
    start, end = parse_period(start, end)
    with db.connect(url) as conn:
        db.require_schema(conn, url)
        row = conn.execute(
            "SELECT summary FROM dq_reports WHERE interval_start = %s AND interval_end = %s",
            (start, end),
        ).fetchone()
    if row:
        summary = ReportSummary.from_json(row[0])
        with db.connect(url) as conn:  # marked stale since it was stored?
            summary.stale = summary.stale or is_stale(conn, start, end)
        return summary
    stream = wait_step(url, settings, start, end, timeout_s=0)
    return checks_step(url, settings, start, end, stored_counts(url, settings, start, end), stream)


def run_period_of(params: dict | None, data_interval_start=None, data_interval_end=None):
    """The period a DAG run reconciles: ``start``/``end`` params when a manual run names
    them, else the run's data interval. Neither (a manual run with no logical date and no
    params) is an error, never a guess."""
    params = params or {}
    if params.get("start") or params.get("end"):
        return parse_period(params.get("start"), params.get("end"))
    if data_interval_start is None or data_interval_end is None:
        raise PeriodError(
            "this run has no interval: trigger it with params start and end (ISO-8601), e.g. "
            '{"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z"}, '
            "or let the schedule run it"
        )
    return parse_period(data_interval_start, data_interval_end)
