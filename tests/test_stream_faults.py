"""The stream worker under real faults (issue 11): offset resets and killed connections.

A broker of the test's own is stopped and started again on the same port: the embedded Tansu
broker keeps its log in memory, so a restart loses it, as a Kafka cluster that lost its storage
or a topic deleted and recreated would. The worker's positions in PostgreSQL then lie beyond the
new log's end, or in a new log that already holds other messages there. SPEC §4 "Offset resets":
never silent, recorded in ``offset_resets``, logged as an error, counted in the metrics, and the
report of every interval the reset may have touched names it and is not ``pass``.

Every check is what an operator sees: the table, the metric, the log line, the exit status, the
counts in ``stream_progress`` and the report; the candles are compared with an independent
model over the messages the worker could read (those before the reset's stored offset in the
lost log, then the new log).
"""

# ruff: noqa: F811  (pytest fixtures imported from test_stream_operations, used as arguments)

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import signal
import time
import uuid
from datetime import UTC, datetime

import pytest

from candlekeep.embedded import EmbeddedBroker
from shared.batch.batch_run import run_period
from shared.core.trade_messages import parse_trade_message
from shared.core.trades import Rejection, datetime_to_ts, ts_to_datetime
from shared.store import db
from stream.feeds.produce import Delivery, ensure_topic
from stream.feeds.synthetic import MarketDials, synthetic_messages

from .services import TEST_DATA_DIR
from .streaming import expected_candles, produce_all, reference_model, reset_tables, tables
from .test_stream_operations import (  # noqa: F401  (fixtures: workers, second_database)
    SYMBOLS,
    assert_same_final_state,
    consumed,
    free_port,
    operations_settings,
    reference_run,
    scrape,
    second_database,
    wait_until,
    worker_env,
    workers,
)

pytestmark = pytest.mark.integration

HOUR_US = 3_600_000_000
T0_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


def feed(count: int, seed: int, start_us: int = T0_US):
    """A synthetic market: 40 trades a second of event time, with disorder, late, duplicate
    and invalid messages. Trade ids start at 1 in each feed: the feeds after a restart trade
    on another venue (``binance-usdm``, same symbols, so the same partitions), so that their
    trades are new ones, as a live feed's would be."""
    dials = MarketDials(
        exchange="binance" if start_us == T0_US else "binance-usdm",
        symbols=SYMBOLS,
        count=count,
        rate=40,
        start_us=start_us,
        disorder=0.1,
        late=0.005,
        duplicates=0.02,
        invalid=0.01,
        seed=seed,
    )
    return list(synthetic_messages(dials))


class RestartableBroker:
    """An embedded broker on a fixed port that can be restarted there, losing its log."""

    def __init__(self):
        self.data_dir = TEST_DATA_DIR / f"faults-broker-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.broker = EmbeddedBroker(self.data_dir, port=self.port).start()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart(self, settings) -> None:
        """Stop, start on the same port (empty), and create the topics again at once, the
        trades topic with its 4 partitions (before a running worker's metadata requests could
        create it otherwise) and the worker's output topics, as whoever creates them would."""
        self.broker.stop()
        self.broker = EmbeddedBroker(self.data_dir, port=self.port).start()
        for topic in (
            settings.topic_trades,
            settings.topic_candles,
            settings.topic_late,
            settings.topic_invalid,
        ):
            asyncio.run(ensure_topic(self.bootstrap, topic, 4))

    def stop(self) -> None:
        self.broker.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def broker():
    restartable = RestartableBroker()
    try:
        yield restartable
    finally:
        restartable.stop()


def resets(url: str) -> dict[int, dict]:
    """``offset_resets`` by partition (one row each in these tests)."""
    with db.connect(url) as conn:
        cur = conn.execute(
            "SELECT partition, id, kind, stored_offset, log_start_offset, log_end_offset,"
            " skipped, policy, watermark, resumed_at, detected_at FROM offset_resets"
            " ORDER BY partition"
        )
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    by_partition = {row["partition"]: row for row in rows}
    assert len(by_partition) == len(rows), rows
    return by_partition


