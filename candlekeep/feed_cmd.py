"""``candlekeep feed``: produce trades to Kafka."""

from __future__ import annotations

import asyncio
from collections import Counter

import click

from shared.trades import parse_timestamp


@click.group("feed")
def feed_group() -> None:
    """Produce trade messages to Kafka."""


@feed_group.command()
@click.option("--symbols", default="BTCUSDT,ETHUSDT,SOLUSDT", show_default=True)
@click.option("--count", type=int, default=10_000, show_default=True, help="Trades to make.")
@click.option(
    "--rate",
    type=float,
    default=20.0,
    show_default=True,
    help="Trades per second of event time, all symbols together.",
)
@click.option(
    "--start",
    default="2026-01-01T00:00:00Z",
    show_default=True,
    help="Event time of the first trade (ISO-8601), or 'now'.",
)
@click.option(
    "--disorder",
    type=float,
    default=0.05,
    show_default=True,
    help="Share of trades sent up to 2 s after their timestamp (still on time).",
)
@click.option(
    "--late",
    type=float,
    default=0.002,
    show_default=True,
    help="Share of trades held back 3-6 minutes (late: after their window closed).",
)
@click.option(
    "--duplicates",
    type=float,
    default=0.01,
    show_default=True,
    help="Share of messages sent twice.",
)
@click.option(
    "--invalid",
    type=float,
    default=0.005,
    show_default=True,
    help="Share of malformed messages mixed in.",
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--partitions",
    type=int,
    default=4,
    show_default=True,
    help="Partitions of the topic if it has to be created.",
)
@click.option(
    "--speed",
    type=float,
    default=None,
    help="Send at the event-time pace times SPEED (default: as fast as possible).",
)
@click.pass_context
def synthetic(
    ctx, symbols, count, rate, start, disorder, late, duplicates, invalid, seed, partitions, speed
):
    """A seeded synthetic market, with disorder, late, duplicate and invalid messages."""
    import time

    from candlekeep.services import bootstrap_servers
    from stream.feeds.produce import ensure_topic, produce
    from stream.feeds.synthetic import MarketDials, synthetic_messages

    settings = ctx.find_root().obj()
    if start == "now":
        start_us = int(time.time() * 1_000_000)
    else:
        try:
            start_us = parse_timestamp(start)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--start") from None
    dials = MarketDials(
        symbols=tuple(s.strip().upper() for s in symbols.split(",") if s.strip()),
        start_us=start_us,
        count=count,
        rate=rate,
        disorder=disorder,
        late=late,
        duplicates=duplicates,
        invalid=invalid,
        seed=seed,
    )
    servers = bootstrap_servers(ctx)
    topic = settings.topic_trades

    async def run():
        await ensure_topic(servers, topic, partitions)
        return await produce(servers, topic, synthetic_messages(dials), speed=speed)

    deliveries = asyncio.run(run())
    kinds = Counter(d.message.kind for d in deliveries)
    click.echo(
        f"produced {len(deliveries):,} messages to {topic} on {servers}: "
        + ", ".join(f"{n:,} {kind}" for kind, n in sorted(kinds.items())),
        err=True,
    )
