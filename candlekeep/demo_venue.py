"""The demo's venue: the synthetic market as Binance would serve it, from a local replay server.

The demo's feed loses a run of one symbol's trades on the way (as a WebSocket reconnect does), so
that the stream and the batch agree with each other and are still short of the truth. The venue
knows every trade: this module builds what Binance would answer for the synthetic market — the
klines of every interval candlekeep computes and the ``historicalTrades`` rows, in Binance's own
formats — from the same seeded market, and :class:`~candlekeep.venue_replay.VenueReplay` serves
them as it serves recorded answers. The DAG then finds the gap, verifies every other candle
against the venue, repairs the gap from ``historicalTrades`` and verifies the repaired candles.

It is synthetic, and says so: tests use recorded answers of the real venues instead
(``tests/data/venues``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime

from candlekeep.venue_replay import Recording, VenueReplay
from shared.core.aggregation import aggregate, fill_gaps
from shared.core.candle_formats import kline_row
from shared.core.intervals import IntervalSet
from shared.core.trade_messages import parse_trade_message
from shared.core.trades import Trade
from stream.feeds.synthetic import MarketDials, synthetic_messages


def market_trades(dials: MarketDials) -> list[Trade]:
    """Every trade of the synthetic market, once, lost ones included (what the venue made)."""
    trades: dict[tuple[str, str, int], Trade] = {}
    for message in synthetic_messages(replace(dials, lost=None)):
        if message.kind in ("invalid", "duplicate"):
            continue
        trade = parse_trade_message(message.value)
        trades.setdefault(trade.key, trade)  # type: ignore[union-attr]
    return sorted(trades.values(), key=lambda t: (t.symbol, t.trade_id))


def binance_recording(trades: list[Trade], intervals: IntervalSet) -> Recording:
    """Binance's answers for these trades: klines (empty minutes as Binance fills them) and
    ``historicalTrades`` rows (times in µs, as Binance's spot API gives them since 2025)."""
    recording = Recording(date=format_datetime(datetime.now(UTC), usegmt=True))
    for candle_interval in intervals.intervals:
        by_symbol: dict[str, list] = {}
        for candle in aggregate(trades, IntervalSet.parse(candle_interval.name)):
            by_symbol.setdefault(candle.symbol, []).append(candle)
        for symbol, candles in by_symbol.items():
            rows = []
            candles.sort(key=lambda c: c.window_start_us)
            for candle in fill_gaps(candles, candle_interval):
                row: list = kline_row(candle)
                row[0], row[6], row[8] = int(row[0]), int(row[6]), int(row[8])
                rows.append(row)
            recording.klines[(symbol, candle_interval.name)] = rows
    for trade in trades:
        recording.trades.setdefault(trade.symbol, []).append(
            {
                "id": trade.trade_id,
                "price": format(trade.price, "f"),
                "qty": format(trade.quantity, "f"),
                "quoteQty": format(trade.price * trade.quantity, "f"),
                "time": trade.ts_us,
                "isBuyerMaker": trade.is_buyer_maker,
                "isBestMatch": True,
            }
        )
    return recording


def demo_venue(dials: MarketDials, intervals: IntervalSet) -> VenueReplay:
    """The replay server of the synthetic market's Binance (start it with ``with``)."""
    return VenueReplay({"binance": binance_recording(market_trades(dials), intervals)})
