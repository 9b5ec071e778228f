"""The canonical trade message (SPEC §2): one parser that turns it into a trade or a reason, and
the one builder every feed writes it with (``encode_trade``; parse(encode(t)) == t).

A message is either a :class:`~shared.core.trades.Trade` or a
:class:`~shared.core.trades.Rejection` that says what was wrong with it: bad input is never
dropped silently and never raises. Numbers are parsed straight from the JSON text into
:class:`decimal.Decimal`, so no binary floating point ever touches a price. The field rules are
:mod:`shared.core.trade_rules`'.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from shared.core.candle_formats import iso
from shared.core.intervals import US_PER_MS
from shared.core.trade_rules import (
    COMMON_MAX_BYTES,
    COMMON_SMALLEST,
    COMMON_TOO_LARGE,
    DEFAULT_EXCHANGE,
    ID_LIMIT,
    MAX_TS_US,
    MIN_TS_US,
    InvalidField,
    check_exchange,
    check_kind,
    check_positive_decimal,
    check_symbol,
    check_trade_id,
    check_ts_us,
    describe,
    json_type,
)
from shared.core.trades import MARKET, Rejection, Trade, parse_timestamp

#: Messages larger than this are rejected unread (a trade is ~200 bytes).
MAX_MESSAGE_BYTES = 64 * 1024
_JSON = msgspec.json.Decoder(float_hook=Decimal)


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
        return Rejection("not_object", f"message is a JSON {json_type(obj)}, not an object")
    try:
        symbol = check_symbol(_required(obj, "symbol"))
        trade_id = check_trade_id(_required(obj, "trade_id"))
        price = check_positive_decimal("price", _required(obj, "price"))
        quantity = check_positive_decimal("quantity", _required(obj, "quantity"))
        ts_us = _timestamp(_required(obj, "timestamp"), max_ts_us)
        exchange = check_exchange(obj.get("exchange"))
        kind = check_kind(obj.get("kind"))
        side = obj.get("is_buyer_maker")
        if side is not None and not isinstance(side, bool):
            raise InvalidField(
                "wrong_type", f"is_buyer_maker: must be true, false or absent, got {describe(side)}"
            )
    except InvalidField as exc:
        return exc.rejection
    return Trade(exchange, symbol, trade_id, ts_us, price, quantity, side, 1, kind)


class _Message(msgspec.Struct, gc=False):
    """The canonical message's fields with the types a well-formed one has (SPEC §2)."""

    symbol: str
    trade_id: int
    price: Decimal  # from a JSON string or number, exactly: msgspec never goes through float
    quantity: Decimal
    timestamp: int | str
    exchange: str = DEFAULT_EXCHANGE
    is_buyer_maker: bool | None = None
    kind: str = MARKET


_TYPED = msgspec.json.Decoder(_Message)
#: Raw symbol and exchange spellings already checked, with their canonical form.
_SYMBOLS: dict[str, str] = {}
_EXCHANGES: dict[str, str] = {DEFAULT_EXCHANGE: DEFAULT_EXCHANGE}
_NAME_CACHE_MAX = 10_000


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
    kind = m.kind
    if kind != MARKET:
        return None  # (rare: the careful path checks and lower-cases it)
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


def _required(obj: dict, name: str) -> Any:
    if name not in obj or obj[name] is None:
        raise InvalidField("missing_field", f"{name}: required field is missing")
    return obj[name]


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
            f"timestamp: must be epoch milliseconds or an ISO-8601 string, got {describe(raw)}",
        )
    return check_ts_us(ts_us, raw, max_ts_us)


# -- writing: the one builder, the inverse of the parser ----------------------------------------


class _CanonicalMessage(msgspec.Struct, omit_defaults=True, gc=False):
    """The message's fields, in the order the feeds write them (exchange first); a side that is
    not known is left out (``omit_defaults``), as SPEC §2 allows. A struct, not a dict: msgspec
    encodes it in C without building a mapping, which the synthetic market does per message."""

    exchange: str
    symbol: str
    trade_id: int
    price: str
    quantity: str
    timestamp: int | str
    is_buyer_maker: bool | None = None
    kind: str = MARKET


_encoder = msgspec.json.Encoder()


def canonical_timestamp(ts_us: int) -> int | str:
    """A trade time as the canonical message spells it: epoch ms when that is exact, else
    ISO-8601 UTC with microseconds (``2025-01-01T00:00:00.000123Z``)."""
    if ts_us % US_PER_MS == 0:
        return ts_us // US_PER_MS
    return iso(ts_us)


def encode_trade(trade: Trade, *, iso_timestamp: bool = False) -> bytes:
    """The canonical message (UTF-8 JSON) of ``trade``; it parses back to the same values.

    ``iso_timestamp`` spells the time as ISO-8601 even when it is a whole millisecond: venues
    use both spellings, and the synthetic market mixes them so that the parser meets both.
    (``raw_trades`` is not part of the message: a message stands for one trade.)
    """
    return _encoder.encode(
        _CanonicalMessage(
            trade.exchange,
            trade.symbol,
            trade.trade_id,
            format(trade.price, "f"),
            format(trade.quantity, "f"),
            iso(trade.ts_us) if iso_timestamp else canonical_timestamp(trade.ts_us),
            trade.is_buyer_maker,
            trade.kind,
        )
    )
