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

from shared.intervals import US_PER_MS

#: Messages larger than this are rejected unread (a trade is ~200 bytes).
MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_EXCHANGE = "binance"

#: Trades must fall in [epoch, 2100-01-01). Later values are almost always a unit mistake.
MIN_TS_US = 0
MAX_TS_US = 4_102_444_800 * 1_000_000

_SYMBOL_RE = re.compile(r"[A-Z0-9._-]{1,32}")
_EXCHANGE_RE = re.compile(r"[a-z0-9._-]{1,32}")
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


class _Invalid(Exception):
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
        return Rejection("not_json", f"message is not valid JSON: {exc}")
    except RecursionError:
        return Rejection("not_json", "message is not valid JSON: nested too deeply")
    return parse_trade_object(obj, max_ts_us=max_ts_us)


def parse_trade_object(obj: Any, *, max_ts_us: int | None = None) -> Trade | Rejection:
    """Validate an already decoded JSON value (numbers must be ``int`` or ``Decimal``)."""
    if not isinstance(obj, dict):
        return Rejection("not_object", f"message is a JSON {_json_type(obj)}, not an object")
    try:
        symbol = _symbol(_required(obj, "symbol"))
        trade_id = _trade_id(_required(obj, "trade_id"))
        price = _positive_decimal("price", _required(obj, "price"))
        quantity = _positive_decimal("quantity", _required(obj, "quantity"))
        ts_us = _timestamp(_required(obj, "timestamp"), max_ts_us)
        exchange = _exchange(obj.get("exchange"))
        side = obj.get("is_buyer_maker")
        if side is not None and not isinstance(side, bool):
            raise _Invalid(
                "wrong_type", f"is_buyer_maker: must be true, false or absent, got {_show(side)}"
            )
    except _Invalid as exc:
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
#: Longer messages take the careful path (a trade is ~200 bytes); see ``parse_common_trade``.
_COMMON_MAX_BYTES = 480
_SMALLEST = Decimal(f"1E-{_COMMON_MAX_BYTES}")
_TOO_LARGE = Decimal("1E+1001")
_ID_LIMIT = 2**63


def parse_common_trade(value: bytes, max_ts_us: int | None = None) -> Trade | None:
    """The common case, fast: an ASCII message that decodes straight into the typed fields and
    passes every rule. Returns ``None`` for anything else: :func:`parse_trade_message` then
    takes the careful path, which accepts the same messages with the same values and gives the
    exact rejection for the others. This path only ever accepts, so it cannot reject
    differently; ``tests/test_trade_parsing.py`` checks that both paths agree.
    """
    if len(value) > _COMMON_MAX_BYTES or not value.isascii():
        return None  # (the careful path checks UTF-8, even in fields it does not read)
    try:
        m = _TYPED.decode(value)
        price = m.price
        quantity = m.quantity
        # Finite, > 0 and 10^-480 <= x < 10^1001, i.e. -480 <= adjusted() <= 1000; a message
        # of at most _COMMON_MAX_BYTES holds fewer digits than that, so the exponent is above
        # -1000 (adjusted() - digits + 1): what _positive_decimal accepts, without as_tuple().
        # A NaN raises InvalidOperation here.
        if not (_SMALLEST <= price < _TOO_LARGE and _SMALLEST <= quantity < _TOO_LARGE):
            return None
    except (msgspec.DecodeError, RecursionError, InvalidOperation):
        return None
    symbol = _SYMBOLS.get(m.symbol)
    if symbol is None:
        symbol = _checked_name(m.symbol, _SYMBOLS, _symbol)
        if symbol is None:
            return None
    exchange = _EXCHANGES.get(m.exchange)
    if exchange is None:
        exchange = _checked_name(m.exchange, _EXCHANGES, _exchange)
        if exchange is None:
            return None
    trade_id = m.trade_id
    if trade_id < 0 or trade_id >= _ID_LIMIT:
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
    except _Invalid:
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
        raise _Invalid("missing_field", f"{name}: required field is missing")
    return obj[name]


