"""The streaming worker against a real Kafka-protocol broker and a real PostgreSQL (SPEC §4, §5)."""

from __future__ import annotations

import asyncio
import collections
import random
import subprocess
import sys
import time

import pytest

from shared.core.trades import datetime_to_ts
from shared.store import db
from stream.feeds.produce import FeedMessage
from stream.feeds.synthetic import MarketDials, synthetic_messages
from stream.worker import StreamWorker

from .services import _admin, with_database
from .streaming import (
    expected_candles,
    produce_all,
    reference_model,
    reset_tables,
    settings_env,
    stream_settings,
    tables,
)

pytestmark = pytest.mark.integration


def run_worker(settings, url, bootstrap, idle_s=3.0):
    return asyncio.run(StreamWorker(settings, url, bootstrap, exit_when_idle_s=idle_s).run())


def candles_by_us(found: dict) -> dict:
    return {(k[0], k[1], k[2], datetime_to_ts(k[3])): v[:-1] for k, v in found.items()}


def test_synthetic_run_with_disorder_late_duplicate_and_invalid_messages(
    database_url, kafka_bootstrap
):
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m")
    dials = MarketDials(
        count=20_000, rate=40, disorder=0.1, late=0.01, duplicates=0.03, invalid=0.01, seed=7
    )  # 500 s of event time: 5m windows close too
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, synthetic_messages(dials))
    summary = run_worker(settings, database_url, kafka_bootstrap)
    expected = reference_model(deliveries, settings)
    found = tables(database_url)

    # Conservation: every message consumed is a stored trade, a duplicate, or invalid.
    assert summary.consumed == len(deliveries)
    totals = [sum(row[i] for row in found["progress"].values()) for i in range(2, 7)]
    consumed, stored, duplicates, invalid, late = totals
    assert consumed == len(deliveries) == stored + duplicates + invalid
    assert (stored, duplicates, invalid) == (
        len(expected.stored),
        expected.duplicates,
        len(expected.invalid),
    )
    assert len(found["trades"]) == stored  # late trades are stored too
    assert {(p, o): v[0] for (p, o), v in found["invalid"].items()} == expected.invalid
    # Late trades are exactly those whose base window had closed when they arrived.
    assert {row[:3] for row in found["late"]} == expected.late
    assert late == len(expected.late) > 50
    # Candles equal the core's over the trades that were not late.
    want = expected_candles(expected, settings, found["progress"])
    assert candles_by_us(found["candles"]) == want
    assert {k[2] for k in want} == {"1m", "5m"}
    assert all(v[-1] == 0 for v in found["candles"].values())


def test_rerun_on_the_same_topic_changes_nothing(database_url, kafka_bootstrap):
    reset_tables(database_url)
    settings = stream_settings()
    produce_all(
        kafka_bootstrap, settings.topic_trades, synthetic_messages(MarketDials(count=3000, seed=3))
    )
    run_worker(settings, database_url, kafka_bootstrap)
    before = tables(database_url)
    summary = run_worker(settings, database_url, kafka_bootstrap, idle_s=2.0)
    assert summary.consumed == 0
    after = tables(database_url)
    for name in ("trades", "late", "invalid"):
        assert after[name] == before[name]
    # Offsets and counters unchanged (the watermark may move on: idle advance, SPEC §4).
    assert {k: (v[0], *v[2:]) for k, v in after["progress"].items()} == {
        k: (v[0], *v[2:]) for k, v in before["progress"].items()
    }


