"""Trades: the canonical :class:`Trade` (SPEC §2), its identity and its time.

What a trade *is*, apart from how one is read: :mod:`shared.core.trade_rules` holds the rules a
trade's fields obey, :mod:`shared.core.trade_messages` parses the Kafka message and
:mod:`shared.core.trade_files` the files. Times are integer microseconds since the Unix epoch
(UTC), converted to and from datetimes exactly, with no float on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


class Trade(msgspec.Struct, gc=False):
    """One trade at a venue, exact.

    ``ts_us`` is the venue's trade time in microseconds since the Unix epoch (UTC).
    ``raw_trades`` is how many exchange trades this record stands for: 1 for a plain trade,
    ``last_id - first_id + 1`` for a Binance aggTrade, so candle trade counts match Binance's.
    ``kind`` is :data:`MARKET` for an order-book trade; a venue's other trades (Binance USD-M's
    ``insurance_fund``, ``adl``) are stored and reported but never folded into candles, as the
    venue's own klines leave them out (SPEC §2). They share the venue's trade-id sequence, so
    they count for identity and id continuity all the same.

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
    kind: str = "market"

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
Row = tuple[str, str, int, int, Decimal, Decimal, bool | None, int, str]

#: The kind of an order-book trade, the only kind folded into candles.
MARKET = "market"


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
