"""Trade file formats: canonical JSONL and Binance's public-data trades and aggTrades CSVs.

Pure line parsers: callers open the files and pass lines in. Every line is either a trade or a
rejection with its line number and reason, handed to ``on_invalid``; a bad line never stops the
reading. Binance files have no header (a header line, if any, is skipped), carry no symbol (it
comes from ``--symbol`` or the file name: ``BTCUSDT-trades-2025-01-01.csv``), and stamp trades
in milliseconds, or microseconds from 2025 (told apart per line by magnitude).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal, InvalidOperation
from functools import partial
from itertools import starmap
from pathlib import PurePath

from shared.trades import (
    DEFAULT_EXCHANGE,
    MAX_TS_US,
    Rejection,
    Trade,
    parse_trade_message,
)

FORMATS = ("auto", "jsonl", "binance-trades", "binance-aggtrades")
#: Comparing a Decimal with a Decimal is several times faster than with an int.
_ZERO = Decimal(0)
_INFINITY = Decimal("Infinity")
#: Integer timestamps at or above this are microseconds (1e14 ms would be the year 5138).
MICROSECOND_THRESHOLD = 10**14
_SYMBOL_RE = re.compile(r"[A-Z0-9_]{1,32}")

OnInvalid = Callable[[int, str, Rejection], None]
#: A trade of a file of one symbol: the fields of :class:`Trade` after exchange and symbol
#: (trade_id, ts_us, price, quantity, is_buyer_maker, raw_trades).
Row = tuple[int, int, Decimal, Decimal, bool | None, int]


class FormatError(ValueError):
    """The format of a file cannot be told or is unknown."""


def symbol_from_filename(path: str) -> str | None:
    """``BTCUSDT-trades-2025-01-01.csv`` → ``BTCUSDT`` (None if the name does not look so)."""
    name = PurePath(path).name
    if "-" not in name:
        return None
    stem = name.split("-", 1)[0].upper()
    return stem if _SYMBOL_RE.fullmatch(stem) else None


def detect_format(path: str, first_line: str) -> str:
    """Tell a file's format from its name and first line."""
    name = PurePath(path).name.lower()
    stripped = first_line.strip()
    if stripped.startswith("{") or name.endswith((".jsonl", ".ndjson", ".json", ".jsonl.gz")):
        return "jsonl"
    columns = stripped.count(",") + 1
    if columns == 8:
        return "binance-aggtrades"
    if columns in (6, 7):
        return "binance-trades"
    if "aggtrades" in name:
        return "binance-aggtrades"
    if "trades" in name:
        return "binance-trades"
    raise FormatError(
        f"cannot tell the format of {path}: use --input-format jsonl, binance-trades or "
        "binance-aggtrades"
    )