def next_offsets(url: str) -> dict[int, int]:
    return {p: row[0] for p, row in tables(url)["progress"].items()}


def first_trade_ts(deliveries: list[Delivery], partition: int) -> datetime:
    """The time of the first valid trade of ``partition``, in offset order."""
    for d in sorted(deliveries, key=lambda d: d.offset):
        if d.partition == partition:
            trade = parse_trade_message(d.message.value)
            if not isinstance(trade, Rejection):
                return ts_to_datetime(trade.ts_us)
    raise AssertionError(f"no trade on partition {partition}")


def model_candles(settings, read_before: dict[int, int], lost_log, new_log, progress) -> dict:
    """The candles a worker must have written when it read ``lost_log`` up to each partition's
    offset in ``read_before``, then all of ``new_log`` (after it in each partition's order)."""
    shift = 10**9
    sequence = [d for d in lost_log if d.offset < read_before.get(d.partition, 0)] + [
        dataclasses.replace(d, offset=d.offset + shift) for d in new_log
    ]
    expected = reference_model(sequence, settings)
    return expected_candles(expected, settings, progress), expected


def stream_candles(found: dict) -> dict:
    return {(k[0], k[1], k[2], datetime_to_ts(k[3])): v[:-1] for k, v in found.items()}


def assert_conservation(url: str, consumed_total: int) -> dict:
    """Every message consumed is a stored trade, a duplicate or invalid; returns the sums."""
    with db.connect(url) as conn:
        row = conn.execute(
            "SELECT sum(consumed), sum(stored), sum(duplicates), sum(invalid), sum(skipped)"
            " FROM stream_progress"
        ).fetchone()
        trades = conn.execute("SELECT count(*) FROM trades").fetchone()[0]
    total, stored, duplicates, invalid, skipped = map(int, row)
    assert total == consumed_total == stored + duplicates + invalid
    assert trades == stored
    return {"stored": stored, "duplicates": duplicates, "invalid": invalid, "skipped": skipped}


def hour(n: int) -> tuple[datetime, datetime]:
    start = datetime.fromtimestamp((T0_US + n * HOUR_US) / 1e6, UTC)
    end = datetime.fromtimestamp((T0_US + (n + 1) * HOUR_US) / 1e6, UTC)
    return start, end


def assert_reports_name_the_resets(url, settings, topic, partitions, hours) -> None:
    """``candlekeep reconcile``'s report of each touched hour is not pass and names each
    reset; an hour after the resets' range is not touched."""
    for n in hours:
        summary = run_period(url, settings, *hour(n))
        assert summary.status != "pass", (n, summary.reasons)
        named = {r.partition for r in summary.offset_resets}
        assert named == set(partitions), n
        for partition in partitions:
            line = f"offset reset on {topic} partition {partition} at "
            assert any(r.startswith(line) for r in summary.reasons), summary.reasons
    untouched = run_period(url, settings, *hour(max(hours) + 2))
    assert untouched.offset_resets == []


# -- 1. the broker lost its log between two runs ------------------------------------------------


