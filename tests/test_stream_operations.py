"""Operational acceptance of ``candlekeep stream``: what an operator sees and relies on.

Real subprocesses against a real Kafka-protocol broker and a real PostgreSQL; the faults are
real too (a second worker joining, SIGTERM/SIGINT, PostgreSQL stopped and started again, the
broker frozen with SIGSTOP). After every fault the final tables must equal those of a clean
single-worker run over the same messages into another database, and every message produced must
be counted exactly once: consumed = stored + duplicates + invalid = produced.

Settings: ``max_delay`` is 30 s here (the default is 5 s). The worker's idle advance lets the
watermark follow the wall clock on a caught-up partition, so with a short max_delay how long a
partition sat idle at the end decides whether its last window closed; a long one keeps the final
state independent of those timings, which is what lets two runs be compared table for table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from candlekeep.embedded import EmbeddedBroker, EmbeddedPostgres
from shared.store import db
from stream.feeds.produce import ensure_topic, produce
from stream.feeds.synthetic import MarketDials, synthetic_messages

from .services import TEST_DATA_DIR, _admin, with_database
from .streaming import produce_all, reset_tables, settings_env, stream_settings, tables

pytestmark = pytest.mark.integration

ALL = {0, 1, 2, 3}  # the topics' partitions
#: Eight symbols, so that every one of the four partitions gets some (three may leave one empty).
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "BNBUSDT", "LTCUSDT")


def operations_settings(**overrides):
    values = dict(max_delay="30", intervals="1m,5m", batch_size=250)
    values.update(overrides)
    return stream_settings(**values)


def worker_env(settings, database_url: str, bootstrap: str) -> dict[str, str]:
    env = settings_env(settings, database_url, bootstrap)
    env.update(
        CANDLEKEEP_INTERVALS=settings.intervals,
        CANDLEKEEP_MAX_DELAY=str(settings.max_delay.total_seconds()),
    )
    return env


def messages(count: int, seed: int):
    dials = MarketDials(
        symbols=SYMBOLS,
        count=count,
        rate=40,
        disorder=0.1,
        late=0.005,
        duplicates=0.02,
        invalid=0.01,
        seed=seed,
    )
    return list(synthetic_messages(dials))


class Worker:
    """``candlekeep stream`` in a subprocess; stderr (JSON log lines) goes to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "candlekeep", "stream", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def lines(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.strip()]

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.lines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    out.append(event)
        return out

    def signal(self, sig: int) -> float:
        """Send ``sig``; returns when it was sent (monotonic)."""
        self.process.send_signal(sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the worker did not exit within {timeout} s; its log:\n" + self.log_tail()
            ) from None

    def finish(self, timeout: float = 120) -> dict:
        """Wait for a clean exit; return the final ``worker stopped`` event (the run's counts)."""
        code = self.wait(timeout)
        assert code == 0, f"exit status {code}; log:\n{self.log_tail()}"
        return self.summary()

    def summary(self) -> dict:
        stopped = self.events("worker stopped")
        assert len(stopped) == 1, self.log_tail()
        return stopped[0]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines()[-lines:])