FUZZ = [
    (b"BTCUSDT", b"\xff\xfe\xfd", "not_utf8"),
    (b"BTCUSDT", b"", "empty"),
    (b"BTCUSDT", b"not json at all", "not_json"),
    (b"BTCUSDT", b"[" * 100_000 + b"]" * 100_000, "too_large"),
    (b"BTCUSDT", b"[" * 20_000 + b"]" * 20_000, "not_json"),
    (b"BTCUSDT", b'{"a":' * 3000 + b"1" + b"}" * 3000, "not_json"),
    (b"BTCUSDT", b'"just a string"', "not_object"),
    (
        b"BTCUSDT",
        b'{"symbol":"BTCUSDT","trade_id":"9","price":"1","quantity":"1","timestamp":1767225600000}',
        "wrong_type",
    ),
    (
        b"BTCUSDT",
        b'{"symbol":"BTCUSDT","trade_id":9,"price":NaN,"quantity":"1","timestamp":1767225600000}',
        "not_json",
    ),
    (
        b"BTCUSDT",
        b'{"symbol":"BTCUSDT","trade_id":9,"price":"Infinity","quantity":"1",'
        b'"timestamp":1767225600000}',
        "not_finite",
    ),
    (
        b"BTCUSDT",
        b'{"symbol":"BTCUSDT","trade_id":9,"price":"-1","quantity":"1","timestamp":1767225600000}',
        "not_positive",
    ),
    (
        b"BTCUSDT",
        b'{"symbol":"BTCUSDT","trade_id":9,"price":"1","quantity":0,"timestamp":1767225600000}',
        "not_positive",
    ),
    (
        b"BTCUSDT",
        b'{"symbol":"BTCUSDT","trade_id":9,"price":"1","quantity":"1","timestamp":99999999999999}',
        "bad_timestamp",
    ),  # year 5138
    (
        b"BTCUSDT",
        b'{"symbol":"BTCUSDT","trade_id":9,"price":"1","quantity":"1","timestamp":-1000}',
        "bad_timestamp",
    ),
    (
        b"BTCUSDT",
        b'{"symbol":"BTCUSDT","trade_id":9,"price":"1","quantity":"1","timestamp":4000000000000}',
        "bad_timestamp",
    ),  # 2096: beyond the skew
    (
        None,
        b'{"symbol":"BTCUSDT","trade_id":9,"price":"1","quantity":"1","timestamp":1767225600000}',
        "bad_key",
    ),
    (
        b"BTCUSDT",
        b'{"symbol":["BTCUSDT"],"trade_id":9,"price":"1","quantity":"1","timestamp":1767225600000}',
        "wrong_type",
    ),
]


def test_fuzz_corpus_never_stops_the_worker_and_lands_in_invalid_trades(
    database_url, kafka_bootstrap
):
    reset_tables(database_url)
    settings = stream_settings()
    good = list(
        synthetic_messages(
            MarketDials(count=200, symbols=("BTCUSDT",), invalid=0, duplicates=0, late=0, seed=5)
        )
    )
    messages = []
    for n, (key, value, _) in enumerate(FUZZ):
        messages += good[n * 10 : n * 10 + 10]
        messages.append(FeedMessage(0, key, value, "invalid"))
    messages += good[len(FUZZ) * 10 :]
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages, partitions=1)
    summary = run_worker(settings, database_url, kafka_bootstrap)
    found = tables(database_url)
    offsets = [d.offset for d in deliveries if d.message.kind == "invalid"]
    got = {offset: found["invalid"][(0, offset)] for offset in offsets}
    assert [got[o][0] for o in offsets] == [code for _, _, code in FUZZ]
    assert all(len(reason) > 10 for _, reason in got.values())
    assert summary.stored == 200 and summary.invalid == len(FUZZ)
    with db.connect(database_url) as conn:
        raw = conn.execute(
            "SELECT raw, message_key FROM invalid_trades WHERE source_offset = %s", (offsets[0],)
        ).fetchone()
    assert raw == (b"\xff\xfe\xfd", b"BTCUSDT")  # kept raw, byte for byte


@pytest.fixture
def second_database(database_url):
    name = "candlekeep_ref_" + database_url.rsplit("/", 1)[1][-12:]
    server = database_url.rsplit("/", 1)[0] + "/postgres"
    _admin(server, "CREATE DATABASE {}", name)
    yield with_database(database_url, name)
    _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def _total_consumed(url: str) -> int:
    with db.connect(url) as conn:
        row = conn.execute("SELECT coalesce(sum(consumed), 0) FROM stream_progress").fetchone()
    return row[0]


def _consumed_by_partition(url: str) -> dict[int, int]:
    with db.connect(url) as conn:
        rows = conn.execute("SELECT partition, consumed FROM stream_progress").fetchall()
    return dict(rows)