def test_broker_restarted_between_runs_resets_are_recorded_and_nothing_new_is_skipped(
    broker, database_url, workers
):
    """Run 1 reads hour 0. The broker restarts (its log is lost) and a feed sends hour 1, more
    messages per partition than before, so the new log already reaches past the stored
    offsets. Run 2 must notice that the message before each stored offset is another one, say
    so, and read the new log from its start: every message of hour 1 is consumed."""
    reset_tables(database_url)
    settings = operations_settings()
    topic = settings.topic_trades
    env = worker_env(settings, database_url, broker.bootstrap)
    first_log = produce_all(broker.bootstrap, topic, feed(1600, seed=31))
    first = workers(env, "--exit-when-idle", "3").finish()
    assert first["consumed"] == len(first_log)
    before = next_offsets(database_url)
    watermarks = {p: row[1] for p, row in tables(database_url)["progress"].items()}

    broker.restart(settings)
    new_log = produce_all(broker.bootstrap, topic, feed(4000, seed=32, start_us=T0_US + HOUR_US))
    new_sizes = {p: sum(1 for d in new_log if d.partition == p) for p in before}
    assert all(new_sizes[p] > before[p] for p in before), "the new log must reach past"
    port = free_port()
    worker = workers(env, "--metrics-port", str(port))
    wait_until(
        lambda: consumed(database_url) == len(first_log) + len(new_log),
        60,
        "every message of the new log consumed",
    )
    samples = scrape(port)
    worker.signal(signal.SIGTERM)
    second = worker.finish(timeout=20)

    # The resets: one per partition, with what an operator needs.
    found = resets(database_url)
    assert found.keys() == before.keys()
    for partition, row in found.items():
        assert row["kind"] == "replaced"
        assert row["stored_offset"] == before[partition]
        assert row["log_start_offset"] == 0 and row["skipped"] == 0
        assert row["log_end_offset"] == new_sizes[partition]
        assert row["policy"] == "earliest"
        assert row["watermark"] == watermarks[partition]
        assert row["resumed_at"] == first_trade_ts(new_log, partition)
        label = f'candlekeep_offset_resets_total{{kind="replaced",partition="{partition}"}}'
        assert samples[label] == 1
    errors = worker.events("offset reset")
    assert sorted(e["partition"] for e in errors) == sorted(before)
    assert all(e["level"] == "error" and e["kind"] == "replaced" for e in errors)

    # Conservation, run by run and in stream_progress; nothing skipped that the log still had.
    assert second["consumed"] == len(new_log)
    assert second["resets"] == len(before) and second["skipped"] == 0
    sums = assert_conservation(database_url, len(first_log) + len(new_log))
    assert sums["skipped"] == 0

    # Candles: those of the model over both logs, in each partition's order.
    progress = tables(database_url)["progress"]
    want, _ = model_candles(settings, before, first_log, new_log, progress)
    assert stream_candles(tables(database_url)["candles"]) == want
    assert len(want) > 20

    assert_reports_name_the_resets(database_url, settings, topic, before, hours=(0, 1))


# -- 2. the broker lost its log under a running worker ------------------------------------------


