"""Symbols expected in a period that have no trade in it (SPEC §6.1): never a silent ``pass``.

A symbol is expected when it traded in the ``CANDLEKEEP_EXPECTED_LOOKBACK`` (24 hours) before the
period, or is configured (``CANDLEKEEP_EXPECTED_SYMBOLS=binance:BTCUSDT,…``). One that has no
trade at all in the period is a feed that stopped, a symbol the venue halted, or a market that
went quiet: the report names it and says ``warn``, and the check against the venue asks the
venue about its windows (a venue candle with trades there is a lost window).

"Traded before" is read from the base candles of both candle tables (an hour has 60 rows per
symbol, not thousands of trades); "no trade in the period" from ``trades`` itself, for the few
symbols without a batch candle in it, in one pass over the period's time range whatever the
history holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import psycopg

from shared.config import Settings


def silent_symbols(
    conn: psycopg.Connection,
    settings: Settings,
    start: datetime,
    end: datetime,
    stored: Mapping[tuple[str, str], int] | None = None,
) -> list[dict]:
    """``[{exchange, symbol, last_seen}]`` of the expected symbols with no trade in
    ``[start, end)`` (``last_seen``: the end of the last base window with a candle before the
    period, ``None`` for a configured symbol never seen in the lookback). ``stored``: the
    period's trades by symbol where the caller counted them already (the checks do), else they
    are looked up here."""
    base = settings.interval_set.base.name
    seen = dict.fromkeys(settings.expected)
    for exchange, symbol, last_seen in conn.execute(
        "SELECT exchange, symbol, max(window_end) FROM ("
        "  SELECT exchange, symbol, window_end FROM batch_candles"
        "  WHERE interval = %(base)s AND window_start >= %(since)s AND window_start < %(start)s"
        "  UNION ALL"
        "  SELECT exchange, symbol, window_end FROM stream_candles"
        "  WHERE interval = %(base)s AND window_start >= %(since)s AND window_start < %(start)s"
        ") AS c GROUP BY 1, 2",
        {"base": base, "since": start - settings.expected_lookback, "start": start},
    ).fetchall():
        seen[(exchange, symbol)] = last_seen
    traded = set(
        conn.execute(
            "SELECT DISTINCT exchange, symbol FROM batch_candles WHERE interval = %s"
            " AND window_start >= %s AND window_start < %s",
            (base, start, end),
        ).fetchall()
    )
    candidates = [key for key in sorted(seen) if key not in traded]
    if not candidates:
        return []
    if stored is not None:
        with_trades = {key for key in candidates if stored.get(key)}
    else:
        with_trades = _with_trades(conn, start, end, candidates)
    return [
        {"exchange": exchange, "symbol": symbol, "last_seen": seen[(exchange, symbol)]}
        for exchange, symbol in candidates
        if (exchange, symbol) not in with_trades
    ]


def _with_trades(
    conn: psycopg.Connection, start: datetime, end: datetime, candidates: list[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Which ``candidates`` have a trade in ``[start, end)`` (only trades of other kinds, no
    candle, but trades). One pass over the period's time range (the BRIN on ``ts``) for all of
    them: a probe of the primary key by symbol and time reads the symbol's whole history when it
    has no trade in the period (270 ms at 500k trades a symbol, and growing). The key is compared
    as text so that the planner cannot use the primary key (``:`` is in no exchange or symbol)."""
    return {
        tuple(key.split(":", 1))
        for (key,) in conn.execute(
            "SELECT DISTINCT exchange || ':' || symbol FROM trades WHERE ts >= %s AND ts < %s"
            " AND exchange || ':' || symbol = ANY(%s)",
            (start, end, [f"{exchange}:{symbol}" for exchange, symbol in candidates]),
        ).fetchall()
    }
