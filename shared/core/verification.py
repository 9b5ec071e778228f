"""A batch candle against the venue's own candle (SPEC §6.1): which fields differ, and the verdict.

Pure: the batch step (``shared.batch.verify``) reads both candles and the period's trade-id gaps
from PostgreSQL and asks here. The verdicts:

- ``verified``: open, high, low, close, volume and trade count are equal, and so are the quote
  and taker-buy volumes where the venue gives them (Binance), and Kraken's ``vwap`` is the batch
  candle's ``quote_volume / volume`` *truncated* (not rounded) to the decimals Kraken wrote;
- ``gap``: they differ, and the trade-id gaps that fall in the window account for the venue's
  extra trades (``missing_trades``); a whole window the venue has and candlekeep has not counts
  with a batch trade count of 0;
- ``exchange_mismatch``: any other difference: trades lost without a trace in the ids, a trade
  stored wrong, or a bug;
- ``unverified``: the venue could not be asked, or has no candle for the window (decided by the
  caller, which knows why).

Numbers compare by value (``Decimal("1.50") == Decimal("1.5")``): Binance pads its decimals.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_DOWN, Context, Decimal

VERDICTS = ("verified", "gap", "exchange_mismatch", "unverified")

#: Compared whenever the venue gives them (quote and taker-buy volumes only where it does).
ALWAYS = ("open", "high", "low", "close", "volume", "trade_count")
WHERE_GIVEN = ("quote_volume", "taker_buy_volume", "taker_buy_quote_volume")

#: Wide enough for any quotient a venue's vwap can be checked against; rounding *down* at this
#: precision and then truncating to the vwap's decimals truncates the exact quotient.
_DIVIDE = Context(prec=120, rounding=ROUND_DOWN)


def truncated_vwap(quote_volume: Decimal, volume: Decimal, like: Decimal) -> Decimal:
    """``quote_volume / volume`` truncated to the decimals of ``like`` (Kraken writes its vwap
    cut to the pair's price decimals: ``106039.69…`` is ``106039.6``)."""
    if not volume:
        return Decimal(0)
    return _DIVIDE.divide(quote_volume, volume).quantize(like, rounding=ROUND_DOWN)


def differences(batch: Mapping, venue: Mapping) -> dict[str, dict[str, str | None]]:
    """``{field: {"batch": text, "venue": text}}`` for each compared field that differs.

    ``batch``: a batch candle's fields (SPEC §3 names), or ``{}`` for a window candlekeep has no
    candle of; ``venue``: the venue's candle (the same names, plus ``vwap`` for Kraken; ``None``
    where the venue does not publish a field).
    """
    out: dict[str, dict[str, str | None]] = {}
    for name in ALWAYS + WHERE_GIVEN:
        theirs = venue.get(name)
        if theirs is None and name in WHERE_GIVEN:
            continue
        ours = batch.get(name)
        if ours is None or theirs is None or ours != theirs:
            out[name] = {"batch": _text(ours), "venue": _text(theirs)}
    vwap = venue.get("vwap")
    if vwap is not None:
        ours = truncated_vwap(batch["quote_volume"], batch["volume"], vwap) if batch else None
        if ours is None or ours != vwap:
            out["vwap"] = {"batch": _text(ours), "venue": _text(vwap)}
    return out


def verdict(diffs: Mapping, batch_count: int, venue_count: int, missing: int) -> str:
    """``verified``, ``gap`` or ``exchange_mismatch`` of a compared window (see the module).

    ``missing``: the trades the period's open gaps may hold in the window (every gap whose
    neighbours' times meet it: its missing trades lie somewhere between them). The venue's extra
    trades must be no more than that. Not exactly that: a gap may straddle the window's edge, and
    Binance USD-M's ids also number insurance-fund and ADL trades, which its klines leave out.
    """
    if not diffs:
        return "verified"
    short = venue_count - batch_count
    return "gap" if 0 < short <= missing else "exchange_mismatch"


def _text(value) -> str | None:
    return None if value is None else str(value)
