"""Kraken's pair names, one mapping for the feed, the venue's candles and its trades.

SPEC §2 symbols are 1-32 of ``A-Z 0-9 . _ -``, so a Kraken pair is stored as its WebSocket v2
name with ``-`` for ``/``: ``BTC/USD`` → ``BTC-USD``. Kraken's older spellings are read as the
same pair (``XBT/USD`` and ``XDG`` are ``BTC`` and ``DOGE``). The REST API takes the pair's
alternative name (``XBTUSD``: ``BTC`` → ``XBT``, ``DOGE`` → ``XDG``). Pure: the stream's feed
(a shell) and the batch's venue module both read it here.
"""

from __future__ import annotations

from shared.core.trade_rules import normalise_symbol

#: Kraken's older asset codes, read as the names its WebSocket v2 uses.
_V2_NAMES = {"XBT": "BTC", "XDG": "DOGE"}
_REST_NAMES = {v: k for k, v in _V2_NAMES.items()}


def stored_symbol(pair: str) -> str:
    """A Kraken pair (``BTC/USD``, ``xbt/usd``, ``BTC-USD``) as the stored symbol ``BTC-USD``;
    ValueError when it is not ``BASE/QUOTE``."""
    text = pair.strip().upper().replace("-", "/")
    parts = text.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{pair[:40]!r} is not a Kraken pair like BTC/USD")
    base, quote = (_V2_NAMES.get(p, p) for p in parts)
    symbol = normalise_symbol(f"{base}-{quote}")
    if symbol is None:
        raise ValueError(f"{pair[:40]!r} is not a Kraken pair like BTC/USD")
    return symbol


def ws_symbol(symbol: str) -> str:
    """The stored ``BTC-USD`` as Kraken's WebSocket v2 names it: ``BTC/USD``."""
    return "/".join(_split(symbol))


def rest_pair(symbol: str) -> str:
    """The stored ``BTC-USD`` as the REST API's pair: ``XBTUSD``."""
    return "".join(_REST_NAMES.get(p, p) for p in _split(symbol))


def _split(symbol: str) -> tuple[str, str]:
    parts = symbol.split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{symbol[:40]!r} is not a stored Kraken symbol like BTC-USD")
    return parts[0], parts[1]
