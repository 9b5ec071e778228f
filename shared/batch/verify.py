"""The check against the venue (SPEC §6.1): its own candles, and a verdict per batch candle.

For the period's symbols (those with a batch candle, and the expected ones that went silent)
and every interval candlekeep computes that the venue publishes, the venue's *closed* candles
of the windows the run owns go to ``exchange_candles``; each batch candle then gets a verdict in
``candle_verifications`` (the rules are ``shared.core.verification``'s): ``verified``, ``gap``,
``exchange_mismatch`` or ``unverified``. A venue candle with trades and no batch candle (a whole
window lost) gets a row too. A window that starts before candlekeep's first stored trade of
the symbol is ``unverified`` (the feed started inside it or after it). Kraken's filled minutes
(count 0, the previous close) are not missing candles.

Failures never stop the run, and never hang it: a venue that cannot be asked
(``VenueUnavailable``: down, timed out, rate-limited past the bound) is not asked again in this
run, and its candles are ``unverified`` with the reason; a refused request or a malformed
answer makes that symbol's interval ``unverified`` with the reason. Each such reason is a
*problem* the report warns about. Exchanges without a venue module (the synthetic feed's) and
runs with ``CANDLEKEEP_VENUE_CHECKS=false`` are ``unverified`` with the reason, and do not warn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import datetime

import psycopg

from shared.batch.expected import silent_symbols
from shared.batch.period_gaps import missing_in, open_gaps
from shared.batch.recompute import owned_windows
from shared.batch.summary import Reconnect, SilentSymbol, TradeGap
from shared.batch.venues import (
    PeriodNotServed,
    Venue,
    VenueCandle,
    VenueError,
    VenueUnavailable,
    venue_for,
)
from shared.config import Settings
from shared.core.trades import datetime_to_ts, ts_to_datetime
from shared.core.verification import VERDICTS, differences, verdict
from shared.store import db
from shared.store.feed_reconnects import reconnects_between
from shared.store.trade_gaps import gaps_between
from shared.store.venue_checks import replace_exchange_candles, replace_verifications

COMPARED = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "trade_count",
    "quote_volume",
    "taker_buy_volume",
    "taker_buy_quote_volume",
)
#: A window that starts before the symbol's first stored trade: the feed started inside it or
#: after it, so the venue's candle holds trades candlekeep never had.
BEFORE_FIRST = "the window starts before candlekeep's first stored trade of the symbol"
NO_CANDLE = "has no candle for this window"
OFF = "checks against the venue are off (CANDLEKEEP_VENUE_CHECKS=false)"

Key = tuple[str, str, str]  # exchange, symbol, interval


def _no_venue(exchange: str) -> str:
    return f"candlekeep has no venue module for exchange {exchange!r}: its candles are not checked"


def verify_period(
    conn: psycopg.Connection,
    settings: Settings,
    start: datetime,
    end: datetime,
    silent: list[tuple[str, str]] = (),
    *,
    make_venue: Callable[[str, Settings], Venue | None] = venue_for,
) -> dict:
    """Fetch, compare and record the period's verdicts, in one transaction; returns
    ``{"counts", "by_interval", "problems", "fetched"}`` (JSON-able, for the report)."""
    ranges = [
        r for r in owned_windows(start, end, settings.interval_set) if r.first_start < r.last_end
    ]
    span = (min(r.first_start for r in ranges), max(r.last_end for r in ranges)) if ranges else None
    symbols = _period_symbols(conn, span) | set(silent) if span else set()
    fetched, reasons, problems = _fetch(settings, symbols, ranges, make_venue)
    gaps = open_gaps(conn, *span) if span else []
    with conn.transaction():
        table_ranges = [(r.interval.name, r.first_start, r.last_end) for r in ranges]
        replace_exchange_candles(
            conn, table_ranges, (_row(c) for cs in fetched.values() for c in cs)
        )
        rows = _verdicts(conn, ranges, fetched, reasons, gaps)
        replace_verifications(conn, table_ranges, rows)
    by_interval = {r.interval.name: dict.fromkeys(VERDICTS, 0) for r in ranges}
    for row in rows:
        by_interval[row[2]][row[4]] += 1
    counts = {v: sum(c[v] for c in by_interval.values()) for v in VERDICTS}
    no_candle: dict[Key, int] = defaultdict(int)
    for row in rows:
        if row[7] is not None and row[7].endswith(NO_CANDLE):
            no_candle[row[:3]] += 1
    problems += [
        {
            "exchange": e,
            "symbol": s,
            "interval": i,
            "reason": f"the venue has no candle for {n} window(s) with trades",
        }
        for (e, s, i), n in sorted(no_candle.items())
    ]
    return {
        "counts": counts,
        "by_interval": by_interval,
        "problems": problems,
        "fetched": sum(len(c) for c in fetched.values()),
    }


def _period_symbols(conn: psycopg.Connection, span: tuple) -> set[tuple[str, str]]:
    return set(
        conn.execute(
            "SELECT DISTINCT exchange, symbol FROM batch_candles"
            " WHERE window_start >= %s AND window_start < %s",
            span,
        ).fetchall()
    )


def _fetch(settings, symbols, ranges, make_venue):
    """The venue's candles of each (exchange, symbol, interval) that could be asked; for the
    others the reason; and the problems to warn about."""
    fetched: dict[Key, list[VenueCandle]] = {}
    reasons: dict[Key, str] = {}
    problems: list[dict] = []
    by_exchange: dict[str, list[str]] = defaultdict(list)
    for exchange, symbol in sorted(symbols):
        by_exchange[exchange].append(symbol)
    for exchange, names in by_exchange.items():
        keys = [(exchange, s, r) for s in names for r in ranges]
        venue = make_venue(exchange, settings) if settings.venue_checks else None
        if venue is None:
            why = OFF if not settings.venue_checks else _no_venue(exchange)
            reasons.update({(exchange, s, r.interval.name): why for exchange, s, r in keys})
            continue
        try:
            down: str | None = None
            for _, symbol, window_range in keys:
                key = (exchange, symbol, window_range.interval.name)
                if down is not None:
                    reasons[key] = down
                    continue
                if key[2] not in venue.intervals:
                    reasons[key] = f"{exchange} publishes no {key[2]} candles"
                    continue
                try:
                    fetched[key] = venue.fetch_candles(
                        symbol,
                        key[2],
                        datetime_to_ts(window_range.first_start),
                        datetime_to_ts(window_range.last_end),
                    )
                except PeriodNotServed as exc:  # this request only: the venue is up
                    reasons[key] = str(exc)
                    problems.append(
                        {
                            "exchange": exchange,
                            "symbol": symbol,
                            "interval": key[2],
                            "reason": str(exc),
                        }
                    )
                except VenueUnavailable as exc:
                    down = reasons[key] = str(exc)
                    problems.append(
                        {"exchange": exchange, "symbol": None, "interval": None, "reason": down}
                    )
                except VenueError as exc:
                    reasons[key] = str(exc)
                    problems.append(
                        {
                            "exchange": exchange,
                            "symbol": symbol,
                            "interval": key[2],
                            "reason": str(exc),
                        }
                    )
        finally:
            venue.close()
    return fetched, reasons, problems


def _row(candle: VenueCandle) -> tuple:
    return (
        candle.exchange,
        candle.symbol,
        candle.interval,
        ts_to_datetime(candle.window_start_us),
        ts_to_datetime(candle.window_end_us),
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.volume,
        candle.trade_count,
        candle.quote_volume,
        candle.taker_buy_volume,
        candle.taker_buy_quote_volume,
        candle.vwap,
    )


def _verdicts(conn, ranges, fetched, reasons, gaps) -> list[tuple]:
    """One row per batch candle of the owned windows, and per venue candle with trades and no
    batch candle (after the symbol's first stored trade)."""
    rows: list[tuple] = []
    first_trade = _first_trade_ts(conn)
    for window_range in ranges:
        name = window_range.interval.name
        batch = {
            (r[0], r[1], r[2]): dict(zip(COMPARED, r[3:], strict=True))
            for r in conn.execute(
                f"SELECT exchange, symbol, window_start, {', '.join(COMPARED)} FROM batch_candles"
                " WHERE interval = %s AND window_start >= %s AND window_start < %s",
                (name, window_range.first_start, window_range.last_end),
            ).fetchall()
        }
        venue: dict[tuple, VenueCandle] = {}
        for (exchange, symbol, interval), candles in fetched.items():
            if interval == name:
                venue.update(
                    {(exchange, symbol, ts_to_datetime(c.window_start_us)): c for c in candles}
                )
        for key in sorted(batch.keys() | {k for k, c in venue.items() if c.trade_count}):
            exchange, symbol, window_start = key
            ours, theirs = batch.get(key, {}), venue.get(key)
            if theirs is None:
                why = reasons.get((exchange, symbol, name)) or f"{exchange} {NO_CANDLE}"
                rows.append((exchange, symbol, name, window_start, "unverified", {}, None, why))
                continue
            first = first_trade(exchange, symbol)
            if first is None or first >= window_start:
                rows.append(
                    (exchange, symbol, name, window_start, "unverified", {}, None, BEFORE_FIRST)
                )
                continue
            diffs = differences(ours, vars(theirs))
            start_us = theirs.window_start_us
            missing = missing_in(gaps, exchange, symbol, start_us, theirs.window_end_us)
            said = verdict(diffs, ours.get("trade_count") or 0, theirs.trade_count, missing)
            rows.append(
                (
                    exchange,
                    symbol,
                    name,
                    window_start,
                    said,
                    diffs,
                    missing if diffs else None,
                    None,
                )
            )
    return rows


def _first_trade_ts(conn: psycopg.Connection) -> Callable[[str, str], datetime | None]:
    """The time of each symbol's first stored trade (by id: the primary key's first entry)."""
    cache: dict[tuple[str, str], datetime | None] = {}

    def first(exchange: str, symbol: str) -> datetime | None:
        if (exchange, symbol) not in cache:
            row = conn.execute(
                "SELECT ts FROM trades WHERE exchange = %s AND symbol = %s"
                " ORDER BY trade_id LIMIT 1",
                (exchange, symbol),
            ).fetchone()
            cache[(exchange, symbol)] = row[0] if row else None
        return cache[(exchange, symbol)]

    return first


def period_facts(
    conn: psycopg.Connection,
    settings: Settings,
    start,
    end,
    stored: Mapping[tuple[str, str], int] | None = None,
) -> dict:
    """The report's lists of the check against the venue: the gaps meeting the period, the
    silent expected symbols, the feeds' reconnects (``stored``: the period's trades by symbol,
    where the caller has counted them)."""

    def iso(row: dict) -> dict:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}

    gaps = [
        TradeGap(
            missing=g["last_missing_id"] - g["first_missing_id"] + 1,
            **{k: v for k, v in iso(g).items() if k in TradeGap.__struct_fields__},
        )
        for g in gaps_between(conn, start, end)
    ]
    return {
        "trade_gaps": gaps,
        "silent_symbols": [
            SilentSymbol(**iso(s)) for s in silent_symbols(conn, settings, start, end, stored)
        ],
        "reconnects": [Reconnect(**iso(r)) for r in reconnects_between(conn, start, end)],
    }


def stored_verification(url: str, start: datetime, end: datetime) -> dict | None:
    """Verdict counts of any range from ``candle_verifications`` as it is (``None``: none)."""
    by_interval: dict[str, dict[str, int]] = {}
    with db.connect(url) as conn:
        for interval, verdict_, n in conn.execute(
            "SELECT interval, verdict, count(*) FROM candle_verifications"
            " WHERE window_start >= %s AND window_start < %s GROUP BY 1, 2",
            (start, end),
        ).fetchall():
            by_interval.setdefault(interval, dict.fromkeys(VERDICTS, 0))[verdict_] = n
    if not by_interval:
        return None
    counts = {v: sum(c[v] for c in by_interval.values()) for v in VERDICTS}
    return {"counts": counts, "by_interval": by_interval}
