"""``candlekeep feed``: produce trades to Kafka."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

import click

from candlekeep.errors import UserError
from candlekeep.trade_input import trade_source_options
from shared.core.trade_rules import SYMBOL_RULE, normalise_symbol

if TYPE_CHECKING:  # (the feeds need the `stream` extra: imported when a feed runs)
    from stream.feeds.produce import Messages, SendStats

#: Binance's public WebSocket endpoints per ``--market`` (the feeds themselves are imported
#: lazily: websockets is in the `stream` extra).
BINANCE_URL = "wss://stream.binance.com:9443"
BINANCE_USDM_URL = "wss://fstream.binance.com"
KRAKEN_URL = "wss://ws.kraken.com/v2"


#: ``--partitions``: of the trades topic, when a feed has to create it.
partitions_option = click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Partitions of the topic if it has to be created.",
)


#: ``--max-trades``: of the venue feeds.
max_trades_option = click.option(
    "--max-trades",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many trades (default: run until interrupted).",
)


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
@partitions_option
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

    from stream.feeds.synthetic import MarketDials, synthetic_messages

    if start == "now":
        start_us = int(time.time() * 1_000_000)
    else:
        from shared.batch.batch_run import PeriodError, parse_instant

        try:
            start_us = parse_instant("--start", start)
        except PeriodError as exc:
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
    kinds: Counter[str] = Counter()

    def delivered(n: int, message, metadata) -> None:
        kinds[message.kind] += 1

    sent, destination = _send(
        ctx, partitions, synthetic_messages(dials), speed=speed, on_delivery=delivered
    )
    click.echo(
        f"produced {sent.delivered:,} messages to {destination}: "
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
    "--market",
    type=click.Choice(["spot", "usdm"]),
    default="spot",
    show_default=True,
    help="spot (exchange 'binance') or USD-M futures (exchange 'binance-usdm').",
)
@click.option(
    "--url",
    default=None,
    help=f"WebSocket base URL; the combined stream path is added [default: {BINANCE_URL} "
    f"for spot, {BINANCE_USDM_URL} for usdm].",
)
@partitions_option
@max_trades_option
@click.pass_context
def binance(ctx, symbols, market, url, partitions, max_trades):
    """Binance's live trades (WebSocket), reconnecting with backoff whenever it drops."""
    from candlekeep.logs import configure_logging
    from stream.feeds.binance import (
        MARKETS,
        BinanceStats,
        binance_messages,
        parse_symbols,
        stream_url,
    )

    configure_logging(ctx.find_root().obj().log_level)
    try:
        wanted = parse_symbols(symbols)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--symbols") from None
    exchange, default_url = MARKETS[market]
    stats = BinanceStats()
    messages = binance_messages(
        stream_url(url or default_url, wanted),
        exchange=exchange,
        stats=stats,
        max_trades=max_trades,
        record_reconnect=_reconnect_recorder(ctx, exchange),
    )
    sent, destination = _send(ctx, partitions, messages)
    click.echo(
        f"produced {sent.delivered:,} trades of {', '.join(wanted)} to {destination}: "
        f"{stats.malformed:,} malformed and {stats.ignored:,} other frames skipped, "
        f"{stats.reconnects:,} reconnects",
        err=True,
    )


@feed_group.command()
@click.option(
    "--symbols",
    default="BTC/USD,ETH/USD",
    show_default=True,
    help="Comma-separated Kraken pairs (BTC/USD or XBT/USD); stored as BTC-USD (docs/venues.md).",
)
@click.option("--url", default=None, help=f"WebSocket v2 URL [default: {KRAKEN_URL}].")
@partitions_option
@max_trades_option
@click.pass_context
def kraken(ctx, symbols, url, partitions, max_trades):
    """Kraken's live trades (WebSocket v2), reconnecting with backoff whenever it drops."""
    from candlekeep.logs import configure_logging
    from stream.feeds.kraken import KrakenStats, kraken_messages, parse_pairs

    configure_logging(ctx.find_root().obj().log_level)
    try:
        wanted = parse_pairs(symbols)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--symbols") from None
    stats = KrakenStats()
    messages = kraken_messages(
        url or KRAKEN_URL,
        wanted,
        stats=stats,
        max_trades=max_trades,
        record_reconnect=_reconnect_recorder(ctx, "kraken"),
    )
    sent, destination = _send(ctx, partitions, messages)
    click.echo(
        f"produced {sent.delivered:,} trades of {', '.join(wanted)} to {destination}: "
        f"{stats.malformed:,} malformed and {stats.ignored:,} other messages skipped, "
        f"{stats.reconnects:,} reconnects",
        err=True,
    )


@feed_group.command()
@trade_source_options
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
@partitions_option
@click.pass_context
def replay(ctx, files, input_format, symbol, exchange, speed, as_fast_as_possible, partitions):
    """Trade files (Binance CSVs, ms or µs, or canonical JSONL) replayed as trade messages."""
    from candlekeep.trade_input import TradeInput
    from stream.feeds.replay import replay_messages

    if speed is not None and as_fast_as_possible:
        raise click.UsageError("--speed and --as-fast-as-possible exclude each other")
    if speed is not None and not speed > 0:
        raise click.BadParameter("must be greater than 0", param_hint="--speed")
    pace = None if as_fast_as_possible else (speed or 1.0)
    source = TradeInput(list(files), input_format, symbol, exchange)
    source.check_symbols()
    sent, destination = _send(ctx, partitions, replay_messages(source.trades()), speed=pace)
    click.echo(
        f"replayed {sent.delivered:,} trades from {len(files)} file(s) to {destination} "
        f"in {sent.elapsed_s:.1f} s"
        + (f"; {source.invalid:,} invalid lines skipped" if source.invalid else ""),
        err=True,
    )


def _reconnect_recorder(ctx: click.Context, exchange: str):
    """With ``DATABASE_URL`` set, a feed records each reconnect in ``feed_reconnects`` (the
    report shows them next to the period's trade-id gaps); without it, it only logs them. A
    database that cannot take the row costs a warning, never the feed."""
    url = ctx.find_root().obj().database_url
    if not url:
        return None
    import structlog

    from shared.store import db
    from shared.store.feed_reconnects import record_reconnect
    from shared.store.redaction import redact

    log = structlog.get_logger("candlekeep.feed")

    def record(symbol, before, after, disconnected_at, reconnected_at) -> None:
        try:
            with db.connect(url, autocommit=True) as conn:
                record_reconnect(
                    conn, exchange, symbol, before, after, disconnected_at, reconnected_at
                )
        except Exception as exc:
            log.warning("reconnect not recorded in feed_reconnects", error=redact(str(exc)))

    return record


def _send(
    ctx: click.Context, partitions: int, messages: Messages, **sending
) -> tuple[SendStats, str]:
    """Create the trades topic (with ``partitions``) unless it exists, and send ``messages``
    through the one producer (``sending``: its pacing and delivery hook) until they end, or
    until SIGTERM (``docker stop``) or SIGINT stops the feed after flushing what was sent.
    Returns what was sent, and where (for the summary line)."""
    import contextlib
    import signal

    from candlekeep.services import bootstrap_servers
    from stream.feeds.produce import SendStats, ensure_topic, send_messages

    servers = bootstrap_servers(ctx)
    topic = ctx.find_root().obj().topic_trades
    stats = SendStats()

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
        try:
            await ensure_topic(servers, topic, partitions)
            await send_messages(servers, topic, messages, stats=stats, **sending)
        except asyncio.CancelledError:
            click.echo("stopped", err=True)

    asyncio.run(main())
    return stats, f"{topic} on {servers}"
