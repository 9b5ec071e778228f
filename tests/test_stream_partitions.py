"""One symbol on several partitions (SPEC §4, §5): a producer keys some of a symbol's trades
``btcusdt`` and others ``BTCUSDT``, so the partitioner sends them to two partitions. Each
partition's watermark governs its own trades; the symbol still gets exactly one candle per window
holding every on-time trade, whichever workers and writer connections wrote the parts, and
however often a worker was killed.

Real Kafka-protocol broker, real PostgreSQL. After each run: the stream's candles equal the
core's over the on-time trades (each partition's closed windows, merged), every message is
counted once, reconciliation finds nothing unexplained, and a consumer of the ``candles`` topic
that keeps the highest revision of each key ends with ``stream_candles``.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta

import pytest
from aiokafka.partitioner import murmur2

from shared.trades import datetime_to_ts, ts_to_datetime
from stream.feeds.synthetic import MarketDials, synthetic_messages
from stream.worker import StreamWorker

from .streaming import (
    expected_candles,
    latest_candles,
    produce_all,
    reconcile_counts,
    reference_model,
    rekey,
    reset_tables,
    settings_env,
    stream_candle_messages,
    stream_settings,
    tables,
)
from .test_stream_operations import PacedProducer, assignments, wait_until, workers  # noqa: F401

pytestmark = pytest.mark.integration

MINUTE = 60_000_000
START = 1_767_225_600_000_000  # the synthetic market's start: 2026-01-01T00:00:00Z


def partition_of(key: bytes, partitions: int) -> int:
    """Where the producer's default partitioner sends ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def feed(count: int = 12_000, seed: int = 5, rate: float = 20) -> list:
    """A synthetic market (BTCUSDT, ETHUSDT, SOLUSDT; disorder, late, duplicate and invalid
    messages), every other block of a symbol's trade ids keyed in lower case."""
    dials = MarketDials(
        count=count, rate=rate, disorder=0.1, late=0.005, duplicates=0.02, invalid=0.005, seed=seed
    )
    return rekey(synthetic_messages(dials))


def check_run(url: str, bootstrap: str, settings, deliveries, consumed: int | None = None):
    """Everything a run must end with (see the module docstring); returns the tables."""
    expected = reference_model(deliveries, settings)
    found = tables(url)
    # Conservation: every message consumed is a stored trade, a duplicate or invalid, once.
    totals = [sum(row[i] for row in found["progress"].values()) for i in range(2, 7)]
    total, stored, duplicates, invalid, late = totals
    assert total == len(deliveries) == stored + duplicates + invalid
    if consumed is not None:
        assert consumed == len(deliveries)
    assert (stored, duplicates, invalid) == (
        len(expected.stored),
        expected.duplicates,
        len(expected.invalid),
    )
    assert {row[:3] for row in found["late"]} == expected.late and late == len(expected.late)
    # One candle per key, each the merge of every partition's on-time trades of its window.
    want = expected_candles(expected, settings, found["progress"])
    got = {(k[0], k[1], k[2], datetime_to_ts(k[3])): v[:-1] for k, v in found["candles"].items()}
    assert got == want
    # Reconciliation over the windows every partition has closed: nothing unexplained.
    closed = min(datetime_to_ts(row[1]) for row in found["progress"].values() if row[1])
    end = closed - closed % (5 * MINUTE)
    assert end >= START + 5 * MINUTE, "the stream closed no whole 5 minutes: more messages"
    counts = reconcile_counts(url, settings, ts_to_datetime(START), ts_to_datetime(end))
    assert counts["unexplained"] == 0 and counts["missing_in_stream"] == 0, counts
    assert counts["match"] + counts["late"] >= 3 * 6, counts  # 3 symbols: 5 1m, one 5m
    # The candles topic: the highest revision of each key is the stored, merged candle.
    assert latest_candles(bootstrap, settings.topic_candles) == stream_candle_messages(url)
    return found, expected


def run_worker(settings, url, bootstrap, idle_s=3.0):
    return asyncio.run(StreamWorker(settings, url, bootstrap, exit_when_idle_s=idle_s).run())


@pytest.mark.parametrize("partitions", [4, 1])
def test_a_symbol_keyed_in_two_casings_gets_one_candle_with_every_trade(
    database_url, kafka_bootstrap, partitions
):
    """(4 partitions: BTCUSDT and ETHUSDT each land on two; 1 partition: nothing changes.)"""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m", stream_writers=2)
    messages = feed()
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages, partitions)
    spread = {}
    for d in deliveries:
        if d.message.kind != "invalid" and d.message.key:
            spread.setdefault(d.message.key.upper(), set()).add(d.partition)
    assert spread[b"BTCUSDT"] == ({2, 3} if partitions == 4 else {0})
    summary = run_worker(settings, database_url, kafka_bootstrap)
    found, expected = check_run(
        database_url, kafka_bootstrap, settings, deliveries, summary.consumed
    )
    # The repro of issue 11: the first minute's BTCUSDT candle holds both keys' trades.
    first = ("binance", "BTCUSDT", "1m", START)
    trades = [
        t for t in expected.on_time if (t.symbol, t.ts_us // MINUTE) == ("BTCUSDT", START // MINUTE)
    ]
    row = found["candles"][(*first[:3], ts_to_datetime(START))]
    assert row[6] == len(trades) > 100  # trade_count
