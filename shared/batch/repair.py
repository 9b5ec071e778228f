"""Repair (SPEC §6.1): fetch the trades of a period's open gaps from the venue, and store them.

For each open ``trade_gaps`` row meeting the period, the venue is asked for exactly the missing
ids (Binance ``historicalTrades`` from ``fromId``; Kraken ``Trades`` from the time of the trade
before the hole). What it serves is stored through the one way of storing trades (first copy
wins: a trade that arrived meanwhile is not changed), and the row is marked filled
(``filled_by = 'repair'``). Ids it does not serve (too old for the venue, or Binance USD-M's
insurance-fund and ADL trades, which ``historicalTrades`` leaves out) stay open, saying why.
Each gap is its own transaction: a failure later on keeps what was repaired.

A venue that cannot be asked is not asked again in this run; its gaps stay open with the
reason. Nothing here recomputes candles: the caller reconciles the period again
(``shared.batch.batch_run.repair_period``). With no open gap, a repair asks nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import psycopg

from shared.batch.period_gaps import open_gaps
from shared.batch.venues import Venue, VenueError, VenueUnavailable, venue_for
from shared.config import Settings
from shared.core.continuity import Gap
from shared.core.trades import Trade, datetime_to_ts
from shared.store.trade_gaps import gaps_of, mark_filled, narrow_open, note_open
from shared.store.trade_staging import Source
from shared.store.trade_store import store_trades


def repair_gaps(
    conn: psycopg.Connection,
    settings: Settings,
    start: datetime,
    end: datetime,
    *,
    make_venue: Callable[[str, Settings], Venue | None] = venue_for,
) -> dict:
    """Repair the open gaps meeting ``[start, end)``. Returns ``{"gaps", "filled", "fetched",
    "stored", "left_open": [{exchange, symbol, first_missing_id, last_missing_id, reason}]}``."""
    gaps = open_gaps(conn, start, end)
    conn.commit()
    out = {"gaps": len(gaps), "filled": 0, "fetched": 0, "stored": 0, "left_open": []}
    venues: dict[str, Venue | None] = {}
    down: dict[str, str] = {}
    try:
        for gap in gaps:
            exchange = gap["exchange"]
            if exchange not in venues:
                venues[exchange] = make_venue(exchange, settings)
            venue = venues[exchange]
            reason = down.get(exchange)
            if venue is None:
                reason = f"candlekeep has no venue module for exchange {exchange!r}"
            if reason is None:
                try:
                    fetched = venue.fetch_trades(
                        gap["symbol"],
                        gap["first_missing_id"],
                        gap["last_missing_id"],
                        after_ts_us=datetime_to_ts(gap["before_ts"]),
                    )
                except VenueUnavailable as exc:
                    reason = down[exchange] = str(exc)
                except VenueError as exc:
                    reason = str(exc)
            if reason is not None:
                note_open(conn, gap["id"], reason)
                conn.commit()
                out["left_open"].append(_left(gap, gap["first_missing_id"], reason))
                continue
            stored = store_trades(conn, fetched.trades, Source(f"venue:{exchange}"))
            out["fetched"] += len(fetched.trades)
            out["stored"] += len(stored.new)
            if not fetched.missing_ids:
                filled = mark_filled(conn, "repair", [(exchange, gap["symbol"])])
                out["filled"] += len(gaps_of(filled))
            elif fetched.trades:
                runs = _runs(gap, fetched.missing_ids, fetched.trades)
                narrow_open(conn, gap, runs, fetched.reason)
                out["left_open"] += [
                    _left(gap, r.first_missing_id, fetched.reason, r.last_missing_id) for r in runs
                ]
            else:
                note_open(conn, gap["id"], fetched.reason)
                out["left_open"].append(_left(gap, gap["first_missing_id"], fetched.reason))
            conn.commit()
    finally:
        for venue in venues.values():
            if venue is not None:
                venue.close()
    return out


def _left(gap: dict, first: int, reason: str, last: int | None = None) -> dict:
    return {
        "exchange": gap["exchange"],
        "symbol": gap["symbol"],
        "first_missing_id": first,
        "last_missing_id": gap["last_missing_id"] if last is None else last,
        "reason": reason,
    }


def _runs(gap: dict, missing: list[int], served: list[Trade]) -> list[Gap]:
    """The runs of ids still missing, with the times of the trades on either side (served
    now, or the gap's own neighbours)."""
    ts = {t.trade_id: t.ts_us for t in served}
    ts[gap["first_missing_id"] - 1] = datetime_to_ts(gap["before_ts"])
    ts[gap["last_missing_id"] + 1] = datetime_to_ts(gap["after_ts"])
    runs, first = [], missing[0]
    for prev, current in zip(missing, [*missing[1:], None], strict=True):
        if current != prev + 1:
            runs.append(
                Gap(gap["exchange"], gap["symbol"], first, prev, ts[first - 1], ts[prev + 1])
            )
            first = current
    return runs
