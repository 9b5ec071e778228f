"""Reading trades from files for the CLI: format detection, symbols, invalid-line reports and
progress. Shared by ``aggregate``, ``load`` and ``feed replay``."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from candlekeep.errors import UserError
from candlekeep.files import check_readable, first_line, inner_name, open_trade_file
from shared.core.trade_files import (
    FORMATS,
    FormatError,
    TradeLineReader,
    detect_format,
    symbol_from_filename,
)
from shared.core.trade_rules import EXCHANGE_RULE, SYMBOL_RULE, normalise_exchange, normalise_symbol
from shared.core.trades import Rejection, Row, Trade

#: How many invalid lines are printed one by one before only their count is kept.
MAX_LINES_SHOWN = 1000


@dataclass
class InvalidLine:
    path: str
    line_number: int
    line: str
    rejection: Rejection


@dataclass
class TradeInput:
    """Trades from several files, with counts of what was read and rejected."""

    paths: list[str]
    input_format: str = "auto"
    symbol: str | None = None
    exchange: str = "binance"
    console: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))
    keep_invalid: bool = False
    lines: int = 0
    invalid: int = 0
    invalid_reasons: Counter = field(default_factory=Counter)
    invalid_lines: list[InvalidLine] = field(default_factory=list)
    microseconds: bool | None = None
    #: Per file: lines that were trades (neither invalid, nor blank, nor a header).
    trade_lines: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for path in self.paths:
            check_readable(path)
        self._plan = [(path, self._format_of(path), self._symbol_of(path)) for path in self.paths]

    def _format_of(self, path: str) -> str:
        if self.input_format != "auto":
            return self.input_format
        try:
            return detect_format(inner_name(path), first_line(path))
        except FormatError as exc:
            raise UserError(str(exc)) from None

    def _symbol_of(self, path: str) -> str | None:
        return self.symbol or symbol_from_filename(inner_name(path))

    @property
    def plan(self) -> list[tuple[str, str, str | None]]:
        """(path, format, symbol) of every file, in order."""
        return self._plan

    def check_symbols(self) -> None:
        """Fail before reading anything if a Binance file has no symbol (``trades`` fails when
        it reaches that file)."""
        for path, fmt, symbol in self._plan:
            if fmt != "jsonl" and not symbol:
                raise _no_symbol(path)

    def report_invalid(self, path: str, number: int, line: str, rejection: Rejection) -> None:
        """Count one invalid line and show it, as ``trades`` does (for readers run elsewhere)."""
        self._reported(path)(number, line, rejection)

    def _reported(self, path: str):
        def report(number: int, line: str, rejection: Rejection) -> None:
            self.invalid += 1
            self.invalid_reasons[rejection.code] += 1
            if self.keep_invalid:
                self.invalid_lines.append(InvalidLine(path, number, line, rejection))
            if self.invalid <= MAX_LINES_SHOWN:
                self.console.print(
                    f"{path}:{number}: invalid: {rejection.reason}", markup=False, highlight=False
                )
            elif self.invalid == MAX_LINES_SHOWN + 1:
                self.console.print("(more invalid lines: only their count is shown from here)")

        return report

    def take_invalid(self) -> list[InvalidLine]:
        """The invalid lines kept since the last call (with ``keep_invalid``)."""
        taken, self.invalid_lines = self.invalid_lines, []
        return taken

    def trades(self) -> Iterator[Trade]:
        """Every trade of every file, in file order; invalid lines reported on stderr."""
        return self._read(TradeLineReader.trades)

    def rows(self) -> Iterator[Row]:
        """``trades`` as :data:`Row` tuples (what ``CandleBook.add_rows`` folds): Binance files
        are read without a Trade object per line."""
        return self._read(TradeLineReader.rows)

    def _read(self, read: Callable[[TradeLineReader, Iterable[str]], Iterator]) -> Iterator:
        total = sum(os.path.getsize(p) for p in self.paths)
        show = self.console.is_terminal and total > 2_000_000
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not show,
        )
        with progress:
            task = progress.add_task("reading trades", total=total)
            for path, fmt, symbol in self._plan:
                if fmt != "jsonl" and not symbol:
                    raise _no_symbol(path)
                try:
                    reader = TradeLineReader(
                        fmt, symbol=symbol, exchange=self.exchange, on_invalid=self._reported(path)
                    )
                except FormatError as exc:
                    raise UserError(str(exc)) from None
                with open_trade_file(path) as handle:
                    lines: Iterable[str] = handle
                    if show:
                        lines = _counting(handle, progress, task)
                    yield from read(reader, lines)
                self.lines += reader.lines
                self.trade_lines[path] += reader.lines - reader.invalid - reader.skipped
                if self.microseconds is None:
                    self.microseconds = reader.microseconds

    def require_trades(self) -> None:
        """Fail when a file held no trade at all (empty, or every line invalid): most likely
        the wrong file or the wrong ``--input-format``, never a run to call a success."""
        for path in dict.fromkeys(self.paths):
            if self.trade_lines[path] == 0:
                raise UserError(
                    f"{path}: nothing valid was read from it (no trade in it; its invalid "
                    "lines, if any, are listed above): check the file, --input-format and "
                    "--symbol"
                )


def symbol_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--symbol``: SPEC §2's symbol rule (shared with the stream's parser), checked before any
    work, as a usage error."""
    if value is None:
        return None
    symbol = normalise_symbol(value)
    if symbol is None:
        raise click.BadParameter(f"{value[:40]!r} is not {SYMBOL_RULE}")
    return symbol


def exchange_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--exchange``: SPEC §2's exchange rule (``Binance`` is ``binance``), as a usage error."""
    exchange = normalise_exchange(value)
    if exchange is None:
        raise click.BadParameter(f"{value[:40]!r} is not {EXCHANGE_RULE}")
    return exchange


def trade_source_options(command):
    """``FILE...`` and how to read them (``--input-format``, ``--symbol``, ``--exchange``):
    :class:`TradeInput`'s arguments, declared once for the commands that read trade files."""
    for declare in reversed(
        [
            click.argument("files", nargs=-1, required=True, metavar="FILE..."),
            click.option(
                "--input-format",
                type=click.Choice(FORMATS),
                default="auto",
                show_default=True,
                help="Format of the files (auto: told from each file's name and first line).",
            ),
            click.option(
                "--symbol",
                callback=symbol_option,
                help="Symbol of Binance CSV files (default: the file name's prefix).",
            ),
            click.option(
                "--exchange",
                default="binance",
                show_default=True,
                callback=exchange_option,
                help="Exchange of Binance CSV files (lower-cased).",
            ),
        ]
    ):
        command = declare(command)
    return command


def _no_symbol(path: str) -> UserError:
    return UserError(
        f"{path}: Binance files carry no symbol and the file name does not start with one: "
        "pass --symbol"
    )


def _counting(lines: Iterable[str], progress: Progress, task) -> Iterator[str]:
    pending = 0
    for line in lines:
        pending += len(line)
        if pending > 1 << 20:
            progress.advance(task, pending)
            pending = 0
        yield line
    progress.advance(task, pending)