@pytest.fixture
def workers(tmp_path):
    """Start workers; any still running at the end of the test is killed."""
    started: list[Worker] = []

    def start(env: dict[str, str], *args: str) -> Worker:
        worker = Worker(env, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


@pytest.fixture
def second_database(database_url):
    name = "candlekeep_ops_" + database_url.rsplit("/", 1)[1][-12:]
    server = database_url.rsplit("/", 1)[0] + "/postgres"
    _admin(server, "CREATE DATABASE {}", name)
    yield with_database(database_url, name)
    _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def consumed(url: str, partitions=None) -> int:
    with db.connect(url) as conn:
        rows = conn.execute("SELECT partition, consumed FROM stream_progress").fetchall()
    return sum(n for p, n in rows if partitions is None or p in partitions)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference_run(workers, settings, database_url: str, bootstrap: str) -> Worker:
    """A clean single-worker run over the same topic, into another database (its own group)."""
    clean = settings.model_copy(update={"consumer_group": settings.consumer_group + "-clean"})
    return workers(worker_env(clean, database_url, bootstrap), "--exit-when-idle", "3")


def assert_same_final_state(url: str, reference_url: str, produced: int) -> None:
    found, reference = tables(url), tables(reference_url)
    # Every message counted exactly once.
    totals = [sum(row[i] for row in found["progress"].values()) for i in range(2, 7)]
    total_consumed, stored, duplicates, invalid, late = totals
    assert total_consumed == produced == stored + duplicates + invalid
    assert len(found["trades"]) == stored and invalid > 0 and duplicates > 0 and late > 0
    # ... and the same tables as the clean run, row for row.
    for name in ("trades", "candles", "late", "invalid"):
        assert found[name] == reference[name], name
    assert len(found["candles"]) > 50
    # Progress too, but the final watermark: the idle advance sets it from the wall clock.
    strip = {p: (row[0], *row[2:]) for p, row in found["progress"].items()}
    assert strip == {p: (row[0], *row[2:]) for p, row in reference["progress"].items()}


def assignments(worker: Worker) -> list[set[int]]:
    return [set(e["partitions"]) for e in worker.events("partitions assigned")]


# -- 1. two workers in one group --------------------------------------------------------------


class PacedProducer(threading.Thread):
    """Produces ``rate`` messages a second in the background: a live stream that is still
    flowing while workers join and leave. (An even rate, not the feed's own pace: its late
    trades trickle in at the end, and a partition quiet for a second is advanced by the wall
    clock, which would make the watermarks recorded with late trades differ between runs.)"""

    def __init__(self, bootstrap: str, topic: str, feed, rate: float):
        super().__init__(daemon=True)
        asyncio.run(ensure_topic(bootstrap, topic, 4))
        feed = [dataclasses.replace(m, send_at_s=n / rate) for n, m in enumerate(feed)]
        self.args = (bootstrap, topic, feed)
        self.speed = 1.0
        self.deliveries = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.deliveries = asyncio.run(produce(*self.args, speed=self.speed))
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self, timeout: float = 120):
        self.join(timeout)
        assert not self.is_alive(), "the producer is stuck"
        if self.error is not None:
            raise self.error
        return self.deliveries


def test_two_workers_split_the_partitions_and_a_rebalance_moves_state_with_them(
    database_url, second_database, kafka_bootstrap, workers
):
    """Two workers started together on a live 4-partition stream share it out: both consume,
    each from its own partitions. Then A is stopped mid-stream and B takes A's partitions over,
    resuming from what A committed. The result is that of one clean worker."""
    reset_tables(database_url)
    reset_tables(second_database)
    settings = operations_settings()
    # 24,000 trades over 600 s of event time, sent in 15 s.
    feed = PacedProducer(kafka_bootstrap, settings.topic_trades, messages(24_000, seed=21), 1600)
    env = worker_env(settings, database_url, kafka_bootstrap)
    reference = reference_run(workers, settings, second_database, kafka_bootstrap)
    a = workers(env, "--exit-when-idle", "3")
    b = workers(env, "--exit-when-idle", "3")

    def split():  # each has partitions of its own, none shared, none left out
        a_got, b_got = assignments(a)[-1:], assignments(b)[-1:]
        return (
            a_got
            and b_got
            and a_got[0]
            and b_got[0]
            and not a_got[0] & b_got[0]
            and a_got[0] | b_got[0] == ALL
        )

    wait_until(split, 30, "the group to split the partitions between A and B")
    a_partitions, b_partitions = assignments(a)[-1], assignments(b)[-1]
    at_split = consumed(database_url, a_partitions), consumed(database_url, b_partitions)
    wait_until(
        lambda: (
            consumed(database_url, a_partitions) >= at_split[0] + 200
            and consumed(database_url, b_partitions) >= at_split[1] + 200
        ),
        30,
        "both to consume from their own partitions",
    )
    assert assignments(a)[-1] == a_partitions and assignments(b)[-1] == b_partitions

    a.signal(signal.SIGTERM)
    a_summary = a.finish(timeout=15)
    wait_until(lambda: assignments(b)[-1] == ALL, 30, "B to take A's partitions over")
    assert feed.is_alive(), "the stream ended before B took over: slow it down"
    deliveries = feed.result()
    produced = len(deliveries)
    assert {d.partition for d in deliveries} == ALL
    b_summary = b.finish()
    reference.finish()

    # Both consumed, and between them every message exactly once.
    assert a_summary["consumed"] > 0 and b_summary["consumed"] > 0
    assert a_summary["consumed"] + b_summary["consumed"] == produced
    assert_same_final_state(database_url, second_database, produced)


