"""The venues candlekeep checks its trades and candles against: one module each, one registry.

``venue_for(exchange, settings)`` gives the :class:`~shared.batch.venues.base.Venue` of an
exchange name (SPEC §2: ``binance``, ``binance-usdm``, ``kraken``), or ``None`` for an exchange
candlekeep knows no venue for (its candles stay ``unverified``). Every venue has:

- ``exchange``: its exchange name; ``consecutive_ids``: whether its trade ids are consecutive per
  symbol (a hole is a gap, SPEC §4); ``intervals``: the candle intervals it publishes.
- ``fetch_candles(symbol, interval, start_us, end_us) -> list[VenueCandle]``: the venue's
  *closed* candles whose window starts in ``[start_us, end_us)`` (epoch µs, whole windows of
  ``interval``), oldest first, exact, paged as the venue needs. Kraken includes its filled
  minutes (``trade_count == 0``).
- ``fetch_trades(symbol, first_id, last_id, *, after_ts_us=None) -> FetchedTrades``: the
  trades with those ids (``shared.core.trades.Trade``, exchange and symbol as stored), and the
  ids the venue did not serve with the reason. ``after_ts_us`` is the time of the trade just
  before ``first_id`` (``trade_gaps`` has it): Kraken needs it, Binance ignores it.
- ``close()``: release the HTTP connection.

Every call raises only :class:`~shared.batch.venues.base.VenueError` subclasses:
``VenueUnavailable`` (down, timed out, rate-limited past ``CANDLEKEEP_VENUE_MAX_RETRY_AFTER``,
the period too old for the venue (``PeriodNotServed``, a subclass: that request only): record
``unverified``, warn, go on), ``VenueRejected`` (the
venue refused the request: an unknown symbol, an interval it does not publish) and
``VenueResponseError`` (an answer that is not what the venue documents). Each message says
what was wrong; none carries the API key. Each call is bounded in time: at most
``(retries + 1)`` requests of ``CANDLEKEEP_VENUE_TIMEOUT`` each, plus waits of at most
``CANDLEKEEP_VENUE_MAX_RETRY_AFTER``, per page.

Adding a venue: a module here with its pure row parsers and a class like these, a line in
:data:`VENUES`, and its recorded responses under ``tests/data/venues/<exchange>/`` with a
``PROVENANCE.md`` (docs/venues.md).
"""

from __future__ import annotations

from collections.abc import Callable

from shared.config import Settings

from .base import (
    FetchedTrades,
    PeriodNotServed,
    Venue,
    VenueCandle,
    VenueError,
    VenueRejected,
    VenueResponseError,
    VenueUnavailable,
)
from .binance import SPOT, USDM, BinanceVenue
from .http import VenueHttp
from .kraken import KrakenVenue

__all__ = [
    "CONSECUTIVE_IDS",
    "VENUES",
    "FetchedTrades",
    "PeriodNotServed",
    "Venue",
    "VenueCandle",
    "VenueError",
    "VenueRejected",
    "VenueResponseError",
    "VenueUnavailable",
    "venue_for",
]


def _http(settings: Settings, name: str, url: str, **rules) -> VenueHttp:
    return VenueHttp(
        name=name,
        base_url=url,
        timeout_s=settings.venue_timeout.total_seconds(),
        max_retry_after_s=settings.venue_max_retry_after.total_seconds(),
        **rules,
    )


def _binance_headers(settings: Settings) -> dict[str, str]:
    key = settings.binance_api_key
    return {"X-MBX-APIKEY": key.get_secret_value()} if key is not None else {}


def _binance(settings: Settings) -> Venue:
    http = _http(
        settings,
        "Binance",
        settings.binance_rest_url,
        headers=_binance_headers(settings),
        weight_limit_1m=SPOT.weight_limit_1m,
    )
    return BinanceVenue(SPOT, http)


def _binance_usdm(settings: Settings) -> Venue:
    http = _http(
        settings,
        "Binance USD-M",
        settings.binance_usdm_rest_url,
        headers=_binance_headers(settings),
        weight_limit_1m=USDM.weight_limit_1m,
    )
    return BinanceVenue(USDM, http)


def _kraken(settings: Settings) -> Venue:
    return KrakenVenue(_http(settings, "Kraken", settings.kraken_rest_url, min_interval_s=1.0))


#: exchange name → how to make its venue from the settings.
VENUES: dict[str, Callable[[Settings], Venue]] = {
    "binance": _binance,
    "binance-usdm": _binance_usdm,
    "kraken": _kraken,
}
_CLASSES = {"binance": BinanceVenue, "binance-usdm": BinanceVenue, "kraken": KrakenVenue}
#: The exchanges whose trade ids are consecutive per symbol (SPEC §4: a hole is a gap), from
#: each venue class's own ``consecutive_ids``.
CONSECUTIVE_IDS = frozenset(name for name, cls in _CLASSES.items() if cls.consecutive_ids)


def venue_for(exchange: str, settings: Settings) -> Venue | None:
    """The venue of ``exchange`` (a new HTTP client: ``close()`` it), or ``None``."""
    make = VENUES.get(exchange)
    return make(settings) if make is not None else None
