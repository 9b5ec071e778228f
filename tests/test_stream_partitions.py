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

import pytest

from shared.core.trades import datetime_to_ts, ts_to_datetime
from stream.feeds.synthetic import MarketDials, synthetic_messages
from stream.worker import StreamWorker

from . import test_stream_operations as operations
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
from .test_stream_operations import PacedProducer, assignments, wait_until

workers = operations.workers  # (the fixture: worker subprocesses, killed if left running)

pytestmark = pytest.mark.integration

MINUTE = 60_000_000
START = 1_767_225_600_000_000  # the synthetic market's start: 2026-01-01T00:00:00Z


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


def test_two_workers_each_with_a_partition_of_the_same_symbol(
    database_url, kafka_bootstrap, workers
):
    """Two workers in one group, one partition each, both holding BTCUSDT and ETHUSDT: every
    window's two parts are written by two workers at the same time."""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m")
    asyncio.run(_ensure_topic(kafka_bootstrap, settings.topic_trades, 2))
    env = settings_env(settings, database_url, kafka_bootstrap)
    a = workers(env, "--exit-when-idle", "6")
    b = workers(env, "--exit-when-idle", "6")

    def split():
        got = [assignments(w)[-1:] for w in (a, b)]
        return all(g and len(g[0]) == 1 for g in got) and got[0][0] != got[1][0]

    wait_until(split, 30, "the group to give each worker one partition")
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, feed(), 2)
    assert {d.partition for d in deliveries if d.message.key == b"btcusdt"} == {1}
    assert {d.partition for d in deliveries if d.message.key == b"BTCUSDT"} == {0}
    a_summary, b_summary = a.finish(), b.finish()
    assert a_summary["consumed"] > 0 and b_summary["consumed"] > 0
    assert a_summary["consumed"] + b_summary["consumed"] == len(deliveries)
    check_run(database_url, kafka_bootstrap, settings, deliveries)


def test_a_worker_killed_during_a_rebalance_counts_no_part_twice(
    database_url, kafka_bootstrap, workers
):
    """A live stream on four partitions, BTCUSDT and ETHUSDT on two each. A second worker joins;
    the first is killed -9 while the group rebalances; the survivor takes every partition over
    from what was committed, and rewrites the parts the killed one had not committed."""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m", batch_size=250)
    # 16,000 trades over 800 s of event time, sent in about 11 s.
    producer = PacedProducer(kafka_bootstrap, settings.topic_trades, feed(16_000, seed=9), 1500)
    env = settings_env(settings, database_url, kafka_bootstrap)
    a = workers(env, "--exit-when-idle", "4")
    wait_until(lambda: bool(a.events("partitions loaded")), 30, "A to load its partitions")
    wait_until(lambda: tables(database_url)["progress"], 30, "A to commit a batch")
    b = workers(env, "--exit-when-idle", "4")
    wait_until(lambda: a.events("partitions revoked"), 30, "the group to rebalance")
    a.process.send_signal(signal.SIGKILL)
    a.process.wait()
    assert producer.is_alive(), "the stream ended before the kill: slow it down"
    wait_until(lambda: assignments(b) and assignments(b)[-1] == {0, 1, 2, 3}, 30, "B to take all")
    deliveries = producer.result()
    b.finish()
    check_run(database_url, kafka_bootstrap, settings, deliveries)


async def _ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from stream.feeds.produce import ensure_topic

    await ensure_topic(bootstrap, topic, partitions)
