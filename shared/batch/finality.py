"""Finality (SPEC §6.2), the batch side: corrections for the ``candles`` topic, stale periods
and the statuses of the view ``candles``.

Corrections go through an outbox, ``candle_corrections``: :func:`prepare_corrections` runs in the
reconcile step's transaction and records, for each batch candle of the period that differs from
the stream's (or that corrects an earlier correction), the revision it goes out with: one above
both the stream's revision of the key and the last correction's. A rerun that computes the same
candles changes no row, so nothing is sent twice for one change. The shell that sends them
(``stream.corrections``, called by the DAG's task and ``candlekeep reconcile``) reads
:func:`pending_corrections`, waits for the broker's acknowledgement and then
:func:`mark_published`: a send that fails leaves them pending for the next run (at least once).
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from shared.batch.recompute import owned_windows
from shared.batch.summary import SymbolLateness
from shared.core.candles import CANDLE_FIELDS, Candle
from shared.core.intervals import IntervalSet
from shared.core.lateness import advise
from shared.core.trades import datetime_to_ts, ts_to_datetime
from shared.store.stale_periods import mark_stale_period

KEY = ("exchange", "symbol", "interval", "window_start")
STATUSES = ("provisional", "certified", "corrected", "verified", "disputed")


def _owned(start: datetime, end: datetime, intervals: IntervalSet, alias: str) -> tuple[str, list]:
    """SQL selecting the rows of ``alias`` (a candle table) that the period owns."""
    clauses, params = [], []
    for r in owned_windows(start, end, intervals):
        clauses.append(
            f"({alias}.interval = %s AND {alias}.window_start >= %s AND {alias}.window_end <= %s)"
        )
        params += [r.interval.name, r.first_start, r.last_end]
    return "(" + " OR ".join(clauses) + ")", params


_ON = " AND ".join(f"{{a}}.{k} = {{b}}.{k}" for k in KEY)
_SAME = " AND ".join(f"b.{f} IS NOT DISTINCT FROM s.{f}" for f in CANDLE_FIELDS)
_DIGEST = "md5(concat_ws('|', " + ", ".join(f"b.{f}::text" for f in CANDLE_FIELDS) + "))"

_PREPARE = f"""
WITH candidates AS (
    SELECT b.exchange, b.symbol, b.interval, b.window_start, {_DIGEST} AS digest,
           s.revision AS stream_revision, (s.exchange IS NULL OR NOT ({_SAME})) AS differs
    FROM batch_candles b
    LEFT JOIN stream_candles s ON {_ON.format(a="s", b="b")}
    WHERE {{owned}}
)
INSERT INTO candle_corrections AS o (exchange, symbol, interval, window_start, revision, digest)
SELECT c.exchange, c.symbol, c.interval, c.window_start,
       greatest(coalesce(c.stream_revision, -1), coalesce(p.revision, -1)) + 1, c.digest
FROM candidates c
LEFT JOIN candle_corrections p ON {_ON.format(a="p", b="c")}
WHERE (c.differs OR p.exchange IS NOT NULL)
  AND (p.exchange IS NULL OR p.digest <> c.digest OR c.stream_revision >= p.revision)
ON CONFLICT (exchange, symbol, interval, window_start) DO UPDATE
SET revision = EXCLUDED.revision, digest = EXCLUDED.digest, corrected_at = now(),
    published_at = NULL
"""


def prepare_corrections(
    conn: psycopg.Connection, start: datetime, end: datetime, intervals: IntervalSet
) -> int:
    """Record the period's new corrections in the outbox (the caller's transaction); return how
    many keys got one. A batch candle is a correction when the stream's candle of its key differs
    or is missing, or when an earlier correction of the key sent another candle; it gets a new
    revision when its candle changed since the last one, or the stream has sent a revision as
    high since."""
    owned, params = _owned(start, end, intervals, "b")
    return conn.execute(_PREPARE.format(owned=owned), params).rowcount


def pending_corrections(conn: psycopg.Connection, limit: int = 10_000) -> list[Candle]:
    """Corrections not yet acknowledged by the broker, any period, oldest first: the batch
    candles as they are now, with their correction's revision."""
    rows = conn.execute(
        "SELECT b.exchange, b.symbol, b.interval, b.window_start, b.window_end, "
        + ", ".join(f"b.{f}" for f in CANDLE_FIELDS)
        + ", o.revision FROM candle_corrections o JOIN batch_candles b ON "
        + _ON.format(a="b", b="o")
        + " WHERE o.published_at IS NULL ORDER BY o.corrected_at, 1, 2, 3, 4 LIMIT %s",
        (limit,),
    ).fetchall()
    candles = []
    for row in rows:
        start_us, end_us = datetime_to_ts(row[3]), datetime_to_ts(row[4])
        fields = dict(zip(CANDLE_FIELDS, row[5:-1], strict=True))
        candles.append(
            Candle(
                row[0],
                row[1],
                row[2],
                start_us,
                end_us,
                **fields,
                open_ts_us=start_us,
                close_ts_us=end_us,
                revision=row[-1],
            )
        )
    return candles


