"""``candlekeep stream``: run the streaming worker."""

from __future__ import annotations

import asyncio
import sys

import click
import structlog


@click.command()
@click.option(
    "--exit-when-idle",
    type=float,
    metavar="SECONDS",
    help="Exit once nothing has arrived for SECONDS and every closable window is "
    "written (default: run until SIGINT/SIGTERM).",
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve Prometheus metrics on this port (default CANDLEKEEP_METRICS_PORT; 0: off).",
)
@click.pass_context
def stream(ctx, exit_when_idle, metrics_port):
    """Consume trades from Kafka into candles, effectively once into PostgreSQL."""
    from candlekeep.logs import configure_logging
    from candlekeep.services import bootstrap_servers, database_url
    from stream.worker import StreamWorker

    settings = ctx.find_root().obj()
    configure_logging(settings.log_level)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if port:
        from prometheus_client import start_http_server

        try:
            start_http_server(port)
        except OSError as exc:
            raise click.ClickException(
                f"cannot serve metrics on port {port}: {exc.strerror}: pick another with "
                "--metrics-port or CANDLEKEEP_METRICS_PORT (0 turns metrics off)"
            ) from None
    worker = StreamWorker(
        settings, database_url(ctx), bootstrap_servers(ctx), exit_when_idle_s=exit_when_idle
    )
    summary = asyncio.run(worker.run())
    structlog.get_logger("candlekeep.stream").info(
        "worker stopped",
        consumed=summary.consumed,
        stored=summary.stored,
        duplicates=summary.duplicates,
        conflicting=summary.conflicting,
        invalid=summary.invalid,
        late=summary.late,
        candles=summary.candles,
        retries=summary.retries,
        resets=summary.resets,
        skipped=summary.skipped,
        gaps=summary.gaps,
        missing=summary.missing,
        gaps_filled=summary.gaps_filled,
    )
    if sys.stderr.isatty():  # elsewhere stderr is JSON lines only: the event above says it
        click.echo(
            f"consumed {summary.consumed:,} messages: {summary.stored:,} trades stored, "
            f"{summary.duplicates:,} duplicates ({summary.conflicting:,} conflicting), "
            f"{summary.invalid:,} invalid, "
            f"{summary.late:,} late; {summary.candles:,} candles written"
            + (
                f"; {summary.gaps:,} trade-id gap(s) recorded ({summary.missing:,} trades "
                f"missing), {summary.gaps_filled:,} filled since (see trade_gaps)"
                if summary.gaps or summary.gaps_filled
                else ""
            )
            + (
                f"; {summary.resets:,} offset reset(s) skipped {summary.skipped:,} messages"
                if summary.resets
                else ""
            ),
            err=True,
        )