# -- 2. SIGTERM and SIGINT ---------------------------------------------------------------------


async def group_offsets(bootstrap: str, topic: str, group: str, reset: bool = False) -> dict:
    """The consumer group's committed offsets in Kafka ({partition: offset}); with ``reset``,
    first set to 0 by a member of the group (the embedded broker takes commits from members
    only)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=3000,
        heartbeat_interval_ms=300,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(ALL)]
        if reset:
            consumer.subscribe([topic])
            async with asyncio.timeout(20):
                while consumer.assignment() != set(tps):
                    await asyncio.sleep(0.05)
            await consumer.commit(dict.fromkeys(tps, 0))
        return {tp.partition: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    ("sig", "reset_kafka_offsets"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGINT-then-kafka-offsets-reset"],
)
def test_signal_drains_commits_and_a_restart_continues(
    sig, reset_kafka_offsets, database_url, second_database, kafka_bootstrap, workers
):
    """A worker running as a service (no --exit-when-idle) gets ``sig`` mid-stream: it exits 0
    within seconds, everything it consumed is committed, and a restart finishes the job to the
    same state as a clean run. The group's offsets in Kafka follow (for lag tools) but do not
    decide anything: the restart resumes from PostgreSQL even after they are reset to the
    beginning, as ``kafka-consumer-groups --reset-offsets --to-earliest`` would."""
    reset_tables(database_url)
    reset_tables(second_database)
    settings = operations_settings()
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages(16_000, seed=22))
    produced = len(deliveries)
    env = worker_env(settings, database_url, kafka_bootstrap)
    reference = reference_run(workers, settings, second_database, kafka_bootstrap)

    first = workers(env)
    wait_until(lambda: consumed(database_url) >= produced * 0.2, 60, "20% consumed")
    sent = first.signal(sig)
    code = first.wait(timeout=20)
    took = time.monotonic() - sent
    assert code == 0, first.log_tail()
    assert took < 5, f"took {took:.1f} s to drain and exit"
    assert first.events("stop requested: draining")
    summary = first.summary()
    # Its last batch is committed: PostgreSQL has exactly what it consumed, no more, no less.
    assert 0 < summary["consumed"] == consumed(database_url) < produced
    # The group's offsets in Kafka say the same (lag tools read them).
    progress = tables(database_url)["progress"]
    stored = {p: progress[p][0] if p in progress else None for p in ALL}
    group = (kafka_bootstrap, settings.topic_trades, settings.consumer_group)
    assert asyncio.run(group_offsets(*group)) == stored
    if reset_kafka_offsets:
        assert asyncio.run(group_offsets(*group, reset=True)) == dict.fromkeys(ALL, 0)

    rest = workers(env, "--exit-when-idle", "3").finish()
    reference.finish()
    assert summary["consumed"] + rest["consumed"] == produced
    assert_same_final_state(database_url, second_database, produced)


# -- 3. PostgreSQL goes away -------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The metrics page as {sample name with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


@pytest.fixture
def private_postgres():
    """A PostgreSQL server of this test's own, to stop and start."""
    data_dir = TEST_DATA_DIR / f"ops-pg-{uuid.uuid4().hex[:8]}"
    server = EmbeddedPostgres(data_dir)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_postgres_stopped_mid_run_worker_retries_and_loses_nothing(
    private_postgres, database_url, kafka_bootstrap, workers
):
    """PostgreSQL shut down under the worker, and started again seconds later: the worker warns,
    counts retries, reconnects and ends where a clean run ends."""
    url = private_postgres.url
    db.upgrade(url)
    reset_tables(database_url)  # the clean run's database
    settings = operations_settings()
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages(16_000, seed=23))
    produced = len(deliveries)
    reference = reference_run(workers, settings, database_url, kafka_bootstrap)

    port = free_port()
    env = worker_env(settings, url, kafka_bootstrap)
    worker = workers(env, "--exit-when-idle", "3", "--metrics-port", str(port))
    wait_until(lambda: consumed(url) >= produced * 0.2, 60, "20% consumed")
    private_postgres.stop()  # pg_ctl stop -m fast: every connection is terminated
    wait_until(lambda: worker.events("batch failed, retrying"), 15, "a retry warning")
    time.sleep(3)
    assert worker.process.poll() is None, "the worker gave up:\n" + worker.log_tail()
    retries = scrape(port)
    assert retries.get('candlekeep_retries_total{cause="database"}', 0) >= 1
    private_postgres.start()
    assert private_postgres.url == url  # same port: the worker's DATABASE_URL is right again

    summary = worker.finish()
    reference.finish()
    warnings = worker.events("batch failed, retrying")
    assert warnings and all(w["level"] == "warning" for w in warnings)
    assert {w["cause"] for w in warnings} == {"database"}
    assert worker.events("database connection restored")
    assert summary["retries"] == len(warnings) >= 2  # the backoff went on while it was down
    assert summary["consumed"] == produced
    assert_same_final_state(url, database_url, produced)