def _symbol(raw: Any) -> str:
    if not isinstance(raw, str):
        raise _Invalid("wrong_type", f"symbol: must be a string, got {_show(raw)}")
    symbol = raw.strip().upper()
    if not _SYMBOL_RE.fullmatch(symbol):
        raise _Invalid(
            "bad_symbol", f"symbol: {raw[:40]!r} is not 1-32 characters of A-Z 0-9 . _ -"
        )
    return symbol


def _exchange(raw: Any) -> str:
    if raw is None:
        return DEFAULT_EXCHANGE
    if not isinstance(raw, str):
        raise _Invalid("wrong_type", f"exchange: must be a string, got {_show(raw)}")
    exchange = raw.strip().lower()
    if not _EXCHANGE_RE.fullmatch(exchange):
        raise _Invalid(
            "bad_exchange", f"exchange: {raw[:40]!r} is not 1-32 characters of a-z 0-9 . _ -"
        )
    return exchange


def _trade_id(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _Invalid("wrong_type", f"trade_id: must be an integer, got {_show(raw)}")
    if raw < 0 or raw >= 2**63:
        raise _Invalid("out_of_range", f"trade_id: must be between 0 and 2^63-1, got {raw}")
    return raw


def _positive_decimal(name: str, raw: Any) -> Decimal:
    if isinstance(raw, bool):
        raise _Invalid(
            "wrong_type", f"{name}: must be a decimal string or number, got {_show(raw)}"
        )
    if isinstance(raw, int | Decimal):
        value = Decimal(raw)
    elif isinstance(raw, str):
        try:
            value = Decimal(raw.strip())
        except InvalidOperation:
            raise _Invalid("wrong_type", f"{name}: {raw[:40]!r} is not a decimal number") from None
    else:
        raise _Invalid(
            "wrong_type", f"{name}: must be a decimal string or number, got {_show(raw)}"
        )
    if not value.is_finite():
        raise _Invalid("not_finite", f"{name}: must be finite, got {raw!s:.40}")
    if value <= 0:
        raise _Invalid("not_positive", f"{name}: must be greater than 0, got {raw!s:.40}")
    # NUMERIC holds 131072 digits before the point and 16383 after; stay far inside that.
    if value.adjusted() > 1000 or value.as_tuple().exponent < -1000:  # type: ignore[operator]
        raise _Invalid("out_of_range", f"{name}: {raw!s:.40} is out of range")
    return value


def _timestamp(raw: Any, max_ts_us: int | None) -> int:
    if isinstance(raw, bool):
        raise _Invalid(
            "wrong_type", f"timestamp: must be epoch milliseconds or ISO-8601, got {raw}"
        )
    if isinstance(raw, int):
        ts_us = raw * US_PER_MS
    elif isinstance(raw, str):
        try:
            ts_us = parse_timestamp(raw)
        except ValueError as exc:
            detail = str(exc) if "offset" in str(exc) else f"{raw[:40]!r} is not ISO-8601"
            raise _Invalid("bad_timestamp", f"timestamp: {detail}") from None
    else:
        raise _Invalid(
            "wrong_type",
            f"timestamp: must be epoch milliseconds or an ISO-8601 string, got {_show(raw)}",
        )
    if ts_us < MIN_TS_US:
        raise _Invalid("bad_timestamp", f"timestamp: {raw!s:.40} is before the Unix epoch")
    if ts_us >= MAX_TS_US:
        raise _Invalid(
            "bad_timestamp",
            f"timestamp: {raw!s:.40} is after 2100-01-01 (epoch milliseconds expected, "
            "not microseconds or nanoseconds)",
        )
    if max_ts_us is not None and ts_us > max_ts_us:
        raise _Invalid(
            "bad_timestamp",
            f"timestamp: {ts_to_datetime(ts_us).isoformat()} is in the future "
            f"(later than {ts_to_datetime(max_ts_us).isoformat()})",
        )
    return ts_us


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
