"""``candlekeep demo``: the whole pipeline on one machine, with nothing installed beforehand.

Embedded PostgreSQL and an embedded Kafka-protocol broker; a synthetic market (with disorder,
late, duplicate and invalid messages) produced while the streaming worker consumes it; then the
Airflow DAG, run with ``dag.test()``, over every hour the feed covered; then the reports, the
statuses of the view ``candles`` and one correction as a consumer of the ``candles`` topic sees it.
Each demo works in a fresh database (``candlekeep_demo``) so that it always tells the same story.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from shared.core.trades import ts_to_datetime

DEMO_DATABASE = "candlekeep_demo"
AIRFLOW_DATABASE = "candlekeep_airflow"
HOUR_US = 3_600_000_000


@click.command()
@click.option(
    "--hours",
    type=int,
    default=2,
    show_default=True,
    help="Hours of market the synthetic feed covers (each is one DAG run).",
)
@click.option(
    "--rate", type=float, default=8.0, show_default=True, help="Trades per second of event time."
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Afterwards leave the worker, a live feed and Airflow's UI (localhost:8080) "
    "running, with the DAG scheduled, until Ctrl-C.",
)
@click.option(
    "--airflow-port",
    type=int,
    default=8080,
    show_default=True,
    help="Port of Airflow's UI with --keep-running.",
)
@click.pass_context
def demo(ctx, hours, rate, keep_running, airflow_port):
    """Run the whole pipeline on embedded services and print the data-quality reports."""
    console = Console(stderr=True, soft_wrap=True)
    started = time.monotonic()
    settings = ctx.find_root().obj()
    if settings.database_url or settings.kafka_bootstrap_servers:
        console.print(
            "[yellow]demo: ignoring DATABASE_URL/KAFKA_BOOTSTRAP_SERVERS: the demo "
            "runs on its own embedded services[/]"
        )
    from candlekeep.embedded import EmbeddedBroker, EmbeddedPostgres
    from candlekeep.logs import configure_logging

    # A late trade makes a trade-id gap that its arrival fills: counted in the stream's line.
    configure_logging("WARNING", quiet=("trade gap",))
    data_dir = Path(settings.data_dir).resolve()
    with console.status("starting embedded PostgreSQL and Kafka-protocol broker"):
        server = EmbeddedPostgres(str(data_dir)).start()
        broker = EmbeddedBroker(str(data_dir)).start()
    try:
        _step(
            console,
            started,
            f"PostgreSQL on {server.url.rsplit('/', 1)[0]}, broker on {broker.bootstrap_servers}",
        )
        url = _fresh_database(server, DEMO_DATABASE)
        airflow_url = _database(server, AIRFLOW_DATABASE)  # kept: migrated once
        demo_settings = settings.model_copy(
            update={
                "database_url": url,
                "kafka_bootstrap_servers": broker.bootstrap_servers,
                "report_dir": str(Path(settings.report_dir).resolve()),
                "dq_wait_timeout": timedelta(seconds=30),
            }
        )
        from shared.store import db

        db.upgrade(url)
        _step(console, started, "schema migrated (candlekeep db upgrade)")
        start_us = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
        count = int(hours * 3600 * rate * 1.04)  # a little past the last hour, so it closes
        dials = _market(start_us, count, rate)
        from candlekeep.demo_venue import demo_venue

        with demo_venue(dials, demo_settings.interval_set) as venue:
            _step(
                console,
                started,
                f"venue: the synthetic market as Binance serves it, on {venue.rest_url('binance')}"
                f" (the feed loses {dials.lost[2]} {dials.lost[0]} trades on the way)",
            )
            _stream(console, started, demo_settings, dials)
            _reconcile(
                console, started, demo_settings, airflow_url, start_us, hours,
                venue_url=venue.rest_url("binance"),
            )  # fmt: skip
        _print_reports(demo_settings)
        _print_finality(demo_settings, start_us, hours)
        console.print(f"demo finished in {time.monotonic() - started:.0f}s")
        if keep_running:
            from candlekeep.demo_live import keep_running as live

            live(console, demo_settings, airflow_url, broker, port=airflow_port)
    finally:
        from candlekeep.demo_live import CtrlC

        # Shielded: a Ctrl-C here would leave the broker or PostgreSQL running.
        with CtrlC(), console.status("stopping embedded services"):
            broker.stop()
            server.stop()


def _step(console: Console, started: float, text: str) -> None:
    console.print(f"[green]✓[/] [dim]{time.monotonic() - started:5.1f}s[/] {text}", highlight=False)


def _database(server, name: str) -> str:
    from shared.store import db

    with db.connect(server.url_for("postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return server.url_for(name)


def _fresh_database(server, name: str) -> str:
    from shared.store import db

    with db.connect(server.url_for("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.url_for(name)


def _market(start_us: int, count: int, rate: float):
    """The demo's synthetic market: disorder, late, duplicate and invalid messages, and six
    ETHUSDT trades in its first hour that the feed loses (the venue has them: the DAG repairs
    the gap)."""
    from stream.feeds.synthetic import MarketDials

    return MarketDials(
        start_us=start_us,
        count=count,
        rate=rate,
        late=0.0015,
        disorder=0.05,
        duplicates=0.01,
        invalid=0.004,
        lost=("ETHUSDT", 500, 6),
    )


def _stream(console, started, settings, dials):
    """Produce the synthetic market while the worker consumes it."""
    from stream.feeds.produce import ensure_topic, produce
    from stream.feeds.synthetic import synthetic_messages
    from stream.worker import StreamWorker

    count = dials.count
    servers = settings.kafka_bootstrap_servers

    async def run():
        await ensure_topic(servers, settings.topic_trades, 4)
        worker = StreamWorker(settings, settings.database_url, servers, exit_when_idle_s=4)
        consuming = asyncio.create_task(worker.run())
        deliveries = await produce(servers, settings.topic_trades, synthetic_messages(dials))
        return deliveries, await consuming

    with console.status(f"feeding {count:,} synthetic trades through the streaming worker"):
        deliveries, summary = asyncio.run(run())
    _step(
        console,
        started,
        f"stream: {summary.consumed:,} messages consumed of {len(deliveries):,} produced — "
        f"{summary.stored:,} trades stored, {summary.duplicates:,} duplicates, "
        f"{summary.invalid:,} invalid, {summary.late:,} late; {summary.candles:,} candles"
        + (
            f"; {summary.gaps:,} trade-id gap(s) in trade_gaps, {summary.gaps_filled:,} filled "
            "since by their late trades"
            if summary.gaps
            else ""
        ),
    )


def _reconcile(console, started, settings, airflow_url, start_us, hours, venue_url):
    """The DAG over every covered hour, with dag.test() in a process of its own."""
    from candlekeep.airflow_runner import airflow_env

    env = airflow_env(dict(os.environ), Path(settings.data_dir).resolve() / "airflow", airflow_url)
    env.update(
        DATABASE_URL=settings.database_url,
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        CANDLEKEEP_REPORT_DIR=settings.report_dir,
        CANDLEKEEP_DQ_WAIT_TIMEOUT="30",
        # The synthetic market's trades are named ``binance`` but are not Binance's: they are
        # checked against the demo's own venue (candlekeep/demo_venue.py), never the real one.
        CANDLEKEEP_VENUE_CHECKS="true",
        CANDLEKEEP_REPAIR="true",
        CANDLEKEEP_BINANCE_REST_URL=venue_url,
    )
    for hour in range(hours):
        start = ts_to_datetime(start_us + hour * HOUR_US).isoformat()
        end = ts_to_datetime(start_us + (hour + 1) * HOUR_US).isoformat()
        with console.status(f"Airflow: candle_reconciliation over {start[:16]} – {end[11:16]}"):
            proc = subprocess.run(
                [sys.executable, "-m", "candlekeep.airflow_runner", "test", start, end],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            log = Path(settings.data_dir).resolve() / "airflow" / "demo-dag.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(proc.stdout + proc.stderr)
            raise click.ClickException(f"the DAG run for {start} failed to run: see {log}")
        state = json.loads(lines[-1])["state"]
        _step(console, started, f"DAG run {start[:16]}Z: {state}")


_HEADINGS = ("hour (UTC)", "status")
_KINDS = ("match", "late", "repaired", "missing_in_stream", "missing_in_batch", "unexplained")
_VERDICTS = ("verified", "gap", "exchange_mismatch", "unverified")


def _print_reports(settings) -> None:
    """The summary of every report, and where its HTML page is (on standard output)."""
    from shared.batch.report import report_path
    from shared.batch.summary import ReportSummary
    from shared.store import db

    table = Table(title="data-quality reports: stream vs batch, and batch vs the venue")
    for column in _HEADINGS:
        table.add_column(column, no_wrap=column != "status")
    for kind in _KINDS:  # stream vs batch (SPEC §6 step 3)
        table.add_column(kind.replace("missing_in_", "missing in\n"), justify="right")
    for verdict in _VERDICTS:  # batch vs the venue (SPEC §6.1)
        table.add_column(f"venue:\n{verdict.replace('exchange_', '')}", justify="right")
    table.add_column("repaired:\ngaps/trades", justify="right")
    paths = []
    with db.connect(settings.database_url) as conn:
        stored = conn.execute(
            "SELECT interval_start, status, summary FROM dq_reports ORDER BY interval_start"
        ).fetchall()
    for period_start, status, stored_summary in stored:
        summary = ReportSummary.from_json(stored_summary)
        counts = summary.counts
        verdicts = summary.venue.counts if summary.venue else {}
        repair = summary.repair
        table.add_row(
            period_start.strftime("%Y-%m-%d %H:%M"),
            status,
            *(str(counts.get(k, 0)) for k in _KINDS),
            *(str(verdicts.get(v, 0)) if summary.venue else "—" for v in _VERDICTS),
            f"{repair.filled}/{repair.stored}" if repair else "—",
        )
        paths.append(report_path(settings, summary))
        for reason in summary.reasons:
            table.add_row("", f"  {reason}", *[""] * (len(_KINDS) + len(_VERDICTS) + 1))
    out = Console(soft_wrap=True, width=max(Console().width, 160))
    out.print(table)
    for path in paths:
        out.print(f"report: {path}", highlight=False)


def _print_finality(settings, start_us: int, hours: int) -> None:
    """The statuses of the view ``candles`` over the demo's hours, and one correction as a
    consumer of the ``candles`` topic (a new group, keeping the highest revision) received it."""
    from shared.batch.finality import STATUSES, status_counts
    from shared.store import db

    start, end = ts_to_datetime(start_us), ts_to_datetime(start_us + hours * HOUR_US)
    with db.connect(settings.database_url) as conn:
        counts = status_counts(conn, start, end)
    out = Console(soft_wrap=True, width=max(Console().width, 110))
    out.print("candles (view): " + ", ".join(f"{s} {counts[s]}" for s in STATUSES), highlight=False)
    seen = asyncio.run(_candle_messages(settings))
    for key, revisions in sorted(seen.items()):
        first, last = revisions[0], revisions[-1]
        changed = [f for f in first if f != "revision" and first[f] != last.get(f)]
        if changed:
            out.print(
                f"candles topic: {key} revision {first['revision']} (stream) → revision"
                f" {last['revision']} (batch correction): "
                + ", ".join(f"{f} {first[f]} → {last[f]}" for f in changed),
                highlight=False,
            )
            break


async def _candle_messages(settings) -> dict[str, list[dict]]:
    """Every message of the ``candles`` topic, per key, in the order a consumer gets them."""
    import uuid

    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.topic_candles,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=f"demo-reader-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: dict[str, list[dict]] = {}
    try:
        async with asyncio.timeout(30):
            while not consumer.assignment():
                await asyncio.sleep(0.05)
            parts = list(consumer.assignment())
            ends = await consumer.end_offsets(parts)
            while any([await consumer.position(tp) < ends[tp] for tp in parts]):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for r in records:
                        seen.setdefault(r.key.decode(), []).append(json.loads(r.value))
    finally:
        await consumer.stop()
    return seen