# -- 4. the broker freezes ---------------------------------------------------------------------


async def _replicate(bootstrap: str, topic: str, deliveries) -> list[tuple[int, int]]:
    """The same messages at the same partitions and offsets, on another broker."""
    await ensure_topic(bootstrap, topic, 4)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, d.message.value, key=d.message.key, partition=d.partition)
            for d in deliveries
        ]
        return [(r.partition, r.offset) for r in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


@pytest.fixture
def private_broker():
    """A broker of this test's own, to freeze."""
    data_dir = TEST_DATA_DIR / f"ops-broker-{uuid.uuid4().hex[:8]}"
    broker = EmbeddedBroker(data_dir)
    try:
        yield broker.start()
    finally:
        if broker.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker.process.pid, signal.SIGCONT)
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_broker_frozen_mid_run_worker_survives_and_loses_nothing(
    private_broker, database_url, second_database, kafka_bootstrap, workers
):
    """The broker stops answering (SIGSTOP) for a few seconds mid-run, then resumes (SIGCONT;
    its data is in memory only, so it is not restarted): the worker neither dies nor exits as
    if idle, and ends where a clean run ends."""
    reset_tables(database_url)
    reset_tables(second_database)
    settings = operations_settings()
    broker = private_broker.bootstrap_servers
    deliveries = produce_all(broker, settings.topic_trades, messages(16_000, seed=24))
    produced = len(deliveries)
    # The clean run reads a copy on the session broker, so the freeze does not touch it.
    copy = asyncio.run(_replicate(kafka_bootstrap, settings.topic_trades, deliveries))
    assert copy == [(d.partition, d.offset) for d in deliveries]
    reference = reference_run(workers, settings, second_database, kafka_bootstrap)

    worker = workers(worker_env(settings, database_url, broker), "--exit-when-idle", "3")
    wait_until(lambda: consumed(database_url) >= produced * 0.2, 60, "20% consumed")
    os.kill(private_broker.process.pid, signal.SIGSTOP)
    try:
        frozen_at = consumed(database_url)
        time.sleep(5)  # longer than --exit-when-idle and the session timeout
        assert worker.process.poll() is None, "the worker exited:\n" + worker.log_tail()
    finally:
        os.kill(private_broker.process.pid, signal.SIGCONT)
    assert frozen_at < produced * 0.9, "the run was nearly over before the freeze"

    summary = worker.finish()
    reference.finish()
    assert summary["consumed"] == produced
    assert_same_final_state(database_url, second_database, produced)


# -- 5. Prometheus metrics ---------------------------------------------------------------------


