"""The pure comparison of a batch candle with the venue's (shared/core/verification.py)."""

from __future__ import annotations

from decimal import Decimal as D

from shared.core.verification import differences, truncated_vwap, verdict

BATCH = {
    "open": D("100.5"),
    "high": D("101"),
    "low": D("100"),
    "close": D("100.75"),
    "volume": D("3"),
    "trade_count": 3,
    "quote_volume": D("302.25"),
    "taker_buy_volume": D("1"),
    "taker_buy_quote_volume": D("100.5"),
}


def test_binance_pads_decimals_and_equal_values_are_equal():
    venue = {k: D(f"{v:.8f}") if isinstance(v, D) else v for k, v in BATCH.items()}
    assert differences(BATCH, venue) == {}
    assert verdict({}, 3, 3, 0) == "verified"


def test_quote_and_taker_volumes_count_only_where_the_venue_gives_them():
    kraken = {**BATCH, "quote_volume": None, "taker_buy_volume": None}
    kraken["taker_buy_quote_volume"] = None
    assert differences({**BATCH, "quote_volume": D("1")}, kraken) == {}
    binance = {**BATCH, "taker_buy_volume": D("2")}
    assert differences(BATCH, binance) == {"taker_buy_volume": {"batch": "1", "venue": "2"}}


def test_krakens_vwap_is_truncated_not_rounded():
    # 302.25 / 3 = 100.75: Kraken with one decimal writes 100.7 (truncated), never 100.8.
    assert truncated_vwap(D("302.25"), D("3"), D("0.0")) == D("100.7")
    kraken = {**BATCH, "quote_volume": None, "taker_buy_volume": None, "vwap": D("100.7")}
    kraken["taker_buy_quote_volume"] = None
    assert differences(BATCH, kraken) == {}
    rounded = {**kraken, "vwap": D("100.8")}
    assert differences(BATCH, rounded) == {"vwap": {"batch": "100.7", "venue": "100.8"}}


def test_a_gap_must_account_for_the_venues_extra_trades():
    diffs = {"trade_count": {"batch": "10", "venue": "13"}}
    assert verdict(diffs, 10, 13, missing=3) == "gap"
    assert verdict(diffs, 10, 13, missing=5) == "gap"  # a gap straddling the window's edge
    assert verdict(diffs, 10, 13, missing=2) == "exchange_mismatch"
    assert verdict({"close": {}}, 10, 10, missing=3) == "exchange_mismatch"  # same count
    assert verdict(diffs, 13, 10, missing=3) == "exchange_mismatch"  # more than the venue


def test_a_window_candlekeep_lost_whole_is_compared_with_nothing():
    diffs = differences({}, {**BATCH, "vwap": D("100.7")})
    assert set(diffs) >= {"open", "volume", "trade_count", "vwap"}
    assert diffs["trade_count"] == {"batch": None, "venue": "3"}
    assert verdict(diffs, 0, 3, missing=3) == "gap"
