"""Trades: the canonical trade, and the one parser that turns a message into a trade or a reason.

A message is either a :class:`Trade` or a :class:`Rejection` that says what was wrong with it:
bad input is never dropped silently and never raises. Numbers are parsed straight from the JSON
text into :class:`decimal.Decimal`, so no binary floating point ever touches a price.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from shared.core.intervals import US_PER_MS

#: Messages larger than this are rejected unread (a trade is ~200 bytes).
MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_EXCHANGE = "binance"

#: Trades must fall in [epoch, 2100-01-01). Later values are almost always a unit mistake.
MIN_TS_US = 0
MAX_TS_US = 4_102_444_800 * 1_000_000

_SYMBOL_RE = re.compile(r"[A-Z0-9._-]{1,32}")
_EXCHANGE_RE = re.compile(r"[a-z0-9._-]{1,32}")
#: The rules in words, for messages (SPEC §2).
SYMBOL_RULE = "1-32 characters of A-Z 0-9 . _ - (upper-cased)"
EXCHANGE_RULE = "1-32 characters of a-z 0-9 . _ - (lower-cased)"
#: Trade ids are stored as ``bigint``: 0 <= id < 2^63.
ID_LIMIT = 2**63
#: An aggTrade's ``raw_trades`` is stored as ``integer``.
MAX_RAW_TRADES = 2**31 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_JSON = msgspec.json.Decoder(float_hook=Decimal)


class Trade(msgspec.Struct, gc=False):
    """One trade at a venue, exact.

    ``ts_us`` is the venue's trade time in microseconds since the Unix epoch (UTC).
    ``raw_trades`` is how many exchange trades this record stands for: 1 for a plain trade,
    ``last_id - first_id + 1`` for a Binance aggTrade, so candle trade counts match Binance's.

    A ``msgspec.Struct`` (fields, equality and repr like a dataclass): made in C, and left out of
    the garbage collector's tracking (it holds no containers, so it can be in no cycle), which
    matters for the stream worker that makes one per message.
    """

    exchange: str
    symbol: str
    trade_id: int
    ts_us: int
    price: Decimal
    quantity: Decimal
    is_buyer_maker: bool | None = None
    raw_trades: int = 1

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity: two messages with the same key are the same trade."""
        return (self.exchange, self.symbol, self.trade_id)

    @property
    def order_key(self) -> tuple[int, int]:
        """Order within a window: by timestamp, then trade id."""
        return (self.ts_us, self.trade_id)