class TradeLineReader:
    """Turns the lines of one file into trades; counts lines and remembers the time unit."""

    def __init__(
        self,
        fmt: str,
        *,
        symbol: str | None = None,
        exchange: str = DEFAULT_EXCHANGE,
        on_invalid: OnInvalid | None = None,
    ):
        if fmt not in FORMATS or fmt == "auto":
            raise FormatError(f"unknown input format {fmt!r}: use one of {', '.join(FORMATS)}")
        if fmt != "jsonl" and not symbol:
            raise FormatError(f"{fmt} files carry no symbol: pass --symbol")
        self.fmt = fmt
        self.symbol = symbol.upper() if symbol else None
        self.exchange = exchange
        self.on_invalid = on_invalid or (lambda n, line, r: None)
        self.lines = 0
        self.invalid = 0
        #: True once a microsecond timestamp was read, False once a millisecond one was.
        self.microseconds: bool | None = None

    def trades(self, lines: Iterable[str]) -> Iterator[Trade]:
        if self.fmt == "jsonl":
            return self._jsonl(lines)
        return starmap(partial(Trade, self.exchange, self.symbol), self.rows(lines))

    def rows(self, lines: Iterable[str]) -> Iterator[Row]:
        """The trades of a Binance file as :data:`Row` tuples: the same trades as ``trades``
        without building objects, for folds that take them (``CandleBook.add_rows``)."""
        if self.fmt == "jsonl":
            raise FormatError("JSONL lines carry their own symbols: read them with trades()")
        return self._csv(lines, aggregated=self.fmt == "binance-aggtrades")

    def _reject(self, number: int, line: str, rejection: Rejection) -> None:
        self.invalid += 1
        self.on_invalid(number, line.rstrip("\r\n"), rejection)

    def _jsonl(self, lines: Iterable[str]) -> Iterator[Trade]:
        number = 0
        for number, line in enumerate(lines, self.lines + 1):
            if not line.strip():
                continue
            parsed = parse_trade_message(line)
            if isinstance(parsed, Rejection):
                self._reject(number, line, parsed)
            else:
                if self.microseconds is None:
                    self.microseconds = False
                yield parsed
        self.lines = max(self.lines, number)

    def _csv(self, lines: Iterable[str], aggregated: bool) -> Iterator[Row]:
        """The hot loop of reading Binance files. The line's newline stays on its last field,
        which is only read when it is ``is_buyer_maker`` (files without ``is_best_match``)."""
        # Columns: with is_best_match, without it; where is_buyer_maker and the time are.
        full, short = (8, 7) if aggregated else (7, 6)
        maker_at, ts_at = (6, 5) if aggregated else (5, 4)
        zero = _ZERO
        infinity = _INFINITY
        number = self.lines
        unit_known = self.microseconds is not None
        for number, line in enumerate(lines, self.lines + 1):
            fields = line.split(",")
            try:
                trade_id = int(fields[0])
                price = Decimal(fields[1])
                quantity = Decimal(fields[2])
                raw_trades = int(fields[4]) - int(fields[3]) + 1 if aggregated else 1
                ts = int(fields[ts_at])
                maker = fields[maker_at]
                width = len(fields)
                if width == short:
                    maker = maker.rstrip("\r\n")
                if maker == "True" or maker == "true":
                    is_buyer_maker = True
                elif maker == "False" or maker == "false":
                    is_buyer_maker = False
                else:
                    raise ValueError
                if ts < MICROSECOND_THRESHOLD:
                    ts *= 1000
                    if not unit_known:
                        self.microseconds, unit_known = False, True
                elif not unit_known:
                    self.microseconds, unit_known = True, True
                # A NaN fails the comparisons by raising InvalidOperation.
                if not (
                    width in (full, short)
                    and zero < price < infinity
                    and zero < quantity < infinity
                    and trade_id >= 0
                    and raw_trades >= 1
                    and 0 <= ts < MAX_TS_US
                ):
                    raise ValueError
            except (ValueError, IndexError, InvalidOperation):
                if number == 1 and not line[:1].isdigit():
                    continue  # a header line
                if line.strip():
                    fields = line.rstrip("\r\n").split(",")
                    self._reject(number, line, _diagnose_csv(fields, aggregated))
                continue
            yield (trade_id, ts, price, quantity, is_buyer_maker, raw_trades)
        self.lines = max(self.lines, number)


def _diagnose_csv(fields: list[str], aggregated: bool) -> Rejection:
    """The precise reason a CSV line failed the fast path (only called for bad lines)."""
    if aggregated:
        names = [
            "agg_trade_id",
            "price",
            "quantity",
            "first_trade_id",
            "last_trade_id",
            "timestamp",
            "is_buyer_maker",
            "is_best_match",
        ]
    else:
        names = [
            "trade_id",
            "price",
            "quantity",
            "quote_quantity",
            "timestamp",
            "is_buyer_maker",
            "is_best_match",
        ]
    if len(fields) not in (len(names), len(names) - 1):
        return Rejection(
            "wrong_columns", f"expected {len(names)} comma-separated columns, got {len(fields)}"
        )
    row = dict(zip(names, fields, strict=False))
    for name in ("trade_id", "agg_trade_id", "first_trade_id", "last_trade_id", "timestamp"):
        if name in row:
            try:
                if int(row[name]) < 0:
                    return Rejection("out_of_range", f"{name}: must be >= 0, got {row[name]!r}")
            except ValueError:
                return Rejection("wrong_type", f"{name}: {row[name][:40]!r} is not an integer")
    for name in ("price", "quantity"):
        try:
            value = Decimal(row[name])
        except InvalidOperation:
            return Rejection("wrong_type", f"{name}: {row[name][:40]!r} is not a decimal number")
        if not value.is_finite():
            return Rejection("not_finite", f"{name}: must be finite, got {row[name]!r}")
        if value <= 0:
            return Rejection("not_positive", f"{name}: must be greater than 0, got {row[name]!r}")
    if aggregated and int(row["last_trade_id"]) < int(row["first_trade_id"]):
        return Rejection("out_of_range", "last_trade_id is smaller than first_trade_id")
    if row["is_buyer_maker"] not in ("True", "true", "False", "false"):
        return Rejection(
            "wrong_type", f"is_buyer_maker: {row['is_buyer_maker'][:40]!r} is not True or False"
        )
    return Rejection("bad_timestamp", f"timestamp: {row['timestamp']!r} is after 2100-01-01")