def test_metrics_endpoint_reports_the_run(database_url, kafka_bootstrap, workers):
    """Scraped during and after consumption, the metrics add up to what is in PostgreSQL."""
    reset_tables(database_url)
    settings = operations_settings()
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages(8_000, seed=25))
    produced = len(deliveries)
    port = free_port()
    worker = workers(
        worker_env(settings, database_url, kafka_bootstrap), "--metrics-port", str(port)
    )
    wait_until(lambda: consumed(database_url) > 0, 60, "consumption to start")
    during = scrape(port)
    assert 0 < total(during, "candlekeep_messages_consumed_total") <= produced
    wait_until(lambda: consumed(database_url) == produced, 60, "everything consumed")
    time.sleep(1.5)  # a tick: the gauges of quiet partitions
    samples = scrape(port)
    scraped_at = time.time()
    watermarks = {p: row[1] for p, row in tables(database_url)["progress"].items()}
    worker.signal(signal.SIGTERM)
    worker.finish(timeout=20)

    found = tables(database_url)
    progress = found["progress"]
    sums = [sum(row[i] for row in progress.values()) for i in range(2, 7)]
    total_consumed, stored, duplicates, invalid, late = sums
    assert total(samples, "candlekeep_messages_consumed_total") == produced == total_consumed
    for partition, row in progress.items():
        key = f'candlekeep_messages_consumed_total{{partition="{partition}"}}'
        assert samples[key] == row[2]
    assert samples["candlekeep_trades_stored_total"] == stored > 0
    assert samples["candlekeep_trades_duplicate_total"] == duplicates > 0
    assert samples["candlekeep_trades_late_total"] == late > 0
    assert total(samples, "candlekeep_messages_invalid_total") == invalid > 0
    assert total(samples, "candlekeep_candles_written_total") == len(found["candles"]) > 0
    # Watermark lag: wall clock minus the partition's watermark (as stored when scraped).
    assert watermarks.keys() == ALL
    for partition, watermark in watermarks.items():
        lag = samples[f'candlekeep_watermark_lag_seconds{{partition="{partition}"}}']
        assert lag == pytest.approx(scraped_at - watermark.timestamp(), abs=5)
    batches = samples["candlekeep_batch_commit_seconds_count"]
    assert batches >= produced / settings.batch_size
    assert 0 < samples["candlekeep_batch_commit_seconds_sum"] / batches < 2
    closes = samples["candlekeep_window_close_to_commit_seconds_count"]
    assert closes > 0
    assert 0 <= samples["candlekeep_window_close_to_commit_seconds_sum"] / closes < 2
    assert samples['candlekeep_window_close_to_commit_seconds_bucket{le="+Inf"}'] == closes


# -- 6. startup errors -------------------------------------------------------------------------


def test_unreachable_services_fail_fast_with_one_clear_line(database_url, kafka_bootstrap):
    """PostgreSQL or Kafka unreachable at startup: exit 1 within seconds, one line naming the
    address (password hidden) and what to do, no traceback. A port that accepts connections but
    never answers (a frozen broker) is bounded too."""
    db.upgrade(database_url)
    settings = operations_settings()
    closed = free_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (in the kernel), never answers
    silent_port = silent.getsockname()[1]
    secret_url = f"postgresql://candlekeep:s3cret-pw@127.0.0.1:{closed}/candlekeep"
    cases = {
        "postgres closed": (secret_url, kafka_bootstrap, f"127.0.0.1:{closed}", "DATABASE_URL"),
        "kafka closed": (
            database_url,
            f"127.0.0.1:{closed}",
            f"127.0.0.1:{closed}",
            "KAFKA_BOOTSTRAP_SERVERS",
        ),
        "kafka silent": (
            database_url,
            f"127.0.0.1:{silent_port}",
            f"127.0.0.1:{silent_port}",
            "KAFKA_BOOTSTRAP_SERVERS",
        ),
    }
    try:
        started = time.monotonic()
        running = {
            name: subprocess.Popen(
                [sys.executable, "-m", "candlekeep", "stream", "--exit-when-idle", "1"],
                env=worker_env(settings, url, bootstrap),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, (url, bootstrap, _, _) in cases.items()
        }
        results = {}
        for name, process in running.items():
            try:
                out, err = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                raise AssertionError(f"{name}: still running after 30 s") from None
            results[name] = (process.returncode, out, err, time.monotonic() - started)
    finally:
        silent.close()
    for name, (code, out, err, took) in results.items():
        _, _, address, variable = cases[name]
        lines = err.strip().splitlines()
        assert code == 1, (name, err)
        assert took < (20 if name == "kafka silent" else 15), (name, took)
        assert len(lines) == 1, (name, err)
        line = lines[0]
        assert line.startswith("Error: ") and "Traceback" not in err, (name, line)
        assert address in line and variable in line, (name, line)
        assert out == ""
    assert "s3cret-pw" not in results["postgres closed"][2]
    assert "candlekeep:***@" in results["postgres closed"][2]


# -- 7. structured logs ------------------------------------------------------------------------


def test_logs_are_json_lines_when_stderr_is_not_a_terminal(database_url, kafka_bootstrap, workers):
    reset_tables(database_url)
    settings = operations_settings()
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages(500, seed=26))
    worker = workers(worker_env(settings, database_url, kafka_bootstrap), "--exit-when-idle", "2")
    summary = worker.finish(timeout=60)

    lines = worker.lines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"event", "level", "timestamp"} <= e.keys() for e in events)
    names = [e["event"] for e in events]
    assert names[0] == "worker started" and names[-1] == "worker stopped"
    started = events[0]
    assert started["level"] == "info"
    assert started["topic"] == settings.topic_trades
    assert started["group"] == settings.consumer_group
    assert started["brokers"] == kafka_bootstrap
    assert started["database"] == db.redact(database_url)
    assigned = [e for e in events if e["event"] == "partitions assigned"]
    assert assigned and assigned[-1]["partitions"] == [0, 1, 2, 3]
    assert summary["consumed"] == len(deliveries)


