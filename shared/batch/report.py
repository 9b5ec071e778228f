"""The data-quality report (SPEC §6 step 5): a ``dq_reports`` row and a self-contained HTML page.

The page has no scripts and loads nothing: its charts are inline SVG, so it opens offline, in a
mail attachment, or inside the Airflow UI, and always looks the same.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import psycopg
from jinja2 import Environment, PackageLoader, select_autoescape
from psycopg.types.json import Jsonb

from shared.batch.charts import bar_chart, line_chart
from shared.batch.outputs import OutputError
from shared.batch.summary import ReportSummary
from shared.config import Settings
from shared.core.trades import datetime_to_ts
from shared.core.verification import VERDICTS
from shared.store import db
from shared.store.stale_periods import is_stale

MAX_MISMATCH_ROWS = 500
_env = Environment(
    loader=PackageLoader("shared.batch", "templates"), autoescape=select_autoescape(["html", "j2"])
)


def _mismatches(conn: psycopg.Connection, start: datetime, end: datetime) -> tuple[list, int]:
    rows = conn.execute(
        "SELECT exchange, symbol, interval, window_start, kind, late_trades, differences,"
        " count(*) OVER () FROM candle_mismatches WHERE window_start >= %s AND window_start < %s"
        " ORDER BY kind = 'late', kind, symbol, interval, window_start LIMIT %s",
        (start, end, MAX_MISMATCH_ROWS),
    ).fetchall()
    total = rows[0][7] if rows else 0
    return [
        {
            "exchange": r[0],
            "symbol": r[1],
            "interval": r[2],
            "window_start": r[3].astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "kind": r[4],
            "late_trades": r[5],
            "differences": r[6],
        }
        for r in rows
    ], total


def _verifications(conn: psycopg.Connection, start: datetime, end: datetime) -> tuple[list, int]:
    """The candles of the period the venue contradicts (``exchange_mismatch``, then ``gap``)."""
    rows = conn.execute(
        "SELECT exchange, symbol, interval, window_start, verdict, missing_trades, differences,"
        " reason, count(*) OVER () FROM candle_verifications WHERE window_start >= %s"
        " AND window_start < %s AND verdict IN ('exchange_mismatch', 'gap') ORDER BY"
        " verdict DESC,"
        " exchange, symbol, interval, window_start LIMIT %s",
        (start, end, MAX_MISMATCH_ROWS),
    ).fetchall()
    total = rows[0][8] if rows else 0
    names = (
        "exchange",
        "symbol",
        "interval",
        "window_start",
        "verdict",
        "missing_trades",
        "differences",
        "reason",
    )
    out = [dict(zip(names, r[:8], strict=True)) for r in rows]
    for row in out:
        row["window_start"] = row["window_start"].astimezone(UTC).isoformat().replace("+00:00", "Z")
    return out, total


def _unverified(conn: psycopg.Connection, start: datetime, end: datetime) -> list[dict]:
    """The period's unverified candles, counted per exchange and reason."""
    rows = conn.execute(
        "SELECT exchange, reason, count(*), count(DISTINCT symbol),"
        " string_agg(DISTINCT interval, ', ') FROM candle_verifications"
        " WHERE window_start >= %s AND window_start < %s AND verdict = 'unverified'"
        " GROUP BY 1, 2 ORDER BY 1, 2",
        (start, end),
    ).fetchall()
    names = ("exchange", "reason", "candles", "symbols", "intervals")
    return [dict(zip(names, r, strict=True)) for r in rows]


def _symbol_charts(
    conn: psycopg.Connection, start: datetime, end: datetime, base: str
) -> list[tuple[str, str]]:
    series: dict[str, dict[str, list]] = {}
    for table, name in (("batch_candles", "batch"), ("stream_candles", "stream")):
        for exchange, symbol, window_start, close in conn.execute(
            f"SELECT exchange, symbol, window_start, close FROM {table} WHERE interval = %s"
            " AND window_start >= %s AND window_end <= %s ORDER BY 1, 2, 3",
            (base, start, end),
        ).fetchall():
            key = f"{exchange}:{symbol}"
            minute = (datetime_to_ts(window_start) - datetime_to_ts(start)) / 60e6
            series.setdefault(key, {"batch": [], "stream": []})[name].append((minute, float(close)))
    shaded: dict[str, list] = {}
    for exchange, symbol, window_start, window_end in conn.execute(
        "SELECT m.exchange, m.symbol, m.window_start, m.window_start + (c.window_end -"
        " c.window_start) FROM candle_mismatches m JOIN ("
        "  SELECT exchange, symbol, interval, window_start, window_end FROM batch_candles"
        "  UNION SELECT exchange, symbol, interval, window_start, window_end FROM stream_candles"
        " ) c USING (exchange, symbol, interval, window_start)"
        " WHERE m.interval = %s AND m.window_start >= %s AND m.window_start < %s"
        " ORDER BY 1, 2, 3",  # a rerun renders the same page
        (base, start, end),
    ).fetchall():
        lo = (datetime_to_ts(window_start) - datetime_to_ts(start)) / 60e6
        hi = (datetime_to_ts(window_end) - datetime_to_ts(start)) / 60e6
        shaded.setdefault(f"{exchange}:{symbol}", []).append((lo, hi))
    labels = (start.strftime("%H:%M"), end.strftime("%H:%M"))
    return [
        (
            key,
            line_chart(
                lines, highlights=shaded.get(key, []), title=f"{key} close", x_labels=labels
            ),
        )
        for key, lines in sorted(series.items())
    ]


