"""The venues against a local server replaying their RECORDED responses (tests/data/venues)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from candlekeep.venue_replay import Faults, VenueReplay, load_recordings
from shared.batch.venues import (
    CONSECUTIVE_IDS,
    VenueRejected,
    VenueResponseError,
    VenueUnavailable,
    venue_for,
)
from shared.batch.venues import binance as binance_module
from shared.batch.venues.binance import SPOT, BinanceVenue, Market
from shared.batch.venues.kraken import vwap_agrees
from shared.config import Settings
from shared.core.kraken_symbols import rest_pair, stored_symbol, ws_symbol
from shared.store.redaction import redact

DATA = Path(__file__).resolve().parent / "data" / "venues"
MINUTE_US = 60_000_000
HOUR_US = 60 * MINUTE_US


def recorded_binance(name: str):
    return json.loads((DATA / "binance" / name).read_text())


def recorded_kraken(name: str):
    return json.loads((DATA / "kraken" / name).read_text(), parse_float=Decimal)["result"]


@pytest.fixture(scope="module")
def replay():
    recordings = load_recordings()
    # No public recording of USD-M REST answers was found (tests/data/venues/README.md): its
    # client is exercised on the spot recording, whose rows have the same format.
    recordings["binance-usdm"] = recordings["binance"]
    with VenueReplay(recordings) as server:
        yield server


@pytest.fixture
def settings(replay, monkeypatch):
    monkeypatch.setenv("CANDLEKEEP_BINANCE_REST_URL", replay.rest_url("binance"))
    monkeypatch.setenv("CANDLEKEEP_BINANCE_USDM_REST_URL", replay.rest_url("binance-usdm"))
    monkeypatch.setenv("CANDLEKEEP_KRAKEN_REST_URL", replay.rest_url("kraken"))
    monkeypatch.setenv("CANDLEKEEP_VENUE_TIMEOUT", "2")
    replay.faults = Faults()
    return Settings()


class Sleeps:
    """The venue's sleep, recorded instead of slept (a long Retry-After costs no test time)."""

    def __init__(self):
        self.slept: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def venue(name: str, settings: Settings):
    made = venue_for(name, settings)
    made.http.sleep = Sleeps()
    return made


# -- Binance ------------------------------------------------------------------------------------


def test_binance_klines_are_the_recorded_closed_klines_exactly_across_pages(settings, replay):
    rows = recorded_binance("klines_BTCUSDT_1h.json")
    spot = venue("binance", settings)
    # 100 klines a page: the 499 closed ones take 5 pages.
    spot.market = Market("binance", "/api/v3/klines", "/api/v3/historicalTrades", 100, 6000)
    before = len(replay.requests)
    candles = spot.fetch_candles("BTCUSDT", "1h", rows[0][0] * 1000, rows[-1][0] * 1000 + HOUR_US)
    assert len(replay.requests) - before == 5
    # The recording's last kline was still open when Binance answered (its Date header).
    assert len(candles) == len(rows) - 1
    for candle, row in zip(candles, rows, strict=False):
        assert candle.window_start_us == row[0] * 1000
        assert (candle.open, candle.high, candle.low, candle.close) == tuple(
            Decimal(x) for x in row[1:5]
        )
        assert candle.volume == Decimal(row[5]) and candle.quote_volume == Decimal(row[7])
        assert candle.trade_count == row[8]
        assert candle.taker_buy_volume == Decimal(row[9])
        assert candle.taker_buy_quote_volume == Decimal(row[10])
        assert candle.vwap is None
    # A period in the middle: only its windows.
    start = rows[10][0] * 1000
    middle = spot.fetch_candles("BTCUSDT", "1h", start, start + 3 * HOUR_US)
    assert [c.window_start_us for c in middle] == [start, start + HOUR_US, start + 2 * HOUR_US]


def test_binance_trades_by_id_are_exact_paged_and_name_what_is_missing(
    settings, replay, monkeypatch
):
    rows = {r["id"]: r for r in recorded_binance("trades_BTCUSDT.json")}
    spot = venue("binance", settings)
    monkeypatch.setattr(binance_module, "TRADES_PAGE", 100)
    first, last = 499110100, 499110449
    before = len(replay.requests)
    fetched = spot.fetch_trades("BTCUSDT", first, last)
    asked = replay.requests[before:]
    assert [r[1]["fromId"] for r in asked] == ["499110100", "499110200", "499110300", "499110400"]
    assert [t.trade_id for t in fetched.trades] == list(range(first, last + 1))
    assert fetched.missing_ids == [] and fetched.reason is None
    for trade in fetched.trades:
        row = rows[trade.trade_id]
        assert (trade.exchange, trade.symbol) == ("binance", "BTCUSDT")
        assert trade.price == Decimal(row["price"]) and trade.quantity == Decimal(row["qty"])
        assert trade.ts_us == row["time"] * 1000
        assert trade.is_buyer_maker is row["isBuyerMaker"]
    # Ids before the recording's first are not served any more: named, with the reason.
    older = spot.fetch_trades("BTCUSDT", 499110070, 499110080)
    assert [t.trade_id for t in older.trades] == [499110078, 499110079, 499110080]
    assert older.missing_ids == list(range(499110070, 499110078))
    assert "no trade with these ids" in older.reason


