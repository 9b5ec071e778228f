"""``candlekeep reconcile``, ``repair`` and ``report``: the DAG's steps without Airflow."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from shared.batch.summary import ReportSummary


def _echo_summary(summary: ReportSummary, path: str | None) -> None:
    click.echo(
        f"{summary.period.start} – {summary.period.end}: status {summary.status.upper()}; "
        + ", ".join(f"{kind} {n}" for kind, n in summary.counts.items())
    )
    for line in three_way_lines(summary):
        click.echo(line)
    if summary.repair is not None:
        r = summary.repair
        click.echo(
            f"repair: {r.gaps} open gap(s) asked for, {r.filled} filled, {r.fetched} trade(s)"
            f" fetched, {r.stored} stored, {len(r.left_open)} left open"
        )
        for left in r.left_open:
            click.echo(
                f"  - {left.exchange}:{left.symbol} ids {left.first_missing_id}–"
                f"{left.last_missing_id} still missing: {left.reason}"
            )
    for reason in summary.reasons:
        click.echo(f"  - {reason}")
    if summary.statuses:
        click.echo(
            "candles: " + ", ".join(f"{status} {n}" for status, n in summary.statuses.items())
        )
    if summary.stale:
        click.echo("STALE: trades were stored for this period after it was reconciled")
    for a in summary.lateness_advice:
        advice = (
            f"max_delay {a.max_delay_s:g}s or allowed_lateness {a.allowed_lateness_s:g}s would"
            " have kept it under the late-trade rate"
            if a.extra_s
            else "under the late-trade rate"
        )
        click.echo(
            f"late {a.exchange}:{a.symbol}: {a.late} of {a.trades} ({a.rate:.2%}), lateness"
            f" p50 {a.p50_s:g}s p90 {a.p90_s:g}s p99 {a.p99_s:g}s max {a.max_s:g}s; {advice}"
        )
    if path:
        click.echo(f"report: {path}")


def three_way_lines(summary: ReportSummary) -> list[str]:
    """Per interval, the three-way view: stream against batch (match, late, …) and batch
    against the venue (verified, gap, …); ``-`` where the venue was not asked."""
    from shared.batch.reconcile import KINDS
    from shared.core.verification import VERDICTS

    venue = summary.venue.by_interval if summary.venue else {}
    rows = [["interval", *KINDS, "|", *VERDICTS]]
    for interval in summary.intervals:
        stream, checked = summary.by_interval.get(interval, {}), venue.get(interval)
        rows.append(
            [interval, *(str(stream.get(k, 0)) for k in KINDS), "|"]
            + [str(checked.get(v, 0)) if checked else "-" for v in VERDICTS]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    split = len(KINDS) + 1
    left = sum(widths[:split]) + 2 * (split - 1)
    title = "  " + "stream vs batch".ljust(left) + "  |  batch vs venue"
    table = ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return [title, *table]


@click.command()
@click.option("--start", required=True, help="Period start, ISO-8601 (e.g. 2026-01-01T00:00Z).")
@click.option("--end", required=True, help="Period end (exclusive), ISO-8601.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds to wait for the stream's watermark to pass END.",
)
@click.pass_context
def reconcile(ctx, start, end, wait_s):
    """Recompute, reconcile, check and report [START, END) (SPEC §6 steps 1-5)."""
    from candlekeep.errors import UserError
    from candlekeep.services import database_url
    from shared.batch.batch_run import PeriodError, run_period
    from shared.batch.outputs import check_output_dir

    settings = ctx.find_root().obj()
    check_output_dir(settings.report_dir, "CANDLEKEEP_REPORT_DIR")  # before any work
    url = database_url(ctx)
    try:
        summary = run_period(
            url, settings, start, end, wait_timeout_s=wait_s, poll_s=min(5.0, max(wait_s / 10, 0.2))
        )
    except PeriodError as exc:
        raise UserError(str(exc)) from None
    from shared.batch.report import report_path

    _echo_summary(summary, str(report_path(settings, summary)))
    _send_corrections(url, settings)
    if summary.status == "fail":
        ctx.exit(3)


def _send_corrections(url: str, settings) -> None:
    """The corrections on the ``candles`` topic (SPEC §6.2), where the stream's brokers are
    configured; otherwise they stay pending for the DAG or a later run (never an embedded
    broker: nobody would read them there)."""
    from stream.corrections import CorrectionsNotSent, pending_count, publish_corrections

    if not settings.kafka_bootstrap_servers:
        pending = pending_count(url)
        if pending:
            click.echo(
                f"corrections: {pending} pending (KAFKA_BOOTSTRAP_SERVERS is not set; a run with"
                " it set sends them)"
            )
        return
    try:
        sent = publish_corrections(url, settings)
    except CorrectionsNotSent as exc:
        click.echo(f"corrections: {exc}", err=True)
        return
    click.echo(f"corrections: {sent} sent on {settings.topic_candles!r}")


@click.command()
@click.option("--start", required=True, help="Period start, ISO-8601 (e.g. 2026-01-01T00:00Z).")
@click.option("--end", required=True, help="Period end (exclusive), ISO-8601.")
@click.pass_context
def repair(ctx, start, end):
    """Fetch the trades of [START, END)'s open trade-id gaps from the venue, store them, and
    reconcile the period again (SPEC §6.1)."""
    from candlekeep.errors import UserError
    from candlekeep.services import database_url
    from shared.batch.batch_run import PeriodError, repair_period
    from shared.batch.outputs import check_output_dir
    from shared.batch.report import report_path

    settings = ctx.find_root().obj()
    check_output_dir(settings.report_dir, "CANDLEKEEP_REPORT_DIR")  # before any work
    url = database_url(ctx)
    try:
        summary = repair_period(url, settings, start, end)
    except PeriodError as exc:
        raise UserError(str(exc)) from None
    _echo_summary(summary, str(report_path(settings, summary)))
    if summary.status == "fail":
        ctx.exit(3)


@click.command()
@click.option("--start", required=True, help="Range start, ISO-8601.")
@click.option("--end", required=True, help="Range end (exclusive), ISO-8601.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="HTML file to write.",
)
@click.pass_context
def report(ctx, start, end, output):
    """Render the data-quality report of [START, END) to an HTML file."""
    from candlekeep.errors import UserError
    from candlekeep.services import database_url
    from shared.batch.batch_run import PeriodError, report_summary
    from shared.batch.outputs import check_output_file
    from shared.batch.report import render_report
    from shared.store import db

    settings = ctx.find_root().obj()
    check_output_file(output, "-o")  # before any work
    url = database_url(ctx)
    try:
        summary = report_summary(url, settings, start, end)
    except PeriodError as exc:
        raise UserError(str(exc)) from None
    with db.connect(url) as conn:
        html = render_report(conn, summary)
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(html)
    _echo_summary(summary, output)