#: A trade as a plain tuple: the fields of :class:`Trade`, in order (``Trade(*row)`` makes the
#: trade, ``msgspec.structs.astuple(trade)`` the row). Files are read and folded as rows: no
#: object per line.
Row = tuple[str, str, int, int, Decimal, Decimal, bool | None, int]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message is not a trade.

    ``code`` is a stable word for grouping (``not_json``, ``missing_field`` …); ``reason`` is the
    sentence a person reads.
    """

    code: str
    reason: str

    def __str__(self) -> str:
        return self.reason


class InvalidField(ValueError):
    """A field breaks its rule (SPEC §2); ``rejection`` says which field and why.

    Raised by the field rules below, which every entry point shares: the JSON message parser,
    the CSV file reader (:mod:`shared.core.trade_files`) and the command-line options, so that a
    value is accepted or refused the same way whichever way it came in.
    """

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.rejection = Rejection(code, reason)


def parse_trade_message(
    value: bytes | str | None, *, max_ts_us: int | None = None
) -> Trade | Rejection:
    """Parse one canonical trade message (UTF-8 JSON object, SPEC §2).

    ``max_ts_us`` optionally rejects trades stamped after that instant (the stream passes
    "now + allowed clock skew": a far-future trade would otherwise drag the watermark along).
    """
    if value.__class__ is bytes:
        fast = parse_common_trade(value, max_ts_us)  # type: ignore[arg-type]
        if fast is not None:
            return fast
    return _parse_careful(value, max_ts_us)


def _parse_careful(value: bytes | str | None, max_ts_us: int | None) -> Trade | Rejection:
    """Every rule, one at a time, down to the exact rejection (the reference behaviour)."""
    if value is None:
        return Rejection("empty", "message has no value (null)")
    if len(value) > MAX_MESSAGE_BYTES:
        return Rejection(
            "too_large", f"message is {len(value)} bytes, more than the {MAX_MESSAGE_BYTES} allowed"
        )
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejection("not_utf8", f"message is not UTF-8 (byte {exc.start})")
    if not value.strip():
        return Rejection("empty", "message is empty")
    try:
        obj = _JSON.decode(value)
    except msgspec.DecodeError as exc:
        if str(exc).startswith("Integer value out of range"):
            # Valid JSON, but an integer literal beyond 64 bits: no id or time is that large.
            return Rejection(
                "out_of_range",
                "message holds an integer of more than 64 bits: out of range for any field "
                "(write very large prices and quantities as decimal strings)",
            )
        return Rejection("not_json", f"message is not valid JSON: {exc}")
    except RecursionError:
        return Rejection("not_json", "message is not valid JSON: nested too deeply")
    return parse_trade_object(obj, max_ts_us=max_ts_us)


def parse_trade_object(obj: Any, *, max_ts_us: int | None = None) -> Trade | Rejection:
    """Validate an already decoded JSON value (numbers must be ``int`` or ``Decimal``)."""
    if not isinstance(obj, dict):
        return Rejection("not_object", f"message is a JSON {_json_type(obj)}, not an object")
    try:
        symbol = check_symbol(_required(obj, "symbol"))
        trade_id = check_trade_id(_required(obj, "trade_id"))
        price = check_positive_decimal("price", _required(obj, "price"))
        quantity = check_positive_decimal("quantity", _required(obj, "quantity"))
        ts_us = _timestamp(_required(obj, "timestamp"), max_ts_us)
        exchange = check_exchange(obj.get("exchange"))
        side = obj.get("is_buyer_maker")
        if side is not None and not isinstance(side, bool):
            raise InvalidField(
                "wrong_type", f"is_buyer_maker: must be true, false or absent, got {_show(side)}"
            )
    except InvalidField as exc:
        return exc.rejection
    return Trade(exchange, symbol, trade_id, ts_us, price, quantity, side)


class _Message(msgspec.Struct, gc=False):
    """The canonical message's fields with the types a well-formed one has (SPEC §2)."""

    symbol: str
    trade_id: int
    price: Decimal  # from a JSON string or number, exactly: msgspec never goes through float
    quantity: Decimal
    timestamp: int | str
    exchange: str = DEFAULT_EXCHANGE
    is_buyer_maker: bool | None = None


_TYPED = msgspec.json.Decoder(_Message)
#: Raw symbol and exchange spellings already checked, with their canonical form.
_SYMBOLS: dict[str, str] = {}
_EXCHANGES: dict[str, str] = {DEFAULT_EXCHANGE: DEFAULT_EXCHANGE}
_NAME_CACHE_MAX = 10_000
#: The fast paths' bounds (this module's JSON one and the CSV reader's): a message or line of
#: at most COMMON_MAX_BYTES whose price and quantity x have COMMON_SMALLEST <= x <
#: COMMON_TOO_LARGE passes :func:`check_positive_decimal`'s range: x < 10^1001 means at most
#: 1000 digits before the point, and x >= 10^-480 written in at most 480 characters means an
#: exponent above -1000 (adjusted() - digits + 1), checked without as_tuple(). Anything else
#: takes the careful path (a trade is ~200 bytes).
COMMON_MAX_BYTES = 480
COMMON_SMALLEST = Decimal(f"1E-{COMMON_MAX_BYTES}")
COMMON_TOO_LARGE = Decimal("1E+1001")


