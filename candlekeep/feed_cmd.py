"""``candlekeep feed``: produce trades to Kafka."""

from __future__ import annotations

import asyncio
from collections import Counter

import click

from candlekeep.errors import UserError
from candlekeep.trade_input import exchange_option, symbol_option
from shared.core.trade_files import FORMATS
from shared.core.trade_rules import SYMBOL_RULE, normalise_symbol

#: Binance's public WebSocket endpoint (imported lazily elsewhere: websockets is in `stream`).
BINANCE_URL = "wss://stream.binance.com:9443"


@click.group("feed")
def feed_group() -> None:
    """Produce trade messages to Kafka."""


def _symbols_option(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """``--symbols A,B``: each by SPEC §2's symbol rule (the stream would refuse any other)."""
    symbols = []
    for raw in value.split(","):
        if not raw.strip():
            continue
        symbol = normalise_symbol(raw)
        if symbol is None:
            raise click.BadParameter(f"{raw[:40]!r} is not {SYMBOL_RULE}")
        symbols.append(symbol)
    if not symbols:
        raise click.BadParameter("no symbol given: e.g. --symbols BTCUSDT,ETHUSDT")
    return tuple(dict.fromkeys(symbols))


@feed_group.command()
@click.option(
    "--symbols",
    default="BTCUSDT,ETHUSDT,SOLUSDT",
    show_default=True,
    callback=_symbols_option,
    help="Comma-separated symbols of the synthetic market.",
)
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
        from shared.batch.batch_run import IntervalError, parse_instant

        try:
            start_us = parse_instant("--start", start)
        except IntervalError as exc:
            raise UserError(str(exc)) from None
    dials = MarketDials(
        symbols=symbols,
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


@feed_group.command()
@click.option(
    "--symbols",
    default="btcusdt,ethusdt",
    show_default=True,
    help="Comma-separated Binance symbols whose trades to stream.",
)
@click.option(
    "--url",
    default=None,
    help=f"WebSocket base URL; the combined stream path is added [default: {BINANCE_URL}].",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Partitions of the topic if it has to be created.",
)
@click.option(
    "--max-trades",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many trades (default: run until interrupted).",
)
@click.pass_context
def binance(ctx, symbols, url, partitions, max_trades):
    """Binance's live trades (WebSocket), reconnecting with backoff whenever it drops."""
    from candlekeep.logs import configure_logging
    from candlekeep.services import bootstrap_servers
    from stream.feeds.binance import BinanceStats, parse_symbols, run_binance_feed, stream_url
    from stream.feeds.replay import SendStats

    settings = ctx.find_root().obj()
    configure_logging(settings.log_level)
    try:
        wanted = parse_symbols(symbols)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--symbols") from None
    full_url = stream_url(url or BINANCE_URL, wanted)
    servers = bootstrap_servers(ctx)
    topic = settings.topic_trades
    stats, sent = BinanceStats(), SendStats()

    async def run():
        await run_binance_feed(
            servers,
            topic,
            full_url,
            partitions=partitions,
            max_trades=max_trades,
            binance=stats,
            sent=sent,
        )

    _run_until_signalled(run())
    click.echo(
        f"produced {sent.delivered:,} trades of {', '.join(wanted)} to {topic} on {servers}: "
        f"{stats.malformed:,} malformed and {stats.ignored:,} other frames skipped, "
        f"{stats.reconnects:,} reconnects",
        err=True,
    )


@feed_group.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option(
    "--input-format",
    type=click.Choice(FORMATS),
    default="auto",
    show_default=True,
    help="Format of the files (auto: told from each file's name and first line).",
)
@click.option(
    "--symbol",
    callback=symbol_option,
    help="Symbol of Binance CSV files (default: the file name's prefix).",
)
@click.option(
    "--exchange",
    default="binance",
    show_default=True,
    callback=exchange_option,
    help="Exchange of CSV trades (lower-cased).",
)
@click.option(
    "--speed",
    type=float,
    default=None,
    help="Send at the original pace times SPEED (default 1.0: the original pace).",
)
@click.option(
    "--as-fast-as-possible",
    is_flag=True,
    help="Send without pacing (instead of --speed).",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Partitions of the topic if it has to be created.",
)
@click.pass_context
def replay(ctx, files, input_format, symbol, exchange, speed, as_fast_as_possible, partitions):
    """Trade files (Binance CSVs, ms or µs, or canonical JSONL) replayed as trade messages."""
    from candlekeep.services import bootstrap_servers
    from candlekeep.trade_input import TradeInput
    from stream.feeds.produce import ensure_topic
    from stream.feeds.replay import SendStats, produce_live, replay_messages

    if speed is not None and as_fast_as_possible:
        raise click.UsageError("--speed and --as-fast-as-possible exclude each other")
    if speed is not None and not speed > 0:
        raise click.BadParameter("must be greater than 0", param_hint="--speed")
    pace = None if as_fast_as_possible else (speed or 1.0)
    settings = ctx.find_root().obj()
    source = TradeInput(list(files), input_format, symbol, exchange)
    source.check_symbols()
    servers = bootstrap_servers(ctx)
    topic = settings.topic_trades
    sent = SendStats()

    async def run():
        await ensure_topic(servers, topic, partitions)
        await produce_live(servers, topic, replay_messages(source.trades()), speed=pace, stats=sent)

    _run_until_signalled(run())
    click.echo(
        f"replayed {sent.delivered:,} trades from {len(files)} file(s) to {topic} on {servers} "
        f"in {sent.elapsed_s:.1f} s"
        + (f"; {source.invalid:,} invalid lines skipped" if source.invalid else ""),
        err=True,
    )


def _run_until_signalled(coro) -> None:
    """Run ``coro``; SIGTERM (``docker stop``) and SIGINT stop it after flushing what was sent."""
    import contextlib
    import signal

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
        try:
            await coro
        except asyncio.CancelledError:
            click.echo("stopped", err=True)

    asyncio.run(main())
