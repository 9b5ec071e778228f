"""Every malformed-input class of SPEC §2 is rejected with its reason; good input parses."""

from __future__ import annotations

from decimal import Decimal

import pytest

from shared.trades import Rejection, Trade, check_key, parse_trade_message

GOOD = '{"symbol":"btcusdt","trade_id":7,"price":"0.1","quantity":2.5,"timestamp":1700000000123}'


def test_a_good_message_parses_exactly():
    trade = parse_trade_message(GOOD.encode())
    assert trade == Trade(
        "binance", "BTCUSDT", 7, 1_700_000_000_123_000, Decimal("0.1"), Decimal("2.5"), None
    )
    assert isinstance(trade.quantity, Decimal)


def test_json_numbers_are_parsed_without_binary_floating_point():
    trade = parse_trade_message(
        '{"symbol":"X","trade_id":1,"price":0.1000000000000000055511151231257827,'
        '"quantity":1e-8,"timestamp":"2024-01-01T00:00:00.5+01:00","exchange":"Kraken",'
        '"is_buyer_maker":false}'
    )
    assert trade.price == Decimal("0.1000000000000000055511151231257827")
    assert trade.quantity == Decimal("1E-8")
    assert trade.ts_us == 1_704_063_600_500_000
    assert (trade.exchange, trade.is_buyer_maker) == ("kraken", False)


BAD = [
    (b"\xff\xfe\x00garbage", "not_utf8"),
    (b"", "empty"),
    (b"not json", "not_json"),
    (b'{"symbol": "X", ', "not_json"),
    (b"[" * 5000 + b"]" * 5000, "not_json"),  # nested too deeply
    (b"[1, 2]", "not_object"),
    (b'"a string"', "not_object"),
    (b'{"symbol": "X", "trade_id": 1, "price": NaN, "quantity": 1, "timestamp": 1}', "not_json"),
    (b'{"trade_id":1,"price":"1","quantity":"1","timestamp":1}', "missing_field"),
    (b'{"symbol":"X","price":"1","quantity":"1","timestamp":1}', "missing_field"),
    (b'{"symbol":"X","trade_id":1,"quantity":"1","timestamp":1}', "missing_field"),
    (b'{"symbol":"X","trade_id":1,"price":"1","timestamp":1}', "missing_field"),
    (b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1"}', "missing_field"),
    (b'{"symbol":null,"trade_id":1,"price":"1","quantity":"1","timestamp":1}', "missing_field"),
    (b'{"symbol":5,"trade_id":1,"price":"1","quantity":"1","timestamp":1}', "wrong_type"),
    (b'{"symbol":"BTC/USDT","trade_id":1,"price":"1","quantity":"1","timestamp":1}', "bad_symbol"),
    (b'{"symbol":"","trade_id":1,"price":"1","quantity":"1","timestamp":1}', "bad_symbol"),
    (b'{"symbol":"X","trade_id":"1","price":"1","quantity":"1","timestamp":1}', "wrong_type"),
    (b'{"symbol":"X","trade_id":1.5,"price":"1","quantity":"1","timestamp":1}', "wrong_type"),
    (b'{"symbol":"X","trade_id":true,"price":"1","quantity":"1","timestamp":1}', "wrong_type"),
    (b'{"symbol":"X","trade_id":-1,"price":"1","quantity":"1","timestamp":1}', "out_of_range"),
    (b'{"symbol":"X","trade_id":1,"price":"abc","quantity":"1","timestamp":1}', "wrong_type"),
    (b'{"symbol":"X","trade_id":1,"price":[1],"quantity":"1","timestamp":1}', "wrong_type"),
    (b'{"symbol":"X","trade_id":1,"price":"NaN","quantity":"1","timestamp":1}', "not_finite"),
    (b'{"symbol":"X","trade_id":1,"price":"Infinity","quantity":"1","timestamp":1}', "not_finite"),
    (b'{"symbol":"X","trade_id":1,"price":"1","quantity":"-inf","timestamp":1}', "not_finite"),
    (b'{"symbol":"X","trade_id":1,"price":"0","quantity":"1","timestamp":1}', "not_positive"),
    (b'{"symbol":"X","trade_id":1,"price":"1","quantity":-2,"timestamp":1}', "not_positive"),
    (b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1","timestamp":-1}', "bad_timestamp"),
    (
        b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1","timestamp":1700000000000000}',
        "bad_timestamp",
    ),
    (
        b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1","timestamp":"yesterday"}',
        "bad_timestamp",
    ),
    (
        b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1","timestamp":"2024-01-01T00:00:00"}',
        "bad_timestamp",
    ),
    (b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1","timestamp":1.5}', "wrong_type"),
    (
        b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1","timestamp":1,"exchange":3}',
        "wrong_type",
    ),
    (
        b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1","timestamp":1,'
        b'"is_buyer_maker":"yes"}',
        "wrong_type",
    ),
    (
        b'{"symbol":"X","trade_id":1,"price":"1","quantity":"1","timestamp":1,"pad":"'
        + b"x" * 70000
        + b'"}',
        "too_large",
    ),
]


@pytest.mark.parametrize(("message", "code"), BAD, ids=[f"{c}-{i}" for i, (_, c) in enumerate(BAD)])
def test_malformed_messages_are_rejected_with_a_reason(message, code):
    result = parse_trade_message(message)
    assert isinstance(result, Rejection), result
    assert result.code == code
    assert len(result.reason) > 10


def test_rejection_names_the_field_and_what_was_wrong():
    result = parse_trade_message(
        b'{"symbol":"X","trade_id":1,"price":"-3","quantity":"1","timestamp":1}'
    )
    assert result.reason == "price: must be greater than 0, got -3"


def test_trades_from_the_future_are_rejected_when_a_bound_is_given():
    late_2023 = 1_700_000_000_000_000
    result = parse_trade_message(GOOD, max_ts_us=late_2023)
    assert isinstance(result, Rejection) and "in the future" in result.reason
    assert isinstance(parse_trade_message(GOOD, max_ts_us=late_2023 + 10**6), Trade)


def test_the_message_key_must_be_the_symbol():
    trade = parse_trade_message(GOOD)
    assert check_key(b"BTCUSDT", trade) is None
    assert check_key(b"btcusdt", trade) is None
    assert check_key(None, trade).code == "bad_key"
    assert check_key(b"ETHUSDT", trade).code == "bad_key"
