"""Trade kinds (SPEC §2): a venue's trades that are not order-book trades (Binance USD-M's
insurance-fund and ADL trades) are stored with their kind and never folded into candles, in the
core, ``aggregate``, the stream and in batch alike, as the venue's own klines leave them out.
Real broker and real PostgreSQL for the stream and batch test."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest

from shared.core.aggregation import aggregate
from shared.core.intervals import IntervalSet
from shared.core.trade_messages import encode_trade, parse_trade_message
from shared.core.trades import Rejection, Trade, ts_to_datetime
from shared.store import db
from stream.feeds.produce import FeedMessage
from stream.worker import StreamWorker

from .streaming import (
    expected_candles,
    produce_all,
    reconcile_counts,
    reference_model,
    reset_tables,
    stream_settings,
)
from .streaming import tables as stream_tables

T0_US = 1_767_225_600_000_000  # 2026-01-01T00:00Z
S = 1_000_000


def _value(trade_id, ts_us, price, kind=None, quantity="1"):
    obj = {
        "exchange": "binance-usdm",
        "symbol": "BTCUSDT",
        "trade_id": trade_id,
        "price": price,
        "quantity": quantity,
        "timestamp": ts_us // 1000,
        "is_buyer_maker": trade_id % 2 == 0,
    }
    if kind is not None:
        obj["kind"] = kind
    return json.dumps(obj).encode()


def test_kind_is_parsed_lower_cased_and_written_back_only_when_not_market():
    market = parse_trade_message(_value(1, T0_US, "100"))
    fund = parse_trade_message(_value(2, T0_US, "100", kind="INSURANCE_FUND"))
    assert market.kind == "market" and fund.kind == "insurance_fund"
    assert b'"kind"' not in encode_trade(market)
    assert parse_trade_message(encode_trade(fund)) == fund
    assert parse_trade_message(_value(3, T0_US, "1", kind="Market")).kind == "market"
    bad = parse_trade_message(_value(4, T0_US, "1", kind="adl trade"))
    assert isinstance(bad, Rejection) and bad.code == "bad_kind" and "kind" in bad.reason
    wrong = parse_trade_message(_value(5, T0_US, "1", kind=7))
    assert isinstance(wrong, Rejection) and wrong.code == "wrong_type"


def test_the_core_folds_only_market_trades_but_counts_every_id_once():
    trades = [
        Trade("binance-usdm", "BTCUSDT", 1, T0_US, Decimal("100"), Decimal("1"), False),
        Trade("binance-usdm", "BTCUSDT", 2, T0_US + S, Decimal("50"), Decimal("9"), None, 1, "adl"),
        Trade("binance-usdm", "BTCUSDT", 3, T0_US + 2 * S, Decimal("101"), Decimal("2"), True),
        # a market copy of the ADL trade's id is a duplicate, never folded
        Trade("binance-usdm", "BTCUSDT", 2, T0_US + S, Decimal("50"), Decimal("9"), False),
    ]
    (candle,) = aggregate(trades, IntervalSet.parse("1m"))
    assert (candle.open, candle.high, candle.low, candle.close) == (100, 101, 100, 101)
    assert (candle.volume, candle.trade_count) == (3, 2)
    assert (candle.first_trade_id, candle.last_trade_id) == (1, 3)


def test_aggregate_leaves_non_market_trades_out_of_the_candles(tmp_path):
    path = tmp_path / "usdm.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                _value(1, T0_US, "100"),
                _value(2, T0_US + S, "5", kind="insurance_fund", quantity="40"),
                _value(3, T0_US + 2 * S, "102"),
            ]
        )
        + b"\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "candlekeep", "aggregate", str(path), "--interval", "1m"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert (row["low"], row["volume"], row["trade_count"]) == ("100", "2", 2)


@pytest.mark.integration
def test_stream_and_batch_store_every_kind_and_fold_only_market(database_url, kafka_bootstrap):
    """USD-M-like trades with insurance-fund and ADL trades among them, some in windows of
    their own: every trade is stored with its kind; no candle (stream or batch) holds a
    non-market trade; a window with only non-market trades has no candle; stream = batch; a
    copy that differs only in kind is a conflicting duplicate."""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m")
    messages = []
    kinds_sent: dict[str, int] = {}
    for i in range(1, 301):
        ts = T0_US + i * S
        kind = None
        if i % 17 == 0:
            kind = "insurance_fund"
        elif i % 29 == 0:
            kind = "ADL"
        if 120 <= i < 180:  # the third minute: only insurance-fund trades
            kind = "insurance_fund"
        name = (kind or "market").lower()
        kinds_sent[name] = kinds_sent.get(name, 0) + 1
        price = "1" if kind else str(100 + i % 7)  # non-market prices would show in any candle
        messages.append(FeedMessage(0.0, b"BTCUSDT", _value(i, ts, price, kind), "trade"))
    messages.append(FeedMessage(0.0, b"BTCUSDT", _value(5, T0_US + 5 * S, "104", "adl"), "trade"))
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages)
    asyncio.run(StreamWorker(settings, database_url, kafka_bootstrap, exit_when_idle_s=3.0).run())
    expected = reference_model(deliveries, settings)
    found = stream_tables(database_url)
    with db.connect(database_url) as conn:
        kinds = dict(conn.execute("SELECT kind, count(*) FROM trades GROUP BY 1").fetchall())
        conflicts = conn.execute(
            "SELECT trade_id, first_kind, kind FROM trade_conflicts"
        ).fetchall()
    assert kinds == kinds_sent and set(kinds) == {"market", "insurance_fund", "adl"}
    assert conflicts == [(5, "market", "adl")]
    want = expected_candles(expected, settings, found["progress"])
    got = {(k[0], k[1], k[2], k[3]): v[:-1] for k, v in found["candles"].items()}
    got = {(k[0], k[1], k[2], int(k[3].timestamp()) * S): v for k, v in got.items()}
    assert got == want
    assert all(v[2] > 1 for v in got.values())  # low: no non-market price of 1 in any candle
    third = ("binance-usdm", "BTCUSDT", "1m", T0_US + 120 * S)
    second, fourth = ((*third[:3], third[3] + d * 60 * S) for d in (-1, 1))
    assert third not in got and second in got and fourth in got
    start = ts_to_datetime(T0_US)
    counts = reconcile_counts(database_url, settings, start, start + timedelta(hours=1))
    # Every stream candle equals the batch's (the rest are windows still open in the stream).
    assert counts["match"] == len(got)
    assert counts["unexplained"] == counts["late"] == 0
