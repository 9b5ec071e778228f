"""The steps of one batch run over ``[start, end)`` (SPEC §6), each a plain function.

The Airflow tasks and ``candlekeep reconcile`` call these same functions, in this order; each
takes the database URL and the run's *period* ``[start, end)`` (``interval`` is kept for candle
lengths, ``1m``) and returns JSON-able data, so that Airflow can pass it between tasks. Every
step is idempotent: rerunning a period replaces its results.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import msgspec

from shared.batch.finality import (
    lateness_advice,
    prepare_corrections,
    recount,
    status_counts,
)
from shared.batch.periods import (  # noqa: F401 (the shells' names for them)
    TIME_EXAMPLES,
    PeriodError,
    parse_instant,
    parse_period,
    run_period_of,
)
from shared.batch.quality import (
    Thresholds,
    gaps,
    invalid_stats,
    late_stats,
    offset_resets,
    ohlc_violations,
    rollup_violations,
    stored_trades_by_symbol,
    verdict,
)
from shared.batch.recompute import recompute_batch_candles
from shared.batch.reconcile import classify
from shared.batch.summary import ByTable, Period, Repair, ReportSummary, StreamProgress, VenueCheck
from shared.batch.verify import period_facts, stored_verification
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


def poke_step(url: str, settings: Settings, start, end, waited_s: float) -> dict | None:
    """Step 1 as a sensor's look: the stream's position once its watermark has passed ``end``,
    or once ``waited_s`` (since the first look) reaches CANDLEKEEP_DQ_WAIT_TIMEOUT (then the
    report says the stream lagged); ``None``: look again later."""
    position = wait_step(url, settings, start, end, 0)
    if position["passed"]:
        return position
    if waited_s >= settings.dq_wait_timeout.total_seconds():
        logging.getLogger(__name__).warning(
            "the stream's watermark (%s) has not passed %s after %.0f s: going on, the report"
            " says the stream lagged",
            position["watermark"],
            end,
            waited_s,
        )
        return position
    return None


def certified_periods(summary: ReportSummary, stale: list[dict]) -> list[dict]:
    """The periods a run certified (its own and the stale ones it reconciled again), those whose
    report did not fail: the extra of the DAG's ``candlekeep_certified_periods`` asset event."""
    own = {"start": summary.period.start, "end": summary.period.end, "status": summary.status}
    return [p for p in (own, *stale) if p["status"] != "fail"]


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


def verify_step(url: str, settings: Settings, start, end) -> dict:
    """Step 3b (SPEC §6.1): the period's trade-id gaps from the stored trades, then the venue's
    candles and a verdict per batch candle."""
    from shared.batch.expected import silent_symbols
    from shared.batch.period_gaps import find_gaps
    from shared.batch.verify import verify_period

    start, end = parse_period(start, end)
    with db.connect(url) as conn:
        found = find_gaps(conn, start, end, settings.consecutive_exchanges)
        conn.commit()
        silent = [(s["exchange"], s["symbol"]) for s in silent_symbols(conn, settings, start, end)]
        conn.commit()  # no transaction open while the venues are asked
        result = verify_period(conn, settings, start, end, silent)
        conn.commit()
    return {**result, "gaps_found": found["found"], "gaps_new": found["new"]}


def repair_step(
    url: str, settings: Settings, start, end, reconciliation: dict, verification: dict
) -> dict:
    """Step 3c (SPEC §6.1): fetch the open gaps' trades from the venue and store them; if any
    was stored, the period is recomputed, reconciled and verified again. Returns ``repair``
    (``None`` when ``CANDLEKEEP_REPAIR`` is off) and the ``reconciliation`` and
    ``verification`` that hold now."""
    from shared.batch.repair import repair_gaps

    out = {"repair": None, "reconciliation": reconciliation, "verification": verification}
    if not settings.repair:
        return out
    start, end = parse_period(start, end)
    with db.connect(url) as conn:
        out["repair"] = repair_gaps(conn, settings, start, end)
    if out["repair"]["stored"]:
        recompute_step(url, settings, start, end)
        out["reconciliation"] = reconcile_step(url, settings, start, end)
        out["verification"] = verify_step(url, settings, start, end)
    return out


def checks_step(
    url: str,
    settings: Settings,
    start,
    end,
    reconciliation: dict,
    stream: dict,
    verification: dict | None = None,
    repair: dict | None = None,
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
        stored = stored_trades_by_symbol(conn, start, end)
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
            late_trades=late_stats(conn, start, end, stored),
            invalid_messages=invalid_stats(conn),
            stream=msgspec.convert(stream, StreamProgress),
            offset_resets=offset_resets(
                conn, settings.consumer_group, settings.topic_trades, start, end
            ),
            venue=msgspec.convert(verification, VenueCheck) if verification else None,
            repair=msgspec.convert(repair, Repair) if repair else None,
            **period_facts(conn, settings, start, end, stored),
            lateness_advice=lateness_advice(
                conn,
                start,
                end,
                stored,
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
    url: str,
    settings: Settings,
    start,
    end,
    *,
    wait_timeout_s: float = 0.0,
    poll_s: float = 5.0,
    repair: dict | None = None,
) -> ReportSummary:
    """Every step but the repair, in order: what ``candlekeep reconcile`` does without Airflow
    (``repair``: what a repair just before did, for the report)."""
    stream = wait_step(url, settings, start, end, wait_timeout_s, poll_s)
    recompute_step(url, settings, start, end)
    reconciliation = reconcile_step(url, settings, start, end)
    verification = verify_step(url, settings, start, end)
    summary = checks_step(url, settings, start, end, reconciliation, stream, verification, repair)
    publish_step(url, settings, summary)
    return summary


def repair_period(url: str, settings: Settings, start, end) -> ReportSummary:
    """``candlekeep repair``: the period's open gaps fetched from the venue and stored, then
    the period reconciled again (recompute, reconcile, verify, report). The period's gaps are
    found first, so a period never reconciled is repaired too. Without open gaps, the venue is
    not asked for trades and nothing is stored (the period is still reported afresh)."""
    from shared.batch.period_gaps import find_gaps
    from shared.batch.repair import repair_gaps

    start, end = parse_period(start, end)
    with db.connect(url) as conn:
        db.require_schema(conn, url)
        find_gaps(conn, start, end, settings.consecutive_exchanges)  # not reconciled yet, say
        conn.commit()
        repaired = repair_gaps(conn, settings, start, end)
    return run_period(url, settings, start, end, repair=repaired)


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
    return checks_step(
        url,
        settings,
        start,
        end,
        stored_counts(url, settings, start, end),
        stream,
        stored_verification(url, start, end),
    )
