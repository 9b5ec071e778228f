"""The tables of the check against the venue (SPEC §6.1, migration 0008), in ``schema.metadata``.

A module of their own so that ``schema.py`` stays readable; ``schema.py`` imports it, so the
declared schema (``schema.metadata``) holds them like every other table.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Identity,
    Index,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from shared.store.schema import _ts, metadata

#: The venue's own closed candles of a period, replaced by each run of the period: quote and
#: taker-buy volumes where the venue publishes them (Binance), ``vwap`` where it does (Kraken,
#: truncated to the pair's price decimals).
exchange_candles = Table(
    "exchange_candles",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("interval", Text, nullable=False),
    _ts("window_start"),
    _ts("window_end"),
    Column("open", Numeric, nullable=False),
    Column("high", Numeric, nullable=False),
    Column("low", Numeric, nullable=False),
    Column("close", Numeric, nullable=False),
    Column("volume", Numeric, nullable=False),
    Column("trade_count", BigInteger, nullable=False),
    Column("quote_volume", Numeric),
    Column("taker_buy_volume", Numeric),
    Column("taker_buy_quote_volume", Numeric),
    Column("vwap", Numeric),
    _ts("fetched_at", server_default=func.now()),
    PrimaryKeyConstraint(
        "exchange", "symbol", "interval", "window_start", name="exchange_candles_pkey"
    ),
    Index("exchange_candles_window_start_idx", "window_start"),
)

#: One verdict per batch candle of a period, and per venue candle with trades and no batch
#: candle.
candle_verifications = Table(
    "candle_verifications",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("interval", Text, nullable=False),
    _ts("window_start"),
    Column("verdict", Text, nullable=False),
    # {field: {"batch": value, "venue": value}} for every field that differs.
    Column("differences", JSONB, nullable=False, server_default=text("'{}'")),
    # The trades the period's open gaps may hold in the window (gap and exchange_mismatch).
    Column("missing_trades", Integer),
    # Why the candle is unverified (the venue's error, no venue for the exchange, …).
    Column("reason", Text),
    _ts("verified_at", server_default=func.now()),
    PrimaryKeyConstraint(
        "exchange", "symbol", "interval", "window_start", name="candle_verifications_pkey"
    ),
    CheckConstraint(
        "verdict IN ('verified', 'gap', 'exchange_mismatch', 'unverified')",
        name="candle_verifications_verdict_check",
    ),
    Index("candle_verifications_window_start_idx", "window_start"),
)

#: A feed's reconnects: per symbol, the last trade id before the drop and the first after it
#: (NULL where none came).
feed_reconnects = Table(
    "feed_reconnects",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("last_id_before", BigInteger),
    Column("first_id_after", BigInteger),
    _ts("disconnected_at"),
    _ts("reconnected_at", nullable=True),
    Index("feed_reconnects_disconnected_at_idx", "disconnected_at"),
)