def test_sigkill_at_random_moments_loses_nothing_and_counts_nothing_twice(
    database_url, second_database, kafka_bootstrap
):
    reset_tables(database_url)
    reset_tables(second_database)
    settings = stream_settings(batch_size=300, intervals="1m,5m")
    dials = MarketDials(
        count=60_000, rate=50, disorder=0.1, late=0.005, duplicates=0.02, invalid=0.005, seed=11
    )
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, synthetic_messages(dials))
    env = settings_env(settings, database_url, kafka_bootstrap)
    command = [sys.executable, "-m", "candlekeep", "stream", "--exit-when-idle", "4"]
    rnd = random.Random(1)
    kills = 0
    while kills < 5:
        before = _total_consumed(database_url)
        assert before < len(deliveries), "the run finished before five kills: more messages"
        worker = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while _total_consumed(database_url) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rnd.uniform(0, 0.4))
        worker.kill()
        worker.wait()
        kills += 1
    # Every partition must have messages left for the last run. If a killed worker had read a
    # partition to its end, the restarted one's idle advance would count the time since then
    # (the wall clock moved on: SPEC §4) and close windows that a clean run, exiting after a
    # few idle seconds, leaves open: a difference in timing, not in what was counted.
    sent = collections.Counter(d.partition for d in deliveries)
    trading = {d.partition for d in deliveries if d.message.kind != "invalid"}
    consumed = _consumed_by_partition(database_url)
    assert all(consumed.get(p, 0) < sent[p] for p in trading), "a partition was read to its end"
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    crashed = tables(database_url)

    clean = subprocess.run(
        command,
        env=settings_env(settings, second_database, kafka_bootstrap),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stderr
    reference = tables(second_database)

    assert sum(row[2] for row in crashed["progress"].values()) == len(deliveries)
    for name in ("trades", "candles", "invalid"):
        assert crashed[name] == reference[name], name
    assert {r[:3] for r in crashed["late"]} == {r[:3] for r in reference["late"]}
    strip = {k: (v[0], *v[2:]) for k, v in crashed["progress"].items()}
    assert strip == {k: (v[0], *v[2:]) for k, v in reference["progress"].items()}


async def _trickle(settings, url, bootstrap, count: int, spacing_s: float) -> tuple[int, float]:
    """Run a worker, send ``count`` trades of one symbol ``spacing_s`` apart once it has its
    partitions; return its batches written (``candlekeep_batch_commit_seconds``) and consumed."""
    from aiokafka import AIOKafkaProducer
    from prometheus_client import REGISTRY

    from stream.feeds.produce import ensure_topic

    await ensure_topic(bootstrap, settings.topic_trades, 4)
    worker = StreamWorker(settings, url, bootstrap, exit_when_idle_s=2)
    running = asyncio.create_task(worker.run())
    async with asyncio.timeout(30):
        while not worker.partitions or worker._pending:
            await asyncio.sleep(0.05)
    batches = "candlekeep_batch_commit_seconds_count"
    before = REGISTRY.get_sample_value(batches) or 0.0
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        for n in range(count):
            value = (
                f'{{"symbol": "BTCUSDT", "trade_id": {n}, "price": "100.5", "quantity": "0.1",'
                f' "timestamp": {now_ms + n}}}'
            )
            await producer.send_and_wait(settings.topic_trades, value.encode(), key=b"BTCUSDT")
            await asyncio.sleep(spacing_s)
    finally:
        await producer.stop()
    summary = await running
    return int((REGISTRY.get_sample_value(batches) or 0.0) - before), summary.consumed


def test_a_live_trickle_is_written_in_batches_gathered_for_the_linger(
    database_url, kafka_bootstrap
):
    """Trades arriving one by one are gathered for CANDLEKEEP_STREAM_LINGER from the first
    one, then written together in one transaction (each transaction has fixed costs); with no
    linger each fetch is written as it comes."""
    reset_tables(database_url)
    gathered = stream_settings(stream_linger="2s")
    written, consumed = asyncio.run(_trickle(gathered, database_url, kafka_bootstrap, 5, 0.2))
    assert consumed == 5
    assert written == 1
    reset_tables(database_url)
    each = stream_settings(stream_linger="0")
    written, consumed = asyncio.run(_trickle(each, database_url, kafka_bootstrap, 5, 0.2))
    assert consumed == 5
    assert written >= 3


def test_a_fetch_error_while_gathering_is_handled_after_the_gathered_trades_are_written(
    database_url, kafka_bootstrap, monkeypatch
):
    """A fetch error met while a batch gathers (here the broker's "offset out of range" for a
    position it does have: a fault injected once, into the real consumer) does not lose what was
    fetched before it: those trades are written, the error is handled by the next fetch (the
    position is checked against the log, found valid, and reading goes on), nothing is skipped,
    no reset is recorded."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import OffsetOutOfRangeError

    settings = stream_settings(stream_linger="2s")
    real_getmany = AIOKafkaConsumer.getmany
    injected = []

    async def getmany(self, *partitions, timeout_ms=0, max_records=None):
        gathering = max_records is not None and max_records < settings.batch_size
        if gathering and not injected:  # (raised before fetching, as aiokafka does)
            tp = next(iter(sorted(self.assignment())))
            position = await self.position(tp)
            injected.append((tp, position))
            raise OffsetOutOfRangeError({tp: position})
        return await real_getmany(self, *partitions, timeout_ms=timeout_ms, max_records=max_records)

    reset_tables(database_url)
    monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)
    written, consumed = asyncio.run(_trickle(settings, database_url, kafka_bootstrap, 5, 0.2))
    assert injected, "the fault was never injected: no batch gathered"
    assert consumed == 5
    with db.connect(database_url) as conn:
        stored = conn.execute("SELECT count(*), count(DISTINCT trade_id) FROM trades").fetchone()
        resets = conn.execute("SELECT count(*) FROM offset_resets").fetchone()[0]
        skipped = conn.execute("SELECT coalesce(sum(skipped), 0) FROM stream_progress").fetchone()
    assert stored == (5, 5)
    assert resets == 0 and skipped[0] == 0
    assert written >= 2  # what was gathered before the error, then the rest


def test_a_quiet_stream_commits_its_last_offsets_to_kafka_for_lag_tools(
    database_url, kafka_bootstrap
):
    """The group's offsets in Kafka (what lag tools read; the worker resumes from PostgreSQL)
    are sent at most once a second; when the stream goes quiet the last ones still go out
    within about that second, while the worker runs, so a quiet stream shows no lag."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from stream.feeds.produce import ensure_topic

    reset_tables(database_url)
    settings = stream_settings()

    async def run() -> tuple[dict, dict]:
        await ensure_topic(kafka_bootstrap, settings.topic_trades, 4)
        worker = StreamWorker(settings, database_url, kafka_bootstrap, exit_when_idle_s=6)
        running = asyncio.create_task(worker.run())
        async with asyncio.timeout(30):
            while not worker.partitions or worker._pending:
                await asyncio.sleep(0.05)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        now_ms = int(time.time() * 1000)
        try:
            for n in range(3):
                value = (
                    f'{{"symbol": "BTCUSDT", "trade_id": {n}, "price": "100.5",'
                    f' "quantity": "0.1", "timestamp": {now_ms + n}}}'
                )
                await producer.send_and_wait(settings.topic_trades, value.encode(), key=b"BTCUSDT")
                await asyncio.sleep(0.3)
        finally:
            await producer.stop()
        await asyncio.sleep(2.5)  # quiet: no batch since, the worker still running
        assert not running.done()
        reader = AIOKafkaConsumer(
            bootstrap_servers=kafka_bootstrap,
            group_id=settings.consumer_group,
            enable_auto_commit=False,
        )
        await reader.start()
        try:
            tps = [TopicPartition(settings.topic_trades, p) for p in range(4)]
            ends = await reader.end_offsets(tps)
            committed = {tp: await reader.committed(tp) for tp in tps}
        finally:
            await reader.stop()
        await running
        return ends, committed

    ends, committed = asyncio.run(run())
    busy = [tp for tp, end in ends.items() if end]
    assert sum(ends[tp] for tp in busy) == 3
    assert {tp: committed[tp] for tp in busy} == {tp: ends[tp] for tp in busy}