def render_report(conn: psycopg.Connection, summary: ReportSummary) -> str:
    """The HTML page of a summary (as ``checks_step`` builds it)."""
    start = datetime.fromisoformat(summary.period.start)
    end = datetime.fromisoformat(summary.period.end)
    mismatches, total = _mismatches(conn, start, end)
    verifications, verifications_total = _verifications(conn, start, end)
    base = summary.intervals[0]
    lateness = [(b.bucket, b.count) for b in summary.late_trades.lateness]
    reasons = list(summary.invalid_messages.reasons.items())
    return _env.get_template("report.html.j2").render(
        s=summary,
        mismatches=mismatches,
        mismatches_total=total,
        verdicts=VERDICTS,
        verifications=verifications,
        verifications_total=verifications_total,
        unverified=_unverified(conn, start, end),
        base=base,
        symbol_charts=_symbol_charts(conn, start, end, base),
        lateness_chart=bar_chart(lateness, title="lateness of late trades"),
        invalid_chart=bar_chart(reasons, title="invalid messages by reason"),
    )


def report_path(settings: Settings, summary: ReportSummary) -> Path:
    start = summary.period.start.replace(":", "").replace("+0000", "Z")
    end = summary.period.end.replace(":", "").replace("+0000", "Z")
    return Path(settings.report_dir).resolve() / f"dq_{start}_{end}.html"


def publish_report(url: str, settings: Settings, summary: ReportSummary) -> dict:
    """Write the HTML file, then upsert the ``dq_reports`` row (summary, status, HTML): a report
    directory that cannot be written leaves no row behind."""
    path = report_path(settings, summary)
    with db.connect(url) as conn:
        html = render_report(conn, summary)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(html, encoding="utf-8")
        except OSError as exc:
            raise OutputError(
                f"cannot write the report {path}: {exc.strerror}: set CANDLEKEEP_REPORT_DIR to "
                "a directory candlekeep can write"
            ) from None
        conn.execute(
            "INSERT INTO dq_reports (interval_start, interval_end, status, summary, html)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (interval_start, interval_end) DO UPDATE"
            " SET status = EXCLUDED.status, summary = EXCLUDED.summary, html = EXCLUDED.html,"
            " created_at = now()",
            (
                summary.period.start,
                summary.period.end,
                summary.status,
                Jsonb(summary.to_json()),
                html,
            ),
        )
        conn.commit()
    return {"status": summary.status, "path": str(path)}


def stored_report_html(url: str, start: datetime, end: datetime) -> str | None:
    """The HTML of the ``dq_reports`` row of exactly ``[start, end)``; ``None`` when that
    period has no report (yet). What the Airflow "Data quality" view shows; a period marked
    stale since the report was stored says so at the top (SPEC §6.2)."""
    with db.connect(url) as conn:
        row = conn.execute(
            "SELECT html FROM dq_reports WHERE interval_start = %s AND interval_end = %s",
            (start, end),
        ).fetchone()
        stale = row is not None and is_stale(conn, start, end)
    if row and stale and 'id="stale"' not in row[0]:
        return row[0].replace("<body>", "<body>\n" + STALE_BANNER, 1)
    return row[0] if row else None


#: Shown on a stored report whose period was marked stale after it was stored.
STALE_BANNER = (
    '<p id="stale" style="background:#fef3c7;padding:8px"><b>stale</b>: trades were stored for'
    " this period after this report was made; it and the period's batch candles are out of"
    " date until the period is reconciled again (the next run of the DAG does it).</p>"
)