def test_binance_api_key_is_sent_and_never_shown(replay, monkeypatch, settings):
    key = "k3yThatMustNeverBePrinted9"
    monkeypatch.setenv("CANDLEKEEP_BINANCE_API_KEY", key)
    keyed = venue("binance", Settings())
    before = len(replay.requests)
    keyed.fetch_trades("BTCUSDT", 499110100, 499110101)
    assert replay.requests[before][2].get("X-MBX-APIKEY") == key
    with pytest.raises(VenueRejected) as refused:
        keyed.fetch_trades("NOPE", 1, 2)
    assert key not in str(refused.value) and "Invalid symbol" in str(refused.value)
    assert redact(f"header {key}") == "header ***"
    assert key not in repr(Settings())


def test_binance_usdm_asks_the_futures_paths(settings, replay):
    usdm = venue("binance-usdm", settings)
    before = len(replay.requests)
    trades = usdm.fetch_trades("BTCUSDT", 499110100, 499110102)
    candles = usdm.fetch_candles("BTCUSDT", "1h", 1605474000000000, 1605474000000000 + HOUR_US)
    assert [r[0] for r in replay.requests[before:]] == [
        "binance-usdm/fapi/v1/historicalTrades",
        "binance-usdm/fapi/v1/klines",
    ]
    assert {t.exchange for t in trades.trades} == {"binance-usdm"} and len(trades.trades) == 3
    assert [c.exchange for c in candles] == ["binance-usdm"]
    gone = usdm.fetch_trades("BTCUSDT", 499110076, 499110077)
    assert "only MARKET trades" in gone.reason


# -- Kraken -------------------------------------------------------------------------------------


