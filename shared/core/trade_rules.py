"""The rules a trade's fields obey (SPEC §2), shared by every way a trade comes in.

The JSON message parser (:mod:`shared.core.trade_messages`), the file reader
(:mod:`shared.core.trade_files`) and the command-line options all call these, so that a value is
accepted or refused the same way whichever way it came in. A rule returns the canonical value or
raises :class:`InvalidField` with the reason a person reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from shared.core.trades import MARKET, Rejection, ts_to_datetime

DEFAULT_EXCHANGE = "binance"

#: Trades must fall in [epoch, 2100-01-01). Later values are almost always a unit mistake.
MIN_TS_US = 0
MAX_TS_US = 4_102_444_800 * 1_000_000

_SYMBOL_RE = re.compile(r"[A-Z0-9._-]{1,32}")
_EXCHANGE_RE = re.compile(r"[a-z0-9._-]{1,32}")
_KIND_RE = re.compile(r"[a-z0-9_]{1,32}")
#: The rules in words, for messages (SPEC §2).
SYMBOL_RULE = "1-32 characters of A-Z 0-9 . _ - (upper-cased)"
EXCHANGE_RULE = "1-32 characters of a-z 0-9 . _ - (lower-cased)"
KIND_RULE = "1-32 characters of a-z 0-9 _ (lower-cased), e.g. market, insurance_fund, adl"
#: Trade ids are stored as ``bigint``: 0 <= id < 2^63.
ID_LIMIT = 2**63
#: An aggTrade's ``raw_trades`` is stored as ``integer``.
MAX_RAW_TRADES = 2**31 - 1

#: The fast paths' bounds (the JSON parser's and the CSV reader's): a message or line of
#: at most COMMON_MAX_BYTES whose price and quantity x have COMMON_SMALLEST <= x <
#: COMMON_TOO_LARGE passes :func:`check_positive_decimal`'s range: x < 10^1001 means at most
#: 1000 digits before the point, and x >= 10^-480 written in at most 480 characters means an
#: exponent above -1000 (adjusted() - digits + 1), checked without as_tuple(). Anything else
#: takes the careful path (a trade is ~200 bytes).
COMMON_MAX_BYTES = 480
COMMON_SMALLEST = Decimal(f"1E-{COMMON_MAX_BYTES}")
COMMON_TOO_LARGE = Decimal("1E+1001")


class InvalidField(ValueError):
    """A field breaks its rule (SPEC §2); ``rejection`` says which field and why.

    Raised by the field rules below, which every entry point shares (see the module docstring).
    """

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.rejection = Rejection(code, reason)


def normalise_symbol(raw: str) -> str | None:
    """SPEC §2's symbol: stripped and upper-cased, ``None`` unless it is 1-32 of ``A-Z 0-9 . _ -``.

    The one place the rule lives: the stream's parser, ``load``, ``aggregate``, ``--symbol``,
    the feeds' ``--symbols`` and symbols taken from file names all come through here, so no
    entry point stores a symbol another would refuse (or spells one symbol two ways).
    """
    stripped = raw.strip()
    if not stripped.isascii():  # ("ß".upper() is "SS": only ASCII is upper-cased)
        return None
    symbol = stripped.upper()
    return symbol if _SYMBOL_RE.fullmatch(symbol) else None


def normalise_exchange(raw: str) -> str | None:
    """SPEC §2's exchange: stripped and lower-cased (``Binance`` and ``binance`` are one venue),
    ``None`` unless it is 1-32 of ``a-z 0-9 . _ -``. Shared like :func:`normalise_symbol`."""
    stripped = raw.strip()
    if not stripped.isascii():  # ("K".lower() is "k": only ASCII is lower-cased)
        return None
    exchange = stripped.lower()
    return exchange if _EXCHANGE_RE.fullmatch(exchange) else None


def check_symbol(raw: Any) -> str:
    return _named("symbol", raw, normalise_symbol, SYMBOL_RULE)


def check_exchange(raw: Any) -> str:
    if raw is None:
        return DEFAULT_EXCHANGE
    return _named("exchange", raw, normalise_exchange, EXCHANGE_RULE)


def normalise_kind(raw: str) -> str | None:
    """SPEC §2's trade kind: stripped and lower-cased (Binance's ``INSURANCE_FUND`` is
    ``insurance_fund``), ``None`` unless it is 1-32 of ``a-z 0-9 _``."""
    stripped = raw.strip()
    if not stripped.isascii():
        return None
    kind = stripped.lower()
    return kind if _KIND_RE.fullmatch(kind) else None


def check_kind(raw: Any) -> str:
    if raw is None:
        return MARKET
    return _named("kind", raw, normalise_kind, KIND_RULE)


def _named(field: str, raw: Any, normalise: Callable[[str], str | None], rule: str) -> str:
    """A symbol or exchange name: a string that ``normalise`` accepts (code ``bad_<field>``)."""
    if not isinstance(raw, str):
        raise InvalidField("wrong_type", f"{field}: must be a string, got {describe(raw)}")
    name = normalise(raw)
    if name is None:
        raise InvalidField(f"bad_{field}", f"{field}: {raw[:40]!r} is not {rule}")
    return name


def check_trade_id(raw: Any, name: str = "trade_id") -> int:
    """A trade id (or a CSV file's other ids, by ``name``): an integer that ``bigint`` holds."""
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidField("wrong_type", f"{name}: must be an integer, got {describe(raw)}")
    if raw < 0 or raw >= ID_LIMIT:
        raise InvalidField(
            "out_of_range", f"{name}: must be between 0 and 2^63-1, got {brief(raw)}"
        )
    return raw


def check_raw_trades(first_id: int, last_id: int) -> int:
    """How many exchange trades an aggTrade stands for (``last_id - first_id + 1``): at least
    one, and few enough for the ``integer`` column that stores it."""
    if last_id < first_id:
        raise InvalidField("out_of_range", "last_trade_id is smaller than first_trade_id")
    raw_trades = last_id - first_id + 1
    if raw_trades > MAX_RAW_TRADES:
        raise InvalidField(
            "out_of_range",
            f"last_trade_id - first_trade_id + 1 is {raw_trades}, more than the "
            f"{MAX_RAW_TRADES} trades one record can stand for",
        )
    return raw_trades


def check_positive_decimal(name: str, raw: Any) -> Decimal:
    if isinstance(raw, bool):
        raise InvalidField(
            "wrong_type", f"{name}: must be a decimal string or number, got {describe(raw)}"
        )
    if isinstance(raw, int | Decimal):
        value = Decimal(raw)
    elif isinstance(raw, str):
        try:
            value = Decimal(raw.strip())
        except InvalidOperation:
            raise InvalidField(
                "wrong_type", f"{name}: {raw[:40]!r} is not a decimal number"
            ) from None
    else:
        raise InvalidField(
            "wrong_type", f"{name}: must be a decimal string or number, got {describe(raw)}"
        )
    if not value.is_finite():
        raise InvalidField("not_finite", f"{name}: must be finite, got {brief(raw)}")
    if value <= 0:
        raise InvalidField("not_positive", f"{name}: must be greater than 0, got {brief(raw)}")
    # NUMERIC holds 131072 digits before the point and 16383 after; stay far inside that.
    if value.adjusted() > 1000 or value.as_tuple().exponent < -1000:  # type: ignore[operator]
        raise InvalidField(
            "out_of_range",
            f"{name}: {brief(raw)} is out of range (at most 1000 digits before the point "
            "and 1000 after)",
        )
    return value


def check_ts_us(
    ts_us: int,
    raw: Any,
    max_ts_us: int | None = None,
    unit: str = "epoch milliseconds expected, not microseconds or nanoseconds",
) -> int:
    """A trade time in microseconds within [epoch, 2100) (and not after ``max_ts_us``);
    ``raw`` is the value as written, for the message, ``unit`` what the source expects."""
    if ts_us < MIN_TS_US:
        raise InvalidField("bad_timestamp", f"timestamp: {brief(raw)} is before the Unix epoch")
    if ts_us >= MAX_TS_US:
        raise InvalidField("bad_timestamp", f"timestamp: {brief(raw)} is after 2100-01-01 ({unit})")
    if max_ts_us is not None and ts_us > max_ts_us:
        raise InvalidField(
            "bad_timestamp",
            f"timestamp: {ts_to_datetime(ts_us).isoformat()} is in the future "
            f"(later than {ts_to_datetime(max_ts_us).isoformat()})",
        )
    return ts_us


def brief(value: Any) -> str:
    """At most 40 characters of a value, for a message (a huge int cannot even be turned into
    text: Python refuses past 4300 digits, so its size is said instead)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {len(hex(abs(value))) - 2} hex digits"
    return f"{value!s:.40}"


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | Decimal | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def describe(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return f"{json_type(value)} {text[:40]}"
