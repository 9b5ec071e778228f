"""The canonical trade message's one builder is the parser's inverse: every trade a feed writes
reads back as the same trade, to the last digit."""

from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from shared.core.trade_messages import encode_trade, parse_trade_message
from shared.core.trade_rules import ID_LIMIT, MAX_TS_US, MIN_TS_US
from shared.core.trades import Trade

#: Decimals across the magnitudes a price or quantity may have, with trailing zeros and
#: positive exponents (``1E+3``), all inside the parser's range (SPEC §2: finite, > 0).
decimals = st.builds(
    lambda units, exponent: Decimal(units).scaleb(exponent),
    st.integers(1, 10**30),
    st.integers(-40, 40),
)

trades = st.builds(
    Trade,
    exchange=st.from_regex(r"[a-z0-9._-]{1,32}", fullmatch=True),
    symbol=st.from_regex(r"[A-Z0-9._-]{1,32}", fullmatch=True),
    trade_id=st.integers(0, ID_LIMIT - 1),
    ts_us=st.integers(MIN_TS_US, MAX_TS_US - 1),
    price=decimals,
    quantity=decimals,
    is_buyer_maker=st.sampled_from([None, True, False]),
)


@given(trades, st.booleans())
def test_a_trade_reads_back_from_its_message_digit_for_digit(trade, iso_timestamp):
    message = encode_trade(trade, iso_timestamp=iso_timestamp)
    parsed = parse_trade_message(message)
    assert parsed == trade
    # Every digit travels, trailing zeros too: the decimals are the same, not just equal.
    assert format(parsed.price, "f") == format(trade.price, "f")
    assert format(parsed.quantity, "f") == format(trade.quantity, "f")
    obj = json.loads(message)
    assert "E" not in obj["price"] + obj["quantity"]  # plain notation, never 1E-8
    assert ("is_buyer_maker" in obj) == (trade.is_buyer_maker is not None)
    assert isinstance(obj["timestamp"], str) == (iso_timestamp or trade.ts_us % 1000 != 0)


def test_the_message_spells_the_fields_in_the_documented_order():
    trade = Trade("binance", "BTCUSDT", 5, 1735689600011000, Decimal("0.10"), Decimal("2"), False)
    assert encode_trade(trade) == (
        b'{"exchange":"binance","symbol":"BTCUSDT","trade_id":5,"price":"0.10","quantity":"2",'
        b'"timestamp":1735689600011,"is_buyer_maker":false}'
    )
    assert encode_trade(trade, iso_timestamp=True).endswith(
        b'"timestamp":"2025-01-01T00:00:00.011000Z","is_buyer_maker":false}'
    )
