"""Trade file formats: canonical JSONL and Binance's public-data trades and aggTrades CSVs.

Pure line parsers: callers open the files and pass lines in. Every line is either a trade or a
rejection with its line number and reason, handed to ``on_invalid``; a bad line never stops the
reading. Binance files have no header (a first line recognised as a header is skipped: see
:func:`is_header`), carry no symbol (it
comes from ``--symbol`` or the file name: ``BTCUSDT-trades-2025-01-01.csv``), and stamp trades
in milliseconds, or microseconds from 2025 (told apart per line by magnitude).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal, InvalidOperation
from itertools import starmap
from pathlib import PurePath

from msgspec.structs import astuple

from shared.core.trade_messages import parse_trade_message
from shared.core.trade_rules import (
    COMMON_MAX_BYTES,
    COMMON_SMALLEST,
    COMMON_TOO_LARGE,
    DEFAULT_EXCHANGE,
    EXCHANGE_RULE,
    ID_LIMIT,
    MAX_RAW_TRADES,
    MAX_TS_US,
    SYMBOL_RULE,
    InvalidField,
    check_positive_decimal,
    check_raw_trades,
    check_trade_id,
    check_ts_us,
    normalise_exchange,
    normalise_symbol,
)
from shared.core.trades import MARKET, Rejection, Row, Trade

FORMATS = ("auto", "jsonl", "binance-trades", "binance-aggtrades")
#: Integer timestamps at or above this are microseconds (1e14 ms would be the year 5138).
MICROSECOND_THRESHOLD = 10**14

OnInvalid = Callable[[int, str, Rejection], None]
#: A CSV line's fields of :class:`Trade` after exchange and symbol (which the file name or
#: ``--symbol`` gives): trade_id, ts_us, price, quantity, is_buyer_maker, raw_trades.
_Fields = tuple[int, int, Decimal, Decimal, bool | None, int]


class FormatError(ValueError):
    """The format of a file cannot be told or is unknown."""


def symbol_from_filename(path: str) -> str | None:
    """``BTCUSDT-trades-2025-01-01.csv`` → ``BTCUSDT`` (None if the name does not look so)."""
    name = PurePath(path).name
    if "-" not in name:
        return None
    return normalise_symbol(name.split("-", 1)[0])


def detect_format(path: str, first_line: str) -> str:
    """Tell a file's format from its name and first line."""
    name = PurePath(path).name.lower()
    stripped = first_line.strip()
    if stripped.startswith("{") or name.endswith((".jsonl", ".ndjson", ".json", ".jsonl.gz")):
        return "jsonl"
    columns = stripped.count(",") + 1
    if columns == 8:
        return "binance-aggtrades"
    # 7 columns: trades with is_best_match, or aggTrades without it (USD-M files): the name
    # or a header's first column tells.
    if columns == 7 and ("aggtrades" in name or stripped.lower().startswith("agg")):
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
        self.symbol = None
        if symbol:
            self.symbol = normalise_symbol(symbol)
            if self.symbol is None:
                raise FormatError(f"symbol {symbol[:40]!r} is not {SYMBOL_RULE}")
        normal_exchange = normalise_exchange(exchange)
        if normal_exchange is None:
            raise FormatError(f"exchange {exchange[:40]!r} is not {EXCHANGE_RULE}")
        self.exchange = normal_exchange
        self.on_invalid = on_invalid or (lambda n, line, r: None)
        self.lines = 0
        self.invalid = 0
        #: Lines that are neither a trade nor invalid: blank ones and a recognised header.
        self.skipped = 0
        #: True once a microsecond timestamp was read, False once a millisecond one was.
        self.microseconds: bool | None = None

    def trades(self, lines: Iterable[str]) -> Iterator[Trade]:
        if self.fmt == "jsonl":
            return self._jsonl(lines)
        return starmap(Trade, self.rows(lines))

    def rows(self, lines: Iterable[str]) -> Iterator[Row]:
        """The same trades as ``trades``, as :data:`Row` tuples: what ``CandleBook.add_rows``
        folds. A Binance file's lines become rows without building an object per line."""
        if self.fmt == "jsonl":
            return map(astuple, self._jsonl(lines))
        return self._csv(lines, aggregated=self.fmt == "binance-aggtrades")

    def _reject(self, number: int, line: str, rejection: Rejection) -> None:
        self.invalid += 1
        self.on_invalid(number, line.rstrip("\r\n"), rejection)

    def _jsonl(self, lines: Iterable[str]) -> Iterator[Trade]:
        number = 0
        for number, line in enumerate(lines, self.lines + 1):
            if not line.strip():
                self.skipped += 1
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
        which is only read when it is ``is_buyer_maker`` (files without ``is_best_match``).

        Like the JSON parser, two paths: this loop only ever accepts, for lines that are short
        and whose values are inside the bounds every rule of :mod:`shared.core.trade_rules` allows;
        anything else goes to :func:`_careful_csv`, which applies those rules one by one and
        gives the exact reason, or accepts the line just the same."""
        # Columns: with is_best_match, without it; where is_buyer_maker and the time are.
        full, short = (8, 7) if aggregated else (7, 6)
        maker_at, ts_at = (6, 5) if aggregated else (5, 4)
        smallest, too_large = COMMON_SMALLEST, COMMON_TOO_LARGE
        max_chars, id_limit, max_raw = COMMON_MAX_BYTES, ID_LIMIT, MAX_RAW_TRADES
        number = self.lines
        exchange, symbol = self.exchange, self.symbol
        unit_known = self.microseconds is not None
        for number, line in enumerate(lines, self.lines + 1):
            fields = line.split(",")
            try:
                trade_id = int(fields[0])
                price = Decimal(fields[1])
                quantity = Decimal(fields[2])
                if aggregated:
                    first_id = int(fields[3])
                    last_id = int(fields[4])
                    raw_trades = last_id - first_id + 1
                    ids_ok = first_id >= 0 and last_id < id_limit and 1 <= raw_trades <= max_raw
                else:
                    raw_trades, ids_ok = 1, True
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
                micro = ts >= MICROSECOND_THRESHOLD
                if not micro:
                    ts *= 1000
                # A NaN fails the comparisons by raising InvalidOperation.
                if not (
                    width in (full, short)
                    and len(line) <= max_chars
                    and smallest <= price < too_large
                    and smallest <= quantity < too_large
                    and 0 <= trade_id < id_limit
                    and ids_ok
                    and 0 <= ts < MAX_TS_US
                ):
                    raise ValueError
            except (ValueError, IndexError, InvalidOperation):
                if not line.strip():
                    self.skipped += 1  # a blank line
                    continue
                if number == 1 and is_header(line, aggregated):
                    self.skipped += 1
                    continue
                careful = _careful_csv(line.rstrip("\r\n").split(","), aggregated)
                if isinstance(careful, Rejection):
                    self._reject(number, line, careful)
                    continue
                parsed, micro = careful
                if not unit_known:
                    self.microseconds, unit_known = micro, True
                yield (exchange, symbol, *parsed, MARKET)
                continue
            if not unit_known:
                self.microseconds, unit_known = micro, True
            yield (
                exchange,
                symbol,
                trade_id,
                ts,
                price,
                quantity,
                is_buyer_maker,
                raw_trades,
                MARKET,
            )
        self.lines = max(self.lines, number)


#: The columns of Binance's files, in order (the last, ``is_best_match``, may be absent).
TRADE_COLUMNS = (
    "trade_id",
    "price",
    "quantity",
    "quote_quantity",
    "timestamp",
    "is_buyer_maker",
    "is_best_match",
)
AGG_TRADE_COLUMNS = (
    "agg_trade_id",
    "price",
    "quantity",
    "first_trade_id",
    "last_trade_id",
    "timestamp",
    "is_buyer_maker",
    "is_best_match",
)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_ ]*")


def is_header(line: str, aggregated: bool) -> bool:
    """Whether a file's first line is a column header (Binance's newer files have one, e.g.
    ``id,price,qty,quote_qty,time,is_buyer_maker,is_best_match``): the format's number of
    columns, every one a name, the second one naming the price. Anything else on line 1 is an
    invalid line like any other, counted and reported."""
    names = AGG_TRADE_COLUMNS if aggregated else TRADE_COLUMNS
    fields = [f.strip() for f in line.rstrip("\r\n").split(",")]
    return (
        len(fields) in (len(names), len(names) - 1)
        and all(_NAME_RE.fullmatch(f) for f in fields)
        and "price" in fields[1].lower()
    )


def _careful_csv(fields: list[str], aggregated: bool) -> tuple[_Fields, bool] | Rejection:
    """One CSV line through the field rules of :mod:`shared.core.trade_rules` (the JSON path's), one
    at a time: the trade's fields after exchange and symbol and whether its time was in
    microseconds, or the exact rejection."""
    names = AGG_TRADE_COLUMNS if aggregated else TRADE_COLUMNS
    if len(fields) not in (len(names), len(names) - 1):
        return Rejection(
            "wrong_columns", f"expected {len(names)} comma-separated columns, got {len(fields)}"
        )
    row = dict(zip(names, fields, strict=False))
    try:
        trade_id = check_trade_id(_integer(names[0], row[names[0]]), names[0])
        price = check_positive_decimal("price", row["price"])
        quantity = check_positive_decimal("quantity", row["quantity"])
        raw_trades = 1
        if aggregated:
            first_id = check_trade_id(
                _integer("first_trade_id", row["first_trade_id"]), "first_trade_id"
            )
            last_id = check_trade_id(
                _integer("last_trade_id", row["last_trade_id"]), "last_trade_id"
            )
            raw_trades = check_raw_trades(first_id, last_id)
        ts = _integer("timestamp", row["timestamp"])
        micro = ts >= MICROSECOND_THRESHOLD
        ts_us = check_ts_us(ts if micro else ts * 1000, row["timestamp"].strip(), unit=_UNITS)
        maker = row["is_buyer_maker"].strip()
        if maker not in ("True", "true", "False", "false"):
            raise InvalidField("wrong_type", f"is_buyer_maker: {maker[:40]!r} is not True or False")
    except InvalidField as exc:
        return exc.rejection
    return (trade_id, ts_us, price, quantity, maker in ("True", "true"), raw_trades), micro


_UNITS = "epoch milliseconds or microseconds expected"


def _integer(name: str, text: str) -> int:
    """A CSV field that must be a whole number (int() refuses past 4300 digits: such a number
    is out of range, not malformed)."""
    try:
        return int(text)
    except ValueError:
        digits = text.strip().lstrip("+-").replace("_", "")
        if digits.isdecimal():
            raise InvalidField(
                "out_of_range", f"{name}: a number of {len(digits)} digits is out of range"
            ) from None
        raise InvalidField("wrong_type", f"{name}: {text[:40]!r} is not an integer") from None
