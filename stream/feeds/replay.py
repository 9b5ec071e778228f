"""Replaying trade files to Kafka.

:func:`replay_messages` turns trades (from Binance CSVs or canonical JSONL, read by
``candlekeep.trade_input.TradeInput``) into canonical trade messages
(:func:`shared.core.trade_messages.encode_trade`: they parse back to the same trades), each with
the wall-clock offset to send it at: its event time after the first trade's, so that a replay
keeps the original pace (times a speed factor). The files are read lazily and
:func:`stream.feeds.produce.send_messages` keeps only counts, so a file of millions of trades
replays in constant memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from shared.core.trade_messages import encode_trade
from shared.core.trades import Trade
from stream.feeds.produce import FeedMessage


def replay_messages(trades: Iterable[Trade]) -> Iterator[FeedMessage]:
    """One message per trade, in the given order, keyed by symbol; ``send_at_s`` is the trade's
    event time after the first trade's (a trade stamped earlier than the first is due at once).
    """
    first_us: int | None = None
    for trade in trades:
        if first_us is None:
            first_us = trade.ts_us
        yield FeedMessage(
            max(0.0, (trade.ts_us - first_us) / 1_000_000),
            trade.symbol.encode(),
            encode_trade(trade),
            "trade",
        )