def test_broker_restarted_under_a_running_worker_resets_from_the_new_logs_start(
    broker, database_url, workers
):
    """The broker restarts while the worker is reading hour 0 (the unread rest of it is lost
    with the broker) and the feed then sends a shorter hour 1: the worker's positions lie
    beyond the new log's end. It neither waits forever nor reports itself caught up with
    messages unread: it records the resets and reads the new log from its start."""
    reset_tables(database_url)
    settings = operations_settings()
    topic = settings.topic_trades
    env = worker_env(settings, database_url, broker.bootstrap)
    first_log = feed(16_000, seed=33)
    head = produce_all(broker.bootstrap, topic, first_log[:2000])
    port = free_port()
    worker = workers(env, "--exit-when-idle", "4", "--metrics-port", str(port))
    wait_until(lambda: consumed(database_url) == len(head), 60, "the first messages consumed")
    # The rest of the hour arrives while the worker's writes wait (a lock on trades, as a slow
    # disk would make them wait): the restart finds it fetched at most, not committed.
    with db.connect(database_url) as lock:
        lock.execute("LOCK TABLE trades IN SHARE MODE")
        rest = produce_all(broker.bootstrap, topic, first_log[2000:])
        wait_until(lambda: worker.events("partitions loaded"), 10, "the worker running")
        time.sleep(1)  # (fetching)
        broker.restart(settings)
        at_restart = consumed(database_url)
        new_log = produce_all(broker.bootstrap, topic, feed(600, seed=34, start_us=T0_US + HOUR_US))
        lock.rollback()
    first_log = head + rest
    try:
        wait_until(lambda: len(resets(database_url)) == 4, 40, "the resets to be recorded")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the worker's log:\n{worker.log_tail()}") from None
    samples = scrape(port)
    summary = worker.finish(timeout=60)

    found = resets(database_url)
    read_before = {p: row["stored_offset"] for p, row in found.items()}
    new_sizes = {p: sum(1 for d in new_log if d.partition == p) for p in found}
    lost = len(first_log) - sum(read_before.values())
    assert lost > 0 and at_restart < len(first_log), "the restart came too late to lose any"
    for partition, row in found.items():
        assert row["kind"] == "beyond_end", row
        assert row["log_end_offset"] == new_sizes[partition] < row["stored_offset"]
        assert row["skipped"] == 0 and row["policy"] == "earliest"
        assert row["resumed_at"] == first_trade_ts(new_log, partition)
        label = f'candlekeep_offset_resets_total{{kind="beyond_end",partition="{partition}"}}'
        assert samples[label] == 1
    errors = worker.events("offset reset")
    assert sorted(e["partition"] for e in errors) == sorted(found)
    assert all(e["level"] == "error" for e in errors)

    # Every message read is counted; what the broker lost unread is what the resets name.
    sums = assert_conservation(database_url, sum(read_before.values()) + len(new_log))
    assert summary["consumed"] == sum(read_before.values()) + len(new_log)
    assert sums["skipped"] == summary["skipped"] == 0
    assert summary["resets"] == 4

    progress = tables(database_url)["progress"]
    assert {p: row[0] for p, row in progress.items()} == new_sizes
    want, _ = model_candles(settings, read_before, first_log, new_log, progress)
    assert stream_candles(tables(database_url)["candles"]) == want

    assert_reports_name_the_resets(database_url, settings, topic, found, hours=(0, 1))


# -- 3. CANDLEKEEP_OFFSET_RESET=fail ------------------------------------------------------------


def test_fail_policy_stops_with_one_line_records_the_reset_and_commits_nothing(
    broker, database_url, workers
):
    """With ``fail`` the worker records the reset and exits 1 with one line that says what
    happened and what to do; nothing of the new log is committed. Restarted with ``earliest``
    it goes on, and the reset it stopped at is still one row."""
    reset_tables(database_url)
    settings = operations_settings()
    topic = settings.topic_trades
    env = worker_env(settings, database_url, broker.bootstrap)
    first_log = produce_all(broker.bootstrap, topic, feed(1600, seed=35))
    workers(env, "--exit-when-idle", "3").finish()
    before = tables(database_url)
    broker.restart(settings)
    new_log = produce_all(broker.bootstrap, topic, feed(800, seed=36, start_us=T0_US + HOUR_US))

    stopping = workers({**env, "CANDLEKEEP_OFFSET_RESET": "fail"}, "--exit-when-idle", "3")
    assert stopping.wait(timeout=60) == 1, stopping.log_tail()
    plain = [line for line in stopping.lines() if not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith("Error: partition "), plain
    assert f"of topic {topic}: stored offset" in plain[0]
    assert "CANDLEKEEP_OFFSET_RESET=earliest" in plain[0] and "Traceback" not in plain[0]
    found = resets(database_url)
    assert len(found) == 1
    ((partition, row),) = found.items()
    assert row["policy"] == "fail" and row["resumed_at"] is None
    assert row["stored_offset"] == before["progress"][partition][0]
    assert stopping.events("offset reset")[0]["level"] == "error"
    # Nothing committed past it: the same offsets, counts, trades and candles as before.
    after = tables(database_url)
    for name in ("trades", "candles", "progress", "invalid", "late"):
        assert after[name] == before[name], name
    # The reports of the hours it may have touched say so (open-ended: nothing read since).
    assert run_period(database_url, settings, *hour(1)).status != "pass"

    going_on = workers(env, "--exit-when-idle", "3").finish()
    assert going_on["consumed"] == len(new_log)
    found = resets(database_url)
    assert found[partition]["id"] == row["id"] and found[partition]["policy"] == "earliest"
    assert len(found) == len(before["progress"])
    assert_conservation(database_url, len(first_log) + len(new_log))


# -- 4. PostgreSQL connections killed mid-batch ------------------------------------------------


def test_worker_connections_terminated_mid_batch_recovers_and_loses_nothing(
    database_url, second_database, kafka_bootstrap, workers
):
    """``pg_terminate_backend`` on every connection of the worker, three times while it reads
    a backlog: it retries, reconnects, and ends with the tables of a clean run."""
    reset_tables(database_url)
    reset_tables(second_database)
    settings = operations_settings()
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, feed(16_000, seed=37))
    produced = len(deliveries)
    reference = reference_run(workers, settings, second_database, kafka_bootstrap)
    worker = workers(worker_env(settings, database_url, kafka_bootstrap), "--exit-when-idle", "3")
    killed = 0
    for share in (0.2, 0.4, 0.6):
        wait_until(lambda s=share: consumed(database_url) >= produced * s, 60, f"{share:.0%}")
        with db.connect(database_url, autocommit=True) as conn:
            killed += conn.execute(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()) t"
            ).fetchone()[0]
        time.sleep(0.3)
    assert killed >= 3 and consumed(database_url) < produced, "the run ended too soon"
    summary = worker.finish()
    reference.finish()
    assert summary["retries"] >= 1 and worker.events("database connection restored")
    assert summary["consumed"] == produced
    assert_same_final_state(database_url, second_database, produced)