def kraken_minutes():
    """Kraken's recorded trades by minute, and its recorded committed OHLC rows by time."""
    trades = recorded_kraken("trades_XBTUSDT.json")["XBTUSDT"]
    by_minute = defaultdict(list)
    for row in trades:
        by_minute[int(row[2]) // 60 * 60].append(row)
    ohlc = recorded_kraken("ohlc_XBTUSDT_1m.json")
    return trades, by_minute, {r[0]: r for r in ohlc["XBTUSDT"]}, ohlc["last"]


def test_kraken_ohlc_is_the_recorded_committed_candles_exactly(settings):
    _, _, rows, last = kraken_minutes()
    kraken = venue("kraken", settings)
    first = min(rows) * 1_000_000
    candles = kraken.fetch_candles("BTC-USDT", "1m", first, (max(rows) + 60) * 1_000_000)
    # The newest row (after 'last') was still open: left out.
    assert [c.window_start_us // 1_000_000 for c in candles] == sorted(t for t in rows if t <= last)
    for candle in candles:
        row = rows[candle.window_start_us // 1_000_000]
        assert (candle.open, candle.high, candle.low, candle.close) == tuple(
            Decimal(x) for x in row[1:5]
        )
        assert candle.vwap == Decimal(row[5]) and candle.volume == Decimal(row[6])
        assert candle.trade_count == row[7]
        assert candle.quote_volume is None and candle.taker_buy_volume is None
    # Filled minutes are there, marked by their count of 0, at the previous close.
    filled = [c for c in candles if c.trade_count == 0]
    assert filled and all(c.volume == 0 and c.open == c.high == c.low == c.close for c in filled)
    # Older than Kraken's latest 720: unavailable, said plainly.
    with pytest.raises(VenueUnavailable, match="latest 720"):
        kraken.fetch_candles("BTC-USDT", "1m", first - 60 * MINUTE_US, first)
    assert kraken.http.sleep.slept == [] or all(s <= 1.0 for s in kraken.http.sleep.slept)


def test_kraken_vwap_is_truncated_and_its_minutes_match_its_trades(settings):
    _, by_minute, rows, _ = kraken_minutes()
    checked = 0
    for minute, trades in sorted(by_minute.items())[1:]:  # the first minute is cut by the recording
        row = rows[minute]
        volume = sum(Decimal(t[1]) for t in trades)
        quote = sum(Decimal(t[0]) * Decimal(t[1]) for t in trades)
        assert (Decimal(trades[0][0]), Decimal(trades[-1][0]), volume, len(trades)) == (
            Decimal(row[1]),
            Decimal(row[4]),
            Decimal(row[6]),
            row[7],
        )
        assert vwap_agrees(quote, volume, Decimal(row[5]))
        checked += 1
    assert checked == 273
    # Truncated, not rounded: 105382.36 is 105382.3 at Kraken, and never 105382.4.
    assert vwap_agrees(Decimal("105382.36"), Decimal(1), Decimal("105382.3"))
    assert not vwap_agrees(Decimal("105382.36"), Decimal(1), Decimal("105382.4"))


def test_kraken_trades_by_id_from_the_neighbours_time(settings):
    trades, _, _, _ = kraken_minutes()
    by_id = {r[6]: r for r in trades}
    kraken = venue("kraken", settings)
    before = by_id[10218599]
    after_ts_us = int(before[2] * 1_000_000)
    fetched = kraken.fetch_trades("BTC-USDT", 10218600, 10218640, after_ts_us=after_ts_us)
    assert [t.trade_id for t in fetched.trades] == list(range(10218600, 10218641))
    assert fetched.missing_ids == []
    for trade in fetched.trades:
        row = by_id[trade.trade_id]
        assert (trade.exchange, trade.symbol) == ("kraken", "BTC-USDT")
        assert trade.price == Decimal(row[0]) and trade.quantity == Decimal(row[1])
        assert trade.ts_us == int(row[2] * 1_000_000)  # truncated to µs
        assert trade.is_buyer_maker is (row[3] == "s")
    # Paged: a range beyond the first page of 1000 from an early time.
    early = by_id[10218208]
    wide = kraken.fetch_trades(
        "BTC-USDT", 10218209, 10219207, after_ts_us=int(early[2] * 1_000_000)
    )
    assert len(wide.trades) == 999 and wide.missing_ids == []
    # A start before the recording: those ids are not served by time any more.
    gone = kraken.fetch_trades("BTC-USDT", 10218200, 10218210, after_ts_us=after_ts_us - 10**12)
    assert gone.missing_ids == list(range(10218200, 10218208))
    assert "later id" in gone.reason
    with pytest.raises(VenueRejected, match="time of the trade before"):
        kraken.fetch_trades("BTC-USDT", 1, 2)


def test_kraken_symbols_map_one_way_everywhere():
    assert stored_symbol("BTC/USD") == stored_symbol("xbt/usd") == "BTC-USD"
    assert stored_symbol("XDG/USDT") == "DOGE-USDT"
    assert ws_symbol("BTC-USD") == "BTC/USD" and rest_pair("BTC-USD") == "XBTUSD"
    assert rest_pair("DOGE-USDT") == "XDGUSDT" and rest_pair("SOL-EUR") == "SOLEUR"
    for bad in ("BTCUSD", "BTC/USD/EUR", "/USD", "BT C/USD"):
        with pytest.raises(ValueError, match="not a Kraken pair"):
            stored_symbol(bad)


def test_registry():
    assert {"binance", "binance-usdm", "kraken"} == CONSECUTIVE_IDS
    assert venue_for("synthetic", Settings()) is None


# -- failures: bounded, typed, said plainly ------------------------------------------------------


def test_a_429_with_retry_after_is_waited_out(settings, replay):
    spot = venue("binance", settings)
    replay.faults.rate_limit = (429, 7)
    fetched = spot.fetch_trades("BTCUSDT", 499110100, 499110101)
    assert len(fetched.trades) == 2
    assert spot.http.sleep.slept == [7.0]


@pytest.mark.parametrize(
    ("status", "after", "message"), [(418, 5, "banned"), (429, 3600, "beyond the 60 s")]
)
def test_418_or_a_retry_after_beyond_the_bound_is_unavailable_at_once(
    settings, replay, status, after, message
):
    spot = venue("binance", settings)
    replay.faults.rate_limit = (status, after)
    started = time.monotonic()
    with pytest.raises(VenueUnavailable, match=message):
        spot.fetch_candles("BTCUSDT", "1h", 1605474000000000, 1605477600000000)
    assert time.monotonic() - started < 5 and spot.http.sleep.slept == []


def test_a_venue_that_is_down_is_unavailable_in_bounded_time(settings, replay):
    kraken = venue_for("kraken", settings)  # real sleeps: backoff 0.5 + 1 + 2 s
    replay.set_down(True)
    try:
        started = time.monotonic()
        with pytest.raises(VenueUnavailable, match="cannot connect") as down:
            kraken.fetch_candles("BTC-USDT", "1m", 1762795440000000, 1762795500000000)
        assert time.monotonic() - started < 10
        assert "try again later" in str(down.value)
    finally:
        replay.set_down(False)


def test_malformed_answers_are_typed_errors_with_a_reason(settings, replay):
    spot = venue("binance", settings)
    replay.faults.malformed = True
    with pytest.raises(VenueResponseError, match="not JSON"):
        spot.fetch_trades("BTCUSDT", 499110100, 499110101)
    with pytest.raises(VenueResponseError, match="kline is not an array"):
        binance_module.candle_from_row({"open": 1}, "binance", "BTCUSDT", "1m")
    with pytest.raises(VenueResponseError, match="isBuyerMaker"):
        binance_module.trade_from_row(
            {"id": 1, "price": "1", "qty": "1", "time": 1, "isBuyerMaker": "yes"}, "binance", "X"
        )
    with pytest.raises(VenueRejected, match="publishes no 30s"):
        BinanceVenue(SPOT, spot.http).fetch_candles("BTCUSDT", "30s", 0, 60_000_000)
