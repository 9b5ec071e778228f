"""Every malformed-input class of SPEC §2 is rejected with its reason; good input parses."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.core.trade_messages import check_key, parse_trade_message
from shared.core.trades import Rejection, Trade

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


# -- the fast path for well-formed messages agrees with the careful one --------------------------

_FIELD_VALUES = {
    "symbol": ["BTCUSDT", "btcusdt", " eth ", "A" * 32, "A" * 33, "BTC/USDT", "", "É", 5, None],
    "trade_id": [0, 7, 2**63 - 1, 2**63, -1, 1.5, "7", True, None, 10**30],
    "price": [
        "0.1",
        "65000.12",
        " 1.5 ",
        "1_000",
        "1.",
        ".5",
        "+2",
        "1e2",
        "1E-2000",
        "1E-480",
        "1E-481",
        "0.99E-480",
        "9.99E+1000",
        "1E+1000",
        1e-480,
        1e-481,
        "1E+1001",
        "0",
        "-3",
        "NaN",
        "sNaN",
        "Infinity",
        "0x10",
        "1." + "0" * 1100,
        "١٢",
        2.5,
        1,
        0,
        1e-8,
        10**30,
        True,
        None,
        [1],
    ],
    "timestamp": [
        1_700_000_000_123,
        0,
        -5,
        4_102_444_800_000,
        4_102_444_799_999,
        1_700_000_000_123_000_000,
        "2024-01-01T00:00:00.5+01:00",
        "2024-01-01T00:00:00Z",
        "2024-01-01T00:00:00",
        " 2024-01-01T00:00:00Z ",
        "yesterday",
        1.5,
        True,
        None,
    ],
    "exchange": ["binance", "Kraken", " okx ", "b/a", "", 7, None],
    "is_buyer_maker": [True, False, None, 0, "true"],
}


def _careful_and_fast_agree(message: bytes, max_ts_us: int | None) -> None:
    from shared.core.trade_messages import _parse_careful, parse_common_trade

    careful = _parse_careful(message, max_ts_us)
    fast = parse_common_trade(message, max_ts_us)
    both = parse_trade_message(message, max_ts_us=max_ts_us)
    if fast is not None:  # the fast path only ever accepts, exactly what the careful one does
        assert isinstance(careful, Trade), (message, careful)
        assert repr(fast) == repr(careful)  # same values, same decimal digits and exponents
    assert repr(both) == repr(careful)


@pytest.mark.parametrize("field", sorted(_FIELD_VALUES))
def test_the_fast_path_agrees_with_the_careful_one_field_by_field(field):
    import msgspec

    base = {
        "symbol": "btcusdt",
        "trade_id": 7,
        "price": "0.1",
        "quantity": "2.5",
        "timestamp": 1_700_000_000_123,
    }
    values = _FIELD_VALUES["price" if field == "quantity" else field]
    for value in [*values, "missing"]:
        message = dict(base)
        if value == "missing":
            message.pop(field, None)
        else:
            message[field] = value
        encoded = msgspec.json.encode(message)
        for max_ts_us in (None, 1_700_000_000_123_000, 1_700_000_000_122_999):
            _careful_and_fast_agree(encoded, max_ts_us)


@pytest.mark.parametrize(
    "message",
    [
        GOOD.encode(),
        GOOD.encode().replace(b'"trade_id":7', b'"trade_id":7,"trade_id":8'),  # last one wins
        GOOD.encode().replace(b"}", b',"note":"\xff"}'),  # not UTF-8 in an unread field
        GOOD.encode().replace(b"}", ',"note":"é"}'.encode()),
        GOOD.encode().replace(b"}", b',"extra":{"a":[1,2,{"b":null}]}}'),
        b"  " + GOOD.encode() + b"\n",
        GOOD.encode().replace(b"}", b',"pad":"' + b"x" * 600 + b'"}'),  # long: careful path
        GOOD.encode().replace(b'"0.1"', b"1e-500"),
        GOOD.encode().replace(b'"0.1"', b"0.1000000000000000055511151231257827"),
        GOOD.encode().replace(b'"0.1"', b"1.0E+3"),
        GOOD.encode().replace(b'"0.1"', b"-0"),
        GOOD.encode()[:-1],
        b"[]",
        b"null",
    ],
)
def test_the_fast_path_agrees_with_the_careful_one_on_odd_messages(message):
    _careful_and_fast_agree(message, None)


def test_the_fast_path_takes_the_common_messages():
    from shared.core.trade_messages import parse_common_trade

    assert parse_common_trade(GOOD.encode(), None) is not None
    iso = GOOD.replace("1700000000123", '"2023-11-14T22:13:20.123Z"')
    assert parse_common_trade(iso.encode(), None) == parse_trade_message(GOOD)


_MISSING = object()


@given(
    st.fixed_dictionaries(
        {
            name: st.sampled_from(
                [*_FIELD_VALUES["price" if name == "quantity" else name], _MISSING]
            )
            for name in ("symbol", "trade_id", "price", "quantity", "timestamp", "exchange")
        }
        | {"is_buyer_maker": st.sampled_from([*_FIELD_VALUES["is_buyer_maker"], _MISSING])}
    ),
    st.sampled_from([None, 1_700_000_000_123_000]),
)
def test_the_fast_path_agrees_with_the_careful_one_on_any_mix(fields, max_ts_us):
    import msgspec

    message = {name: value for name, value in fields.items() if value is not _MISSING}
    _careful_and_fast_agree(msgspec.json.encode(message), max_ts_us)