def mark_published(conn: psycopg.Connection, candles: list[Candle]) -> None:
    """Record that the broker acknowledged these corrections (at their revision: a correction
    renewed meanwhile stays pending)."""
    if not candles:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE candle_corrections SET published_at = now() WHERE exchange = %s"
            " AND symbol = %s AND interval = %s AND window_start = %s AND revision = %s",
            [
                (c.exchange, c.symbol, c.interval, ts_to_datetime(c.window_start_us), c.revision)
                for c in candles
            ],
        )


def recount(
    conn: psycopg.Connection, start: datetime, end: datetime, intervals: IntervalSet
) -> bool:
    """After a run: do the period's stored market trades still add up to its base candles? A
    trade whose writer committed just after the run's recomputation read ``trades`` (see
    ``shared.store.stale_periods``) does not: the period is marked stale. True if it was."""
    base = intervals.base
    first = base.window_start(datetime_to_ts(start))
    last_end = base.window_start(datetime_to_ts(end))
    lo, hi = ts_to_datetime(first), ts_to_datetime(last_end)
    stored, folded = conn.execute(
        "SELECT (SELECT coalesce(sum(raw_trades), 0) FROM trades WHERE ts >= %s AND ts < %s"
        "        AND kind = 'market'),"
        "       (SELECT coalesce(sum(trade_count), 0) FROM batch_candles WHERE interval = %s"
        "        AND window_start >= %s AND window_end <= %s)",
        (lo, hi, base.name, lo, hi),
    ).fetchone()
    if stored == folded:
        return False
    mark_stale_period(conn, start, end, abs(stored - folded))
    return True


def status_counts(conn: psycopg.Connection, start: datetime, end: datetime) -> dict[str, int]:
    """How many candles of ``[start, end)`` the view ``candles`` serves with each status."""
    counts = dict.fromkeys(STATUSES, 0)
    for status, n in conn.execute(
        "SELECT status, count(*) FROM candles WHERE window_start >= %s AND window_end <= %s"
        " GROUP BY 1",
        (start, end),
    ).fetchall():
        counts[status] = n
    return counts


def lateness_advice(
    conn: psycopg.Connection,
    start: datetime,
    end: datetime,
    stored: dict[tuple[str, str], int],
    *,
    max_rate: float,
    max_delay_us: int,
    allowed_lateness_us: int,
) -> list[SymbolLateness]:
    """Per symbol with late trades in ``[start, end)``: how late they were, and the
    ``max_delay``/``allowed_lateness`` that would have kept them under ``max_rate`` of its
    ``stored`` trades (``shared.batch.quality.stored_trades_by_symbol``)."""
    rows = conn.execute(
        "SELECT exchange, symbol, array_agg((extract(epoch FROM lateness) * 1000000)::int8)"
        " FROM late_trades WHERE ts >= %s AND ts < %s GROUP BY 1, 2 ORDER BY 1, 2",
        (start, end),
    ).fetchall()
    out = []
    for exchange, symbol, lateness_us in rows:
        trades = stored.get((exchange, symbol), 0)
        a = advise(lateness_us, trades, max_rate, max_delay_us, allowed_lateness_us)
        out.append(
            SymbolLateness(
                exchange=exchange,
                symbol=symbol,
                trades=a.trades,
                late=a.late,
                rate=a.late / a.trades if a.trades else 0.0,
                p50_s=a.p50_us / 1e6,
                p90_s=a.p90_us / 1e6,
                p99_s=a.p99_us / 1e6,
                max_s=a.max_us / 1e6,
                extra_s=a.extra_us / 1e6,
                max_delay_s=a.max_delay_us / 1e6,
                allowed_lateness_s=a.allowed_lateness_us / 1e6,
            )
        )
    return out