def parse_common_trade(value: bytes, max_ts_us: int | None = None) -> Trade | None:
    """The common case, fast: an ASCII message that decodes straight into the typed fields and
    passes every rule. Returns ``None`` for anything else: :func:`parse_trade_message` then
    takes the careful path, which accepts the same messages with the same values and gives the
    exact rejection for the others. This path only ever accepts, so it cannot reject
    differently; ``tests/test_trade_parsing.py`` checks that both paths agree.
    """
    if len(value) > COMMON_MAX_BYTES or not value.isascii():
        return None  # (the careful path checks UTF-8, even in fields it does not read)
    try:
        m = _TYPED.decode(value)
        price = m.price
        quantity = m.quantity
        # Finite, > 0 and within COMMON_SMALLEST..COMMON_TOO_LARGE: what check_positive_decimal
        # accepts. A NaN raises InvalidOperation here.
        if not (
            COMMON_SMALLEST <= price < COMMON_TOO_LARGE
            and COMMON_SMALLEST <= quantity < COMMON_TOO_LARGE
        ):
            return None
    except (msgspec.DecodeError, RecursionError, InvalidOperation):
        return None
    symbol = _SYMBOLS.get(m.symbol)
    if symbol is None:
        symbol = _checked_name(m.symbol, _SYMBOLS, check_symbol)
        if symbol is None:
            return None
    exchange = _EXCHANGES.get(m.exchange)
    if exchange is None:
        exchange = _checked_name(m.exchange, _EXCHANGES, check_exchange)
        if exchange is None:
            return None
    trade_id = m.trade_id
    if trade_id < 0 or trade_id >= ID_LIMIT:
        return None
    ts = m.timestamp
    if ts.__class__ is int:
        ts_us = ts * US_PER_MS  # type: ignore[operator]
    else:
        try:
            ts_us = parse_timestamp(ts)  # type: ignore[arg-type]
        except ValueError:
            return None
    if ts_us < MIN_TS_US or ts_us >= MAX_TS_US or (max_ts_us is not None and ts_us > max_ts_us):
        return None
    return Trade(exchange, symbol, trade_id, ts_us, price, quantity, m.is_buyer_maker)


def _checked_name(raw: str, cache: dict[str, str], rule) -> str | None:
    """``rule(raw)`` (the careful check) remembered when it passes; ``None`` when it fails."""
    try:
        name = rule(raw)
    except InvalidField:
        return None
    if len(cache) < _NAME_CACHE_MAX:
        cache[raw] = name
    return name


def check_key(key: bytes | None, trade: Trade) -> Rejection | None:
    """The message key must be the trade's symbol: it decides the partition, hence the order."""
    if key is None:
        return Rejection("bad_key", "message key is null: the key must be the trade's symbol")
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return Rejection("bad_key", "message key is not UTF-8: the key must be the trade's symbol")
    if text.upper() != trade.symbol:
        return Rejection(
            "bad_key", f"message key {text[:40]!r} is not the trade's symbol {trade.symbol!r}"
        )
    return None


def ts_from_ms(ms: int) -> int:
    return ms * US_PER_MS