# -- 5. retention deleted unread messages --------------------------------------------------------


def test_retention_before_the_stored_offset_is_a_reset_that_counts_what_it_skipped(
    broker, database_url, monkeypatch
):
    """Messages deleted by retention before the worker read them. The embedded broker cannot
    delete records (its DeleteRecords closes the connection and the log start stays 0), so the
    fault is injected at the one place the worker learns the log start: the broker's answer
    says the log now starts 50 messages after each stored offset. Everything else is real: the
    worker records the resets, skips exactly those messages, counts them, and the report of the
    hour fails (messages were lost) naming each reset."""
    from stream.worker import StreamWorker

    reset_tables(database_url)
    settings = operations_settings()
    topic = settings.topic_trades
    first_log = produce_all(broker.bootstrap, topic, feed(1600, seed=38))
    asyncio.run(StreamWorker(settings, database_url, broker.bootstrap, exit_when_idle_s=2).run())
    before = next_offsets(database_url)
    more = produce_all(broker.bootstrap, topic, feed(1600, seed=39, start_us=T0_US + 60_000_000))
    deleted = 50
    real_bounds = StreamWorker._log_bounds

    async def after_retention(self, tp):
        first, end = await real_bounds(self, tp)
        return max(first, before[tp.partition] + deleted), end

    monkeypatch.setattr(StreamWorker, "_log_bounds", after_retention)
    summary = asyncio.run(
        StreamWorker(settings, database_url, broker.bootstrap, exit_when_idle_s=2).run()
    )

    found = resets(database_url)
    assert found.keys() == before.keys()
    for partition, row in found.items():
        assert row["kind"] == "before_start" and row["skipped"] == deleted
        assert row["stored_offset"] == before[partition]
        assert row["log_start_offset"] == before[partition] + deleted
    skipped = deleted * len(before)
    assert summary.resets == len(before) and summary.skipped == skipped
    assert summary.consumed == len(more) - skipped
    sums = assert_conservation(database_url, len(first_log) + len(more) - skipped)
    assert sums["skipped"] == skipped
    report = run_period(database_url, settings, *hour(0))
    assert report.status == "fail"
    assert sum("deleted by retention" in r for r in report.reasons) == len(before)
