"""Hypothesis strategies for trades: ties, duplicates, sides or none, several symbols."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import strategies as st

from shared.core.trades import Trade

T0_US = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z: mid-window, so spans cross boundaries
SYMBOLS = [("binance", "BTCUSDT"), ("binance", "ETHUSDT"), ("kraken", "BTCUSDT")]

prices = st.builds(
    lambda units, scale: Decimal(units).scaleb(-scale),
    st.integers(1, 10**9),
    st.integers(0, 10),
)
quantities = st.builds(
    lambda units, scale: Decimal(units).scaleb(-scale),
    st.integers(1, 10**7),
    st.integers(0, 8),
)


@st.composite
def trade_lists(draw, min_size=0, max_size=60, span_us=40 * 60 * 1_000_000, symbols=SYMBOLS):
    """Trades with unique (exchange, symbol, trade_id), timestamps in ``[T0, T0+span)`` with
    ties, random prices and sides (sometimes unknown)."""
    n = draw(st.integers(min_size, max_size))
    chosen = st.sampled_from(symbols)
    # Few distinct timestamps make ties between trades common.
    stamps = draw(st.lists(st.integers(0, span_us - 1), min_size=1, max_size=12))
    trades = []
    next_id: dict[tuple[str, str], int] = {}
    for _ in range(n):
        exchange, symbol = draw(chosen)
        base = next_id.setdefault((exchange, symbol), draw(st.integers(0, 1000)))
        trade_id = base + draw(st.integers(1, 5))
        next_id[(exchange, symbol)] = trade_id
        ts = T0_US + draw(st.sampled_from(stamps)) + draw(st.sampled_from([0, 0, 1, 999_999]))
        trades.append(
            Trade(
                exchange,
                symbol,
                trade_id,
                ts,
                draw(prices),
                draw(quantities),
                draw(st.sampled_from([None, True, False])),
                draw(st.sampled_from([1, 1, 1, 3])),
            )
        )
    return trades