def ts_to_datetime(ts_us: int) -> datetime:
    """The UTC datetime of a microsecond timestamp (exact: no float on the way)."""
    return datetime.fromtimestamp(ts_us // 1_000_000, UTC).replace(microsecond=ts_us % 1_000_000)


def datetime_to_ts(dt: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, exactly (integer timedelta division)."""
    return (dt - _EPOCH) // _ONE_US


def parse_timestamp(text: str) -> int:
    """An ISO-8601 instant with an offset (``Z`` allowed) in epoch microseconds, or ValueError."""
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset: add one, e.g. 'Z' or '+00:00'")
    return datetime_to_ts(dt)


# -- field rules ------------------------------------------------------------------------------


def _required(obj: dict, name: str) -> Any:
    if name not in obj or obj[name] is None:
        raise InvalidField("missing_field", f"{name}: required field is missing")
    return obj[name]


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
    if not isinstance(raw, str):
        raise InvalidField("wrong_type", f"symbol: must be a string, got {_show(raw)}")
    symbol = normalise_symbol(raw)
    if symbol is None:
        raise InvalidField("bad_symbol", f"symbol: {raw[:40]!r} is not {SYMBOL_RULE}")
    return symbol


def check_exchange(raw: Any) -> str:
    if raw is None:
        return DEFAULT_EXCHANGE
    if not isinstance(raw, str):
        raise InvalidField("wrong_type", f"exchange: must be a string, got {_show(raw)}")
    exchange = normalise_exchange(raw)
    if exchange is None:
        raise InvalidField("bad_exchange", f"exchange: {raw[:40]!r} is not {EXCHANGE_RULE}")
    return exchange


def check_trade_id(raw: Any, name: str = "trade_id") -> int:
    """A trade id (or a CSV file's other ids, by ``name``): an integer that ``bigint`` holds."""
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidField("wrong_type", f"{name}: must be an integer, got {_show(raw)}")
    if raw < 0 or raw >= ID_LIMIT:
        raise InvalidField(
            "out_of_range", f"{name}: must be between 0 and 2^63-1, got {_brief(raw)}"
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
            "wrong_type", f"{name}: must be a decimal string or number, got {_show(raw)}"
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
            "wrong_type", f"{name}: must be a decimal string or number, got {_show(raw)}"
        )
    if not value.is_finite():
        raise InvalidField("not_finite", f"{name}: must be finite, got {_brief(raw)}")
    if value <= 0:
        raise InvalidField("not_positive", f"{name}: must be greater than 0, got {_brief(raw)}")
    # NUMERIC holds 131072 digits before the point and 16383 after; stay far inside that.
    if value.adjusted() > 1000 or value.as_tuple().exponent < -1000:  # type: ignore[operator]
        raise InvalidField(
            "out_of_range",
            f"{name}: {_brief(raw)} is out of range (at most 1000 digits before the point "
            "and 1000 after)",
        )
    return value


def _timestamp(raw: Any, max_ts_us: int | None) -> int:
    if isinstance(raw, bool):
        raise InvalidField(
            "wrong_type", f"timestamp: must be epoch milliseconds or ISO-8601, got {raw}"
        )
    if isinstance(raw, int):
        ts_us = raw * US_PER_MS
    elif isinstance(raw, str):
        try:
            ts_us = parse_timestamp(raw)
        except ValueError as exc:
            detail = str(exc) if "offset" in str(exc) else f"{raw[:40]!r} is not ISO-8601"
            raise InvalidField("bad_timestamp", f"timestamp: {detail}") from None
    else:
        raise InvalidField(
            "wrong_type",
            f"timestamp: must be epoch milliseconds or an ISO-8601 string, got {_show(raw)}",
        )
    return check_ts_us(ts_us, raw, max_ts_us)


def check_ts_us(
    ts_us: int,
    raw: Any,
    max_ts_us: int | None = None,
    unit: str = "epoch milliseconds expected, not microseconds or nanoseconds",
) -> int:
    """A trade time in microseconds within [epoch, 2100) (and not after ``max_ts_us``);
    ``raw`` is the value as written, for the message, ``unit`` what the source expects."""
    if ts_us < MIN_TS_US:
        raise InvalidField("bad_timestamp", f"timestamp: {_brief(raw)} is before the Unix epoch")
    if ts_us >= MAX_TS_US:
        raise InvalidField(
            "bad_timestamp", f"timestamp: {_brief(raw)} is after 2100-01-01 ({unit})"
        )
    if max_ts_us is not None and ts_us > max_ts_us:
        raise InvalidField(
            "bad_timestamp",
            f"timestamp: {ts_to_datetime(ts_us).isoformat()} is in the future "
            f"(later than {ts_to_datetime(max_ts_us).isoformat()})",
        )
    return ts_us


def _brief(value: Any) -> str:
    """At most 40 characters of a value, for a message (a huge int cannot even be turned into
    text: Python refuses past 4300 digits, so its size is said instead)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {len(hex(abs(value))) - 2} hex digits"
    return f"{value!s:.40}"


def _json_type(value: Any) -> str:
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


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return f"{_json_type(value)} {text[:40]}"