# -- 8. a stalled partition does not hold the others back ---------------------------------------


def _send(bootstrap: str, topic: str, partition: int, trades: list[dict]) -> None:
    async def run():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for trade in trades:
                value = json.dumps(trade).encode()
                key = trade["symbol"].encode()
                await producer.send_and_wait(topic, value, key=key, partition=partition)
        finally:
            await producer.stop()

    asyncio.run(run())


def test_a_quiet_partition_gets_its_candle_while_another_partitions_batch_is_stuck(
    database_url, kafka_bootstrap, workers
):
    """One partition's batch cannot commit (its progress row is locked, as a long lock or a
    slow disk would do): a quiet symbol on another partition, written by the same writer
    connection, still gets its candle from the idle advance (SPEC §4) meanwhile. Then the lock
    goes, the stuck batch commits and nothing is lost."""
    reset_tables(database_url)
    settings = operations_settings(max_delay="1", intervals="1m", stream_writers=2)
    topic, quiet, busy = settings.topic_trades, 0, 2  # (0 % 2 == 2 % 2: the same writer)
    asyncio.run(ensure_topic(kafka_bootstrap, topic, 4))
    window_end = (int(time.time()) // 60 * 60 - 3600) * 1000  # a minute an hour ago, in ms
    # The quiet symbol's window closes by idle advance 10 s + max_delay after its last trade
    # arrives: time enough to lock the busy partition first.
    quiet_trades = [
        {"symbol": "QUIETUSDT", "trade_id": n, "price": p, "quantity": "2", "timestamp": ts}
        for n, p, ts in [(1, "1.5", window_end - 12_000), (2, "1.25", window_end - 10_000)]
    ]

    def busy_trade(n: int) -> dict:
        ts = window_end - 50_000 + n
        return {"symbol": "BUSYUSDT", "trade_id": n, "price": "7", "quantity": "1", "timestamp": ts}

    _send(kafka_bootstrap, topic, quiet, quiet_trades)
    _send(kafka_bootstrap, topic, busy, [busy_trade(1)])
    worker = workers(worker_env(settings, database_url, kafka_bootstrap))
    wait_until(
        lambda: consumed(database_url, {quiet}) == 2 and consumed(database_url, {busy}) == 1,
        60,
        "both partitions' first messages committed",
    )

    def quiet_candle():
        with db.connect(database_url) as conn:
            return conn.execute(
                "SELECT open, close, volume, trade_count FROM stream_candles"
                " WHERE symbol = 'QUIETUSDT'"
            ).fetchall()

    assert quiet_candle() == [], "closed before the lock: the test proves nothing"
    with db.connect(database_url) as lock:
        lock.execute(
            "SELECT 1 FROM stream_progress WHERE consumer_group = %s AND topic = %s"
            " AND partition = %s FOR UPDATE",
            (settings.consumer_group, topic, busy),
        )
        _send(kafka_bootstrap, topic, busy, [busy_trade(2), busy_trade(3)])
        wait_until(lambda: quiet_candle() != [], 40, "the quiet symbol's candle")
        # ... while the busy partition's batch was still waiting for its row.
        assert consumed(database_url, {busy}) == 1
        lock.rollback()
    assert quiet_candle() == [(Decimal("1.5"), Decimal("1.25"), Decimal("4"), 2)]
    wait_until(lambda: consumed(database_url, {busy}) == 3, 30, "the stuck batch committed")
    worker.signal(signal.SIGTERM)
    assert worker.finish()["consumed"] == 5
    with db.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone()[0] == 5
