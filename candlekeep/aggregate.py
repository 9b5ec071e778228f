"""``candlekeep aggregate``: candles from trade files with the core, no services."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import click
from rich.console import Console

from candlekeep.errors import UserError
from candlekeep.parallel_aggregate import add_trades, default_workers
from candlekeep.trade_input import TradeInput, trade_source_options
from shared.batch.outputs import check_output_file
from shared.core.aggregation import CandleBook, conflicting_copies, fill_gaps
from shared.core.candle_formats import OUTPUT_FORMATS, candle_json_line, kline_row
from shared.core.intervals import SUPPORTED, IntervalError, IntervalSet


def _interval_names(values: tuple[str, ...]) -> list[str]:
    """The names given with ``--interval`` (repeated or comma-separated). An empty value is
    refused rather than read as "the default": the user asked for something."""
    if any(not value.strip(" ,") for value in values):
        raise click.BadParameter(
            f"{next(v for v in values if not v.strip(' ,'))!r} names no interval: use one or "
            f"more of {' '.join(SUPPORTED)}, or leave the option out for the default",
            param_hint="'--interval'",
        )
    return [name for value in values for name in value.split(",") if name.strip()]


@click.command()
@trade_source_options
@click.option(
    "--interval",
    "intervals",
    multiple=True,
    metavar="NAME",
    help="Candle interval (1m 5m 15m 1h 4h 1d); repeat or comma-separate. "
    "Default: CANDLEKEEP_INTERVALS, or 1m for binance-klines.",
)
@click.option(
    "--fill-gaps",
    "fill_gaps_",
    is_flag=True,
    help="Write windows without trades the way Binance does (volume 0, previous close).",
)
@click.option(
    "--output-format", type=click.Choice(OUTPUT_FORMATS), default="jsonl", show_default=True
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default="-",
    help="Output file (default: standard output).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=default_workers,
    show_default="number of CPUs",
    help="Processes folding trades: large plain files are cut into line-aligned parts, "
    "compressed files are one part each. 1 reads everything in this process.",
)
@click.option("--chunk-bytes", type=click.IntRange(min=1), hidden=True)
@click.pass_obj
def aggregate(
    settings_loader,
    files,
    input_format,
    intervals,
    symbol,
    exchange,
    fill_gaps_,
    output_format,
    output,
    workers,
    chunk_bytes,
):
    """Candles from trade files, exactly, with no services (SPEC §8)."""
    names = _interval_names(intervals)
    if not names:
        names = (
            ["1m"] if output_format == "binance-klines" else settings_loader().intervals.split(",")
        )
    try:
        interval_set = IntervalSet.parse(names)
    except IntervalError as exc:
        raise UserError(str(exc)) from None
    if output_format == "binance-klines" and len(interval_set.intervals) != 1:
        raise UserError(
            "binance-klines output holds one interval per file: pass a single --interval "
            "(or use --output-format jsonl)"
        )
    if output != "-":
        check_output_file(output, "-o")  # before the work, not after it
    started = time.perf_counter()
    source = TradeInput(list(files), input_format, symbol, exchange)
    book = CandleBook(interval_set)
    add_trades(source, book, workers, chunk_bytes)
    source.require_trades()
    conflicting = 0
    if book.dedup.repeated:  # rare: read the input again for those ids' copies
        again = TradeInput(
            list(files), input_format, symbol, exchange, console=Console(file=io.StringIO())
        )
        conflicting = conflicting_copies(again.trades(), book.dedup.repeated)
    symbols = book.symbols()
    if output_format == "binance-klines" and len(symbols) > 1:
        raise UserError(
            f"the input holds {len(symbols)} symbols and binance-klines has no symbol column: "
            "aggregate one symbol per run, or use --output-format jsonl"
        )
    with _output(output) as out:
        written = _write(
            out, book, interval_set, output_format, fill_gaps_, bool(source.microseconds)
        )
    elapsed = time.perf_counter() - started
    source.console.print(
        f"aggregated {book.trades:,} trades ({book.dedup.duplicates:,} duplicates, "
        f"{conflicting:,} conflicting, {source.invalid:,} invalid lines) from {len(files)} "
        f"file(s) into {written:,} candles in {elapsed:.2f}s",
        highlight=False,
        soft_wrap=True,
    )


@contextmanager
def _output(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
    else:
        with open(path, "w", encoding="utf-8", newline="") as handle:
            yield handle


def _write(
    out: TextIO,
    book: CandleBook,
    intervals: IntervalSet,
    output_format: str,
    fill: bool,
    microseconds: bool,
) -> int:
    """Write every candle, symbol by symbol and interval by interval; return how many."""
    written = 0
    for symbol in book.symbols():
        for interval in intervals.intervals:
            candles = book.candles(interval, symbol)
            if fill:
                candles = fill_gaps(candles, interval)
            if output_format == "jsonl":
                out.writelines(candle_json_line(c) for c in candles)
            else:
                out.writelines(",".join(kline_row(c, microseconds)) + "\n" for c in candles)
            written += len(candles)
    return written
