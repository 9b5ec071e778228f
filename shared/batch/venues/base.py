"""What every venue gives: its candles and its trades by id, in candlekeep's own terms.

The types here are the contract between a venue module and what is built on it (verification
against the venue, repair): :class:`VenueCandle` is one closed candle as the venue publishes it,
exact; :class:`FetchedTrades` the trades of an id range the venue still serves, and for the ids
it does not, why. Times are epoch microseconds (UTC), as everywhere in candlekeep; numbers are
:class:`~decimal.Decimal`, never float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from shared.core.intervals import interval as interval_named
from shared.core.trades import Trade

from .http import (
    PeriodNotServed,
    VenueError,
    VenueRejected,
    VenueResponseError,
    VenueUnavailable,
)

__all__ = [
    "FetchedTrades",
    "PeriodNotServed",
    "Venue",
    "VenueCandle",
    "VenueError",
    "VenueRejected",
    "VenueResponseError",
    "VenueUnavailable",
    "interval_us",
]


@dataclass(frozen=True)
class VenueCandle:
    """One closed candle as the venue publishes it.

    ``open`` … ``trade_count`` are always given. ``quote_volume``, ``taker_buy_volume`` and
    ``taker_buy_quote_volume`` are ``None`` where the venue does not publish them (Kraken).
    ``vwap`` is Kraken's: the volume-weighted price *truncated* (not rounded) to the pair's price
    decimals, the number of decimals its text carries (``Decimal("106039.6")``); compare with
    :func:`shared.batch.venues.kraken.vwap_agrees`. A candle with ``trade_count == 0`` is a
    window the venue filled without trades (Kraken: open = high = low = close = the previous
    close, volume 0): candlekeep has no candle there.
    """

    exchange: str
    symbol: str
    interval: str
    window_start_us: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    trade_count: int
    quote_volume: Decimal | None = None
    taker_buy_volume: Decimal | None = None
    taker_buy_quote_volume: Decimal | None = None
    vwap: Decimal | None = None

    @property
    def window_end_us(self) -> int:
        return self.window_start_us + interval_us(self.interval)


@dataclass(frozen=True)
class FetchedTrades:
    """The trades of ``[first_id, last_id]`` the venue served, in id order, and the ids it did
    not serve (``missing_ids``, ascending) with the reason (``None`` when none is missing)."""

    trades: list[Trade]
    missing_ids: list[int] = field(default_factory=list)
    reason: str | None = None


class Venue(Protocol):
    """A venue, as verification and repair use it (see the package docstring for the rules)."""

    exchange: str
    consecutive_ids: bool
    intervals: tuple[str, ...]

    def fetch_candles(
        self, symbol: str, interval: str, start_us: int, end_us: int
    ) -> list[VenueCandle]: ...

    def fetch_trades(
        self, symbol: str, first_id: int, last_id: int, *, after_ts_us: int | None = None
    ) -> FetchedTrades: ...

    def close(self) -> None: ...


def interval_us(name: str) -> int:
    """An interval's length in microseconds (``1m`` → 60 000 000)."""
    return interval_named(name).length_us


def check_period(interval: str, start_us: int, end_us: int, published: tuple[str, ...]) -> None:
    """A period's bounds must be whole windows of a published interval: anything else is a
    caller's mistake, said before any request."""
    if interval not in published:
        raise VenueRejected(
            f"the venue publishes no {interval} candles (it has {', '.join(published)})"
        )
    length = interval_us(interval)
    if start_us % length or end_us % length or end_us <= start_us:
        raise VenueRejected(f"[{start_us}, {end_us}) µs is not a run of whole {interval} windows")
