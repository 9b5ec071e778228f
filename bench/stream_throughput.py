"""Benchmark: the stream worker end to end, next to a bare aiokafka consumer over the same topic.

For each size (1M, then 5M trades; ``--quick``: 200k), in one run, with a fresh embedded broker
(Tansu, in memory) and a fresh database on an embedded PostgreSQL (``bench/out/stream/pg``):

1. the synthetic market (``synthetic_messages`` with the default dials: 3 symbols, ~5% disordered,
   0.2% late, 1% duplicates, 0.5% invalid; cached in ``bench/out/stream/``) is produced to a new
   4-partition topic, in feed order within each partition (the key, the symbol, picks it);
2. a bare aiokafka consumer loop reads the whole topic (consumer group, ``getmany`` with the
   worker's batch size, no processing, offsets committed per batch): messages/s from the first
   batch to the last;
3. ``candlekeep stream --exit-when-idle 3`` runs as a subprocess on the same topic. Every 0.2 s
   the script reads the sum of ``stream_progress.consumed`` (what is committed to PostgreSQL)
   and the worker's ``VmHWM``; every second it scrapes ``/metrics``. Sustained trades/s is the
   messages committed between the first sample that saw a commit and the first that saw all of
   them, over the time between those samples: start-up, the group join and the final idle wait
   do not count. The p99 of ``candlekeep_window_close_to_commit_seconds`` comes from the last
   scrape's histogram buckets (5 ms … 10 s), so it is only known to a bucket;
4. the bare consumer reads the topic once more (a new group), and the ratio is worker trades/s
   over the better of the two bare runs.

Then, once, a live stream: the worker is started on a fresh topic and database, and the messages
are produced at LIVE_RATE a second for LIVE_SECONDS; the close-to-commit histogram is read when
the worker has caught up and at the end, and the p99 of the difference is the delay a running
pipeline sees.

Results go to docs/benchmarks.md, section "Stream worker: end-to-end throughput".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.partitioner import murmur2  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from candlekeep.embedded import EmbeddedBroker, EmbeddedPostgres  # noqa: E402
from shared.store import db  # noqa: E402
from stream.feeds.produce import ensure_topic  # noqa: E402
from stream.feeds.synthetic import MarketDials, synthetic_messages  # noqa: E402
from stream.worker import CONSUMER_FETCH  # noqa: E402
from tests.streaming import settings_env, stream_settings  # noqa: E402

OUT_DIR = BENCH_DIR / "out" / "stream"
LAST = OUT_DIR / "last-results.pickle"
PG_DIR = OUT_DIR / "pg"
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Stream worker: end-to-end throughput"
SIZES = (1_000_000, 5_000_000)
QUICK_SIZES = (200_000,)
PARTITIONS = 4
SEED = 42
TARGET_RATIO = 0.5
IDLE_EXIT_S = 3
POLL_S = 0.2
SCRAPE_S = 1.0
#: Bump when the cached message files change for a given (count, seed).
VERSION = 1
CHUNK = 100_000


# --- the messages -------------------------------------------------------------------------------


def partition_of(key: bytes | None, seq: int) -> int:
    """aiokafka's default partitioner for keyed messages; null keys round robin."""
    if key is None:
        return seq % PARTITIONS
    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


def messages_path(count: int) -> Path:
    return OUT_DIR / f"messages-{count}-s{SEED}-p{PARTITIONS}-v{VERSION}.pickle"


def generate(count: int) -> Path:
    """Cache the feed as pickled chunks of (partition, key, value), in send order."""
    path = messages_path(count)
    if path.exists():
        return path
    scratch = path.with_suffix(f".tmp-{os.getpid()}")
    chunk: list[tuple[int, bytes | None, bytes]] = []
    with scratch.open("wb") as out:
        for seq, m in enumerate(synthetic_messages(MarketDials(count=count, seed=SEED))):
            chunk.append((partition_of(m.key, seq), m.key, m.value))
            if len(chunk) >= CHUNK:
                pickle.dump(chunk, out, protocol=pickle.HIGHEST_PROTOCOL)
                chunk = []
        if chunk:
            pickle.dump(chunk, out, protocol=pickle.HIGHEST_PROTOCOL)
    scratch.replace(path)
    return path


def read_chunks(path: Path):
    with path.open("rb") as handle:
        while True:
            try:
                yield pickle.load(handle)
            except EOFError:
                return


async def produce_file(bootstrap: str, topic: str, path: Path) -> tuple[int, dict[int, int]]:
    """Send every cached message in order, to its partition; returns (count, per partition)."""
    await ensure_topic(bootstrap, topic, PARTITIONS)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        max_batch_size=64 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    sent = 0
    per_partition = dict.fromkeys(range(PARTITIONS), 0)
    try:
        for chunk in read_chunks(path):
            futures = []
            for partition, key, value in chunk:
                futures.append(await producer.send(topic, value, key=key, partition=partition))
                per_partition[partition] += 1
                if len(futures) >= 5000:
                    await asyncio.gather(*futures)
                    futures.clear()
            await asyncio.gather(*futures)
            sent += len(chunk)
            print(f"\r  produced {sent:,}", end="", flush=True)
    finally:
        await producer.stop()
    print()
    return sent, per_partition


# --- the bare consumer --------------------------------------------------------------------------


@dataclass
class BareRun:
    consumed: int
    seconds: float
    cpu_s: float = 0.0  # this process's CPU over the same span (the consumer is all it runs)

    @property
    def rate(self) -> float:
        return self.consumed / self.seconds


async def bare_consumer(bootstrap: str, topic: str, total: int, batch_size: int) -> BareRun:
    """A consumer group reading the whole topic: getmany, nothing done, offsets committed per
    batch. Timed from the first batch received to the last batch's commit."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bare-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **CONSUMER_FETCH,  # (the worker's fetch settings)
        session_timeout_ms=3000,
        heartbeat_interval_ms=300,
    )
    await consumer.start()
    consumed = 0
    first_batch = 0
    started = None
    cpu_started = 0.0
    try:
        async with asyncio.timeout(600):
            while consumed < total:
                fetched = await consumer.getmany(timeout_ms=200, max_records=batch_size)
                if not fetched:
                    continue
                n = sum(len(records) for records in fetched.values())
                if started is None:
                    started = time.perf_counter()
                    cpu_started = time.process_time()
                    first_batch = n
                consumed += n
                await consumer.commit()
        ended = time.perf_counter()
        cpu = time.process_time() - cpu_started
    finally:
        await consumer.stop()
    assert started is not None
    # The first batch arrived at ``started``: only what came after it counts.
    return BareRun(consumed - first_batch, ended - started, cpu)


# --- the worker ---------------------------------------------------------------------------------


@dataclass
class WorkerRun:
    total: int
    first_at: float = 0.0
    first_consumed: int = 0
    last_at: float = 0.0
    wall_s: float = 0.0  # process start to exit
    exit_code: int | None = None
    peak_rss_mb: float = 0.0  # VmHWM, last seen before exit
    maxrss_mb: float = 0.0  # from wait4, at exit
    worker_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    histogram: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative)
    commit_histogram: list[tuple[float, float]] = field(default_factory=list)
    progress: dict[str, int] = field(default_factory=dict)
    candles: int = 0

    @property
    def seconds(self) -> float:
        return self.last_at - self.first_at

    @property
    def rate(self) -> float:
        return (self.total - self.first_consumed) / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def committed(conn: psycopg.Connection, group: str) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(consumed), 0) FROM stream_progress WHERE consumer_group = %s",
        (group,),
    ).fetchone()
    conn.rollback()
    return int(row[0])


def scrape(port: int) -> dict[str, list[tuple[float, float]]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        buckets = [
            (float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")
        ]
        if buckets:
            out[family.name] = sorted(buckets)
    return out


def vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class CpuTracker:
    """CPU seconds used by processes (and, optionally, their children, e.g. PostgreSQL's
    backends, which come and go) since the tracker was made; call :meth:`sample` often."""

    def __init__(self, process: psutil.Process, children: bool = False):
        self.process = process
        self.children = children
        self.baseline: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.sample()
        self.baseline = dict(self.last)

    def sample(self) -> None:
        processes = [self.process]
        if self.children:
            with contextlib.suppress(psutil.Error):
                processes += self.process.children()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                self.last[process.pid] = times.user + times.system

    @property
    def seconds(self) -> float:
        return sum(v - self.baseline.get(pid, 0.0) for pid, v in self.last.items())


def run_worker(
    settings,
    url: str,
    bootstrap: str,
    total: int,
    postgres_pid: int,
    broker_pid: int,
    log: Path,
    profile: Path | None = None,
) -> WorkerRun:
    port = free_port()
    env = settings_env(settings, url, bootstrap)
    env["CANDLEKEEP_METRICS_PORT"] = str(port)
    command = [sys.executable, "-m", "candlekeep", "stream", "--exit-when-idle", str(IDLE_EXIT_S)]
    run = WorkerRun(total)
    postgres_cpu = CpuTracker(psutil.Process(postgres_pid), children=True)
    broker_cpu = CpuTracker(psutil.Process(broker_pid))
    started = time.perf_counter()
    with log.open("wb") as stderr, db.connect(url) as conn:
        worker = subprocess.Popen(command, env=env, stdout=stderr, stderr=stderr, cwd=REPO)
        spy = None
        if profile is not None:
            # Collapsed stacks of every thread, waiting included: where the wall time goes.
            spy = subprocess.Popen(
                [
                    *(str(Path(sys.executable).parent / "py-spy"), "record", "--pid"),
                    *(str(worker.pid), "--format", profile.suffix[1:], "-o", str(profile)),
                    *("--threads", "--idle", "--rate", "100", "--nonblocking"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        try:
            deadline = started + 1800
            scraped_at = 0.0
            while True:
                now = time.perf_counter()
                done = committed(conn, settings.consumer_group)
                if done and not run.first_at:
                    run.first_at, run.first_consumed = now, done
                if done >= total and not run.last_at:
                    run.last_at = now
                metrics = None
                if now - scraped_at >= SCRAPE_S:  # (a scrape costs the worker some GIL time)
                    scraped_at = now
                    metrics = scrape(port)
                if metrics:
                    run.histogram = metrics.get(
                        "candlekeep_window_close_to_commit_seconds", run.histogram
                    )
                    run.commit_histogram = metrics.get(
                        "candlekeep_batch_commit_seconds", run.commit_histogram
                    )
                hwm = vm_hwm_mb(worker.pid)
                if hwm is not None:
                    run.peak_rss_mb = max(run.peak_rss_mb, hwm)
                postgres_cpu.sample()
                broker_cpu.sample()
                # wait4, not Popen.poll: it also gives the child's own peak RSS and CPU time.
                pid, status, usage = os.wait4(worker.pid, os.WNOHANG)
                if pid:
                    worker.returncode = os.waitstatus_to_exitcode(status)
                    run.maxrss_mb = usage.ru_maxrss / 1024  # KiB on Linux
                    run.worker_cpu_s = usage.ru_utime + usage.ru_stime
                    break
                if now > deadline:
                    break
                time.sleep(POLL_S)
        finally:
            if worker.returncode is None:
                worker.kill()
                worker.wait()
            if spy is not None:
                spy.wait(60)
        run.wall_s = time.perf_counter() - started
        run.exit_code = worker.returncode
        run.postgres_cpu_s = postgres_cpu.seconds
        run.broker_cpu_s = broker_cpu.seconds
        row = conn.execute(
            "SELECT sum(consumed), sum(stored), sum(duplicates), sum(invalid), sum(late)"
            " FROM stream_progress WHERE consumer_group = %s",
            (settings.consumer_group,),
        ).fetchone()
        run.progress = dict(
            zip(("consumed", "stored", "duplicates", "invalid", "late"), map(int, row), strict=True)
        )
        run.candles = conn.execute("SELECT count(*) FROM stream_candles").fetchone()[0]
    if run.exit_code != 0:
        raise SystemExit(f"the worker exited with {run.exit_code}; see {log}")
    if not run.last_at:
        raise SystemExit(f"the worker committed {run.progress} of {total} messages; see {log}")
    return run


def quantile(buckets: list[tuple[float, float]], q: float) -> tuple[float, float, float]:
    """(lower bound, upper bound, linear interpolation) of the bucket holding quantile ``q``."""
    count = buckets[-1][1]
    rank = q * count
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == float("inf"):
                return lower, le, lower
            inside = cumulative - below
            fraction = (rank - below) / inside if inside else 1.0
            return lower, le, lower + (le - lower) * fraction
        lower, below = le, cumulative
    return lower, float("inf"), lower


# --- one size -----------------------------------------------------------------------------------


@dataclass
class SizeResult:
    trades: int
    messages: int
    per_partition: dict[int, int]
    produce_rate: float
    bare: list[BareRun]
    worker: WorkerRun
    broker_rss_mb: float
    batch_size: int

    @property
    def bare_rate(self) -> float:
        return max(b.rate for b in self.bare)

    @property
    def bare_cpu_us(self) -> float:
        """CPU per message of the faster bare run."""
        best = max(self.bare, key=lambda b: b.rate)
        return 1e6 * best.cpu_s / best.consumed

    @property
    def ratio(self) -> float:
        return self.worker.rate / self.bare_rate


def run_size(
    count: int, postgres: EmbeddedPostgres, profile: str | None, batch_size: int | None
) -> SizeResult:
    print(f"== {count:,} trades")
    path = generate(count)
    settings = stream_settings(**({"batch_size": batch_size} if batch_size else {}))
    database = f"bench_stream_{count}_{uuid.uuid4().hex[:6]}"
    admin_url = postgres.url_for("postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    url = postgres.url_for(database)
    db.upgrade(url)
    broker = EmbeddedBroker(OUT_DIR / "broker").start()
    try:
        bootstrap = broker.bootstrap_servers
        started = time.perf_counter()
        messages, per_partition = asyncio.run(produce_file(bootstrap, settings.topic_trades, path))
        produce_rate = messages / (time.perf_counter() - started)
        print(f"  produce: {produce_rate:,.0f} msgs/s; per partition {per_partition}")
        bare = [
            asyncio.run(
                bare_consumer(bootstrap, settings.topic_trades, messages, settings.batch_size)
            )
        ]
        print(f"  bare consumer: {bare[0].rate:,.0f} msgs/s, {bare[0].cpu_s:.1f} CPU s")
        assert postgres.pid is not None and broker.process is not None
        worker = run_worker(
            settings,
            url,
            bootstrap,
            messages,
            postgres.pid,
            broker.process.pid,
            OUT_DIR / f"worker-{count}.log",
            OUT_DIR / f"worker-{count}.{profile}" if profile else None,
        )
        print(
            f"  worker: {worker.rate:,.0f} trades/s over {worker.seconds:.1f} s"
            f" (process {worker.wall_s:.1f} s), peak RSS {worker.peak_rss_mb:.0f} MB,"
            f" CPU s: worker {worker.worker_cpu_s:.1f}, postgres {worker.postgres_cpu_s:.1f},"
            f" broker {worker.broker_cpu_s:.1f}; {worker.progress}"
        )
        bare.append(
            asyncio.run(
                bare_consumer(bootstrap, settings.topic_trades, messages, settings.batch_size)
            )
        )
        print(f"  bare consumer again: {bare[1].rate:,.0f} msgs/s, {bare[1].cpu_s:.1f} CPU s")
        broker_rss = psutil.Process(broker.process.pid).memory_info().rss / 2**20
    finally:
        broker.stop()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
    result = SizeResult(
        count, messages, per_partition, produce_rate, bare, worker, broker_rss, settings.batch_size
    )
    print(f"  ratio {result.ratio:.3f} (target ≥ {TARGET_RATIO})")
    return result


def run_all(
    sizes: list[int],
    profile: str | None,
    batch_size: int | None,
    live_seconds: int,
    live_only: bool = False,
) -> tuple[list[SizeResult], LiveRun | None]:
    missing = [n for n in sizes if not messages_path(n).exists()]
    if missing:
        print(f"generating {', '.join(f'{n:,}' for n in missing)} messages (cached)...")
        with ProcessPoolExecutor(min(len(missing), os.cpu_count() or 1)) as pool:
            list(pool.map(generate, missing))
    postgres = EmbeddedPostgres(PG_DIR).start()
    with psycopg.connect(postgres.url_for("postgres"), autocommit=True) as admin:
        for (stale,) in admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_stream\\_%'"
        ).fetchall():  # left by an interrupted run
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(stale)))
    try:
        results = [] if live_only else [run_size(n, postgres, profile, batch_size) for n in sizes]
        live = None
        if live_seconds:
            path = messages_path(max(sizes))
            live = run_live(postgres, path, min(live_seconds, max(sizes) // LIVE_RATE))
        return results, live
    finally:
        postgres.stop()


# --- live: a paced stream the worker keeps up with ----------------------------------------------


#: The live run: the 1M-trade messages produced at this pace, with the worker already running.
LIVE_RATE = 10_000
LIVE_SECONDS = 30


@dataclass
class LiveRun:
    rate: int
    messages: int
    produced_rate: float
    #: Histogram buckets (le, count) of what happened after the worker had caught up.
    histogram: list[tuple[float, float]]
    commit_histogram: list[tuple[float, float]]
    worker_cpu_share: float  # of one CPU, while live
    #: CPU µs a message committed while live: the worker's and PostgreSQL's (0: not measured).
    worker_us: float = 0.0
    postgres_us: float = 0.0


async def produce_paced(bootstrap: str, topic: str, path: Path, rate: int, count: int) -> float:
    """Send the first ``count`` cached messages at ``rate`` a second, in 20 ms steps."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    step = rate // 50
    sent = 0
    started = time.perf_counter()
    try:
        pending: list = []
        for chunk in read_chunks(path):
            for partition, key, value in chunk:
                if sent >= count:
                    break
                pending.append(await producer.send(topic, value, key=key, partition=partition))
                sent += 1
                if sent % step == 0:
                    await asyncio.gather(*pending)
                    pending.clear()
                    ahead = started + sent / rate - time.perf_counter()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            if sent >= count:
                break
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent / (time.perf_counter() - started)


def minus(after: list[tuple[float, float]], before: list[tuple[float, float]]):
    """Cumulative buckets of what was counted between two scrapes."""
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def run_live(postgres: EmbeddedPostgres, path: Path, seconds: int) -> LiveRun:
    """The worker running, then trades arriving at LIVE_RATE a second for ``seconds``: the
    close-to-commit delay a live stream sees (counted from when the worker has caught up with
    what arrived while it joined the group)."""
    count = LIVE_RATE * seconds
    print(f"== live: {LIVE_RATE:,} msgs/s for {seconds} s")
    settings = stream_settings()
    database = f"bench_stream_live_{uuid.uuid4().hex[:6]}"
    admin_url = postgres.url_for("postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    url = postgres.url_for(database)
    db.upgrade(url)
    broker = EmbeddedBroker(OUT_DIR / "broker").start()
    topic = settings.topic_trades
    try:
        bootstrap = broker.bootstrap_servers
        asyncio.run(ensure_topic(bootstrap, topic, PARTITIONS))
        produced: list[float] = []
        producer = threading.Thread(
            target=lambda: produced.append(
                asyncio.run(produce_paced(bootstrap, topic, path, LIVE_RATE, count))
            ),
            daemon=True,
        )
        port = free_port()
        env = settings_env(settings, url, bootstrap)
        env["CANDLEKEEP_METRICS_PORT"] = str(port)
        command = [sys.executable, "-m", "candlekeep", "stream", "--exit-when-idle", "3"]
        log = OUT_DIR / "worker-live.log"
        with log.open("wb") as stderr, db.connect(url) as conn:
            worker = subprocess.Popen(command, env=env, stdout=stderr, stderr=stderr, cwd=REPO)
            process = psutil.Process(worker.pid)
            postgres_cpu = CpuTracker(psutil.Process(postgres.pid), children=True)
            producer.start()
            started = time.perf_counter()
            before = after = None
            cpu = cpu_before = cpu_at = pg_before = pg_at = 0.0
            done_before = done_at = 0
            caught_up_at = after_at = 0.0
            try:
                while worker.poll() is None and time.perf_counter() - started < 600:
                    time.sleep(0.5)
                    now = time.perf_counter()
                    expected = min(count, LIVE_RATE * (now - started))
                    done = committed(conn, settings.consumer_group)
                    metrics = scrape(port)
                    if metrics is None:
                        continue
                    with contextlib.suppress(psutil.Error):
                        times = process.cpu_times()
                        cpu = times.user + times.system
                    postgres_cpu.sample()
                    if before is None and done and done >= expected - LIVE_RATE * 0.5:
                        before, cpu_before, caught_up_at = metrics, cpu, now
                        pg_before, done_before = postgres_cpu.seconds, done
                    if before is not None:
                        after, cpu_at, after_at = metrics, cpu, now
                        pg_at, done_at = postgres_cpu.seconds, done
                    if done >= count:
                        break
            finally:
                worker.terminate()
                worker.wait(60)
        producer.join(60)
        if before is None or after is None:
            raise SystemExit(f"the worker never caught up with the live stream; see {log}")
        key, commit_key = (
            "candlekeep_window_close_to_commit_seconds",
            "candlekeep_batch_commit_seconds",
        )
        live_s = max(after_at - caught_up_at, 1e-9)
        result = LiveRun(
            LIVE_RATE,
            count,
            produced[0] if produced else 0.0,
            minus(after[key], before[key]),
            minus(after[commit_key], before[commit_key]),
            (cpu_at - cpu_before) / live_s,
            (cpu_at - cpu_before) * 1e6 / max(done_at - done_before, 1),
            (pg_at - pg_before) * 1e6 / max(done_at - done_before, 1),
        )
    finally:
        broker.stop()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
    low, high, interpolated = quantile(result.histogram, 0.99)
    print(
        f"  produced at {result.produced_rate:,.0f} msgs/s; windows closed while live:"
        f" {result.histogram[-1][1]:,.0f}; p99 close → commit {fmt_s(low)}–{fmt_s(high)}"
        f" (~{fmt_s(interpolated)}), p99 batch commit"
        f" ~{fmt_s(quantile(result.commit_histogram, 0.99)[2])};"
        f" worker CPU {result.worker_cpu_share:.0%} of one CPU;"
        f" CPU µs a message: worker {result.worker_us:.1f}, postgres {result.postgres_us:.1f}"
    )
    return result


# --- reporting ----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    memory = "unknown"
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), cpu
            )
        with open("/proc/meminfo", encoding="utf-8") as handle:
            kb = int(next(ln for ln in handle if ln.startswith("MemTotal")).split()[1])
            memory = f"{kb / 2**20:.0f} GiB"
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def fmt_s(seconds: float) -> str:
    if seconds == float("inf"):
        return "> 10 s"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:g} s"


HEADER = (
    "| trades | messages | bare consumer msgs/s (before / after) | worker trades/s | ratio"
    " | p99 close → commit | p99 batch commit | worker peak RSS (MB)"
    " | CPU s worker / postgres / broker | CPU µs a message: bare / worker / postgres |"
    "\n|---:|---:|---:|---:|---:|---|---|---:|---|---|"
)


ANALYSIS = """\
### Where the worker's time goes

Measured 2026-11-22 on this machine: 2 CPUs shared by the worker, PostgreSQL, the broker and
other sessions' jobs, so single numbers move by ±30%.

- **The fetch stall (fixed).** aiokafka keeps one fetch request in flight per broker and asks
  only for partitions whose fetched messages have all been consumed. While the two busy
  partitions still had messages buffered, the next fetch went out for the two quiet ones (about
  20 messages each, at the end of their log), and the broker holds such a fetch for
  `fetch_max_wait_ms` (Kafka's default: 500 ms) waiting for data; the busy partitions, drained
  meanwhile, waited behind it. In a consumer that spends 10 µs a message (simulated), that cost a
  third of the time: 56k msgs/s at 500 ms, 81k at 50 ms. The worker now fetches with
  `fetch_max_wait_ms=50`, and so does the bare consumer here (`CONSUMER_FETCH` in
  `stream/worker.py`): it had the same stall, and went from 118k-188k to 240k-410k msgs/s. That
  is why the ratio went down while the worker went up.
- **Writers.** The partitions are spread over 2 PostgreSQL connections
  (`CANDLEKEEP_STREAM_WRITERS`), each with one batch being written and one parsed and waiting:
  one writer's Python runs while the other waits on PostgreSQL. 500k trades, back to back: 69k
  trades/s with 1 writer, 80-85k with 2. A third waiting batch added nothing and doubled the
  close-to-commit delay while reading a backlog.
- **Per message** (the table's last column: CPU time over messages): the bare consumer 2-3.5 µs
  (aiokafka's fetch and record decoding, all it does); the worker process 12-15 µs (aiokafka's
  same share; parsing and validating ~2.5 µs, a typed msgspec decode with `Decimal` straight
  from the JSON text; first copies and the COPY text rows ~2.5 µs; the windows ~1.5 µs; the rest
  psycopg, the staging path for the ~5% disordered trades, outputs, thread hand-offs);
  PostgreSQL ~6 µs (the COPY into `trades` alone is 3.6 µs a row: heap, primary key, BRIN, WAL).
- **Why 0.5 is out of reach on this machine.** Half the bare consumer's rate is 110k-205k
  msgs/s: 4.9-9.1 µs of wall time a message, so at most 10-18 µs of CPU a message on 2 CPUs for
  everything. The worker's 12-15 µs, PostgreSQL's ~6 µs and the broker's ~1 µs make ~20 µs: even
  with both CPUs busy all the time and nothing else running, at most ~100k msgs/s, a ratio of
  0.25-0.45. One worker process (one GIL) is bounded by its own 12-15 µs: ~70-80k msgs/s,
  0.2-0.35. 0.5 would need the worker's own work a message (JSON with exact decimals, dedupe,
  the fold, COPY rows, the transaction) to cost about what aiokafka's record decoding costs, or
  more CPUs than this benchmark's two with a worker process per partition or two.

Changed (2026-11-22, session 3; `stream/worker.py`, `stream/sink.py`): 49k → 68-75k trades/s
at 1M and 46k → 59-69k at 5M (three full runs), same rows, candles and counters
(`tests/test_stream*.py`, with the SIGKILL test):

1. `fetch_max_wait_ms=50` (above).
2. Two writer connections, a partition always on the same one, so its batches, offsets and
   window state still commit in order; a batch waiting behind a failed one is dropped, and the
   consumer seeks back to what was committed.
3. The idle advance of a quiet partition no longer waits for the batches in flight of the
   others (it is written on a connection of its own; a partition with a batch in flight is not
   quiet). `tests/test_stream_operations.py` locks one partition's progress row and checks that a
   quiet symbol on another partition still gets its candle meanwhile.
4. A late trade's source offset is found by the trade's identity, not by building a key tuple
   for every trade of the batch (5% of the worker's CPU in the profile).

Changed (2026-11-30, issue 15, live stream; `stream/worker.py`, `stream/writers.py`,
`shared/store/trade_staging.py`, `shared/store/trade_store.py`):

1. **A batch gathers for `CANDLEKEEP_STREAM_LINGER` (100 ms) while live.** At 10,000 msgs/s
   each fetch returned what had arrived since the last one: PostgreSQL's statement log showed
   ~90 transactions a second of ~110 messages, each paying the whole per-batch round (fence
   and savepoint, the staging table's statements, the COPY, parts, progress and window state,
   the outputs' acknowledgements, the commit, two thread hand-offs). A fetch that does not fill
   a batch is now topped up with what arrives within 100 ms of its first message (a backlog
   fills its batches at once and never waits); close → commit counts from that first message.
   What a step costs, from the linger alone (same code, 100 → 200 ms: −3.4 µs a message): about
   7 ms of worker CPU a step on this loaded machine, so gathering pays in proportion.
2. The group's offsets in Kafka (for lag tools only) are committed at most once a second and
   when the worker stops, not with every batch.
3. The staging table is created once per writer connection (it was a `CREATE … IF NOT EXISTS`
   and a logged notice per batch), and emptied with `DELETE` instead of `TRUNCATE`, which gives
   a temporary table a new file and a catalogue update each time: 0.45–0.6 ms of server time a
   batch in the statement log, the largest after the COPY.
4. `prepare_trades` makes one pass over a batch instead of three (1.45–1.50 → 1.34–1.35 µs a
   message in `bench/stream_parts.py`).

Measured with `bench/stream_throughput.py --trades 200000 --live-only 20` (20 s at 10,000
msgs/s; the live run now reports the worker's and PostgreSQL's CPU a message), main and this
change alternating, 2 CPUs shared with other sessions' test suites (load average 1.4 to 6):

| round | main: worker / PostgreSQL CPU µs a message, p99 close → commit | changed |
|---|---|---|
| 1 | 32.0 / 24.6, ~235 ms | 16.5 / 7.0, ~195 ms |
| 2 | 29.6 / 28.5, ~237 ms | 16.7 / 7.0, ~194 ms |
| 3 | 19.4 / 14.0, ~648 ms | 15.0 / 6.8, ~430 ms |
| 4 | 41.8 / 37.4, ~95 ms | 17.3 / 7.5, ~150 ms |
| 5 | 32.3 / 22.4, ~114 ms | 14.1 / 6.4, ~194 ms |
| 6 | 23.8 / 18.7, ~90 ms | 13.4 / 6.2, ~342 ms |

(Rounds 1–3 before change 4. The p99 is interpolated in its bucket; 150 and 200 ms buckets
were added to `candlekeep_window_close_to_commit_seconds` for it.) Worker CPU a message
−45 to −60%, PostgreSQL's −55 to −80%; main's figures move with the load more (its batches
grow when it falls behind). The delay is the linger plus one batch's write: 150–200 ms in most
rounds, above 250 ms in the two rounds with a load average near 5 (where main's was 648 ms
once). With `CANDLEKEEP_STREAM_LINGER=75ms`: 13.5–15.3 µs, p99 ~149–196 ms (four rounds,
alternating with 100 ms: 13.7–14.5 µs, ~195–210 ms): the setting trades one for the other.
The full 30 s live run of the 1M-trade runs below: main 26.8 / 17.1 µs, changed 15.4 / 6.7 µs
(load average 5–6, p99 ~424 and ~657 ms).

Backlog, 1,000,000 trades (`--trades 1000000 --no-write-docs`, one round each, load average
5–6): main 51,104 trades/s, worker 10.4 µs and PostgreSQL 4.4 µs a message; changed 72,654
trades/s, 8.3 and 3.5 µs (the staging statements and prepare_trades; a backlog's batches were
full already). `--quick` (200k): 56.6k → 69.5k trades/s.

Where a live message's CPU goes now (one run instrumented with `time.thread_time`, not
committed): the event loop's thread 7.7 µs (aiokafka's fetch and record decoding, parse,
`prepare_trades`, gathering, the outputs), the writer threads 4.1 µs (2.8 in the fence,
staging, COPY, fold and continuity; 1.4 in the parts, late and invalid rows, progress, merge
and commit), ~150 steps of ~1,300 messages for 200k. Not done: one transaction a step while
no batch is in flight (tried: a partition's next batch must then go to the writer its batch in
flight is on, or two transactions hold its progress row at once, which deadlocked; doing it
without pinning a backlog to one writer needs more than a routing rule). Item 2 below was
tried (the ids a symbol skipped, kept per worker, so that a disordered trade never tried goes in
with the COPY): it saved nothing measurable (live 15.2 and 14.2 µs against 14.6 and 13.7,
alternating; a backlog's batches of 5,000 left only 341 of 200k first copies to the staging
table anyway, 82 with it) and the batch commit's p99 doubled, so it was not kept.

Before (session 2: msgspec parser, parse while the batch before is written, fewer round trips,
`gc.freeze`): 32k → 46-49k trades/s.

Not done, by expected gain:

1. Fold the windows in the parse stage (speculatively: the store then confirms which trades are
   new), taking ~1.5 µs a message off the writers; a failed or fenced batch must then also undo
   the next batch's folding.
2. A window of recently tried ids per symbol, so that disordered trades never sent before go in
   with the COPY instead of the staging table (4 round trips and a speculative insert each).
3. Worker processes per partition on a machine with more CPUs (several `candlekeep stream` in
   one group already split the partitions).
4. `synchronous_commit = off` for the worker's sessions was not tried: offsets commit with the
   rows, so a PostgreSQL crash would only lose whole batches that are read again, but it changes
   what a committed batch means to an operator.
"""


def render_live(live: LiveRun | None) -> str:
    if live is None:
        return ""
    low, high, interpolated = quantile(live.histogram, 0.99)
    c_low, c_high, _ = quantile(live.commit_histogram, 0.99)
    return f"""
**Live stream** (the delay a running pipeline sees): the worker started first, then the first
{live.messages:,} of those messages produced at {live.rate:,} msgs/s (achieved:
{live.produced_rate:,.0f}), to a fresh topic and database.

- counted from when the worker had caught up with what arrived while it joined the group:
  {live.histogram[-1][1]:,.0f} windows closed;
- p99 close → commit **{fmt_s(low)}–{fmt_s(high)} (~{fmt_s(interpolated)})**, p99 batch
  commit {fmt_s(c_low)}–{fmt_s(c_high)};
- the worker used {live.worker_cpu_share:.0%} of one CPU ({live.worker_us:.1f} µs a message;
  PostgreSQL {live.postgres_us:.1f} µs): its batches are small (what arrives within
  `CANDLEKEEP_STREAM_LINGER` of a batch's first message), so each message carries more of a
  batch's fixed cost than in a backlog.
"""


def render(
    results: list[SizeResult], when: datetime, quick: bool, live: LiveRun | None = None
) -> str:
    m = machine()
    rows = []
    for r in results:
        w = r.worker
        low, high, interpolated = quantile(w.histogram, 0.99)
        c_low, c_high, _ = quantile(w.commit_histogram, 0.99)
        rows.append(
            f"| {r.trades:,} | {r.messages:,} | {r.bare[0].rate:,.0f} / {r.bare[1].rate:,.0f}"
            f" | {w.rate:,.0f} | **{r.ratio:.2f}** | {fmt_s(low)}–{fmt_s(high)}"
            f" (~{fmt_s(interpolated)}) | {fmt_s(c_low)}–{fmt_s(c_high)} | {w.peak_rss_mb:.0f}"
            f" | {w.worker_cpu_s:.0f} / {w.postgres_cpu_s:.0f} / {w.broker_cpu_s:.0f}"
            f" | {r.bare_cpu_us:.1f} / {1e6 * w.worker_cpu_s / r.messages:.1f}"
            f" / {1e6 * w.postgres_cpu_s / r.messages:.1f} |"
        )
    ratios = [r.ratio for r in results]
    met = all(x >= TARGET_RATIO for x in ratios)
    verdict = (
        f"**worker / bare consumer: {min(ratios):.2f}–{max(ratios):.2f}**; target ≥"
        f" {TARGET_RATIO}: **{'met' if met else 'not met'}**."
    )
    rss = [r.worker.peak_rss_mb for r in results]
    if len(results) > 1:
        growth = rss[-1] / rss[0]
        scale = results[-1].trades / results[0].trades
        flat = (
            f"Peak RSS {rss[0]:.0f} MB at {results[0].trades:,} trades and {rss[-1]:.0f} MB at"
            f" {results[-1].trades:,}: ×{growth:.2f} for ×{scale:g} the trades,"
            f" {'flat' if growth < 1.15 else 'NOT flat'}."
        )
    else:
        flat = "One size only (`--quick`): no flatness check."
    first = results[0]
    spread = "; ".join(f"{n:,}" for _, n in sorted(first.per_partition.items()))
    details = "\n".join(
        f"- {r.trades:,} trades: {r.worker.progress['stored']:,} stored,"
        f" {r.worker.progress['duplicates']:,} duplicates, {r.worker.progress['invalid']:,}"
        f" invalid, {r.worker.progress['late']:,} late, {r.worker.candles:,} candle rows; produced"
        f" at {r.produce_rate:,.0f} msgs/s; broker RSS {r.broker_rss_mb:,.0f} MB at the end."
        for r in results
    )
    return f"""{SECTION}

How to run: `.venv/bin/python bench/stream_throughput.py [--trades N [N ...]] [--quick]
[--no-write-docs] [--batch-size N] [--profile raw|flamegraph|speedscope]` (default 1M then 5M
trades, then a live stream of {LIVE_RATE:,} msgs/s for {LIVE_SECONDS} s, about 10 minutes;
`--quick`: 200k and 10 s live, a smoke run that writes no docs; `--profile` runs py-spy,
`pip install py-spy`, on the worker into `bench/out/stream/`, and skips the live stream;
`--live-only SECONDS` runs the live stream alone, on the largest size's messages, and prints it).
Needs only the project's own dependencies: the broker (Tansu, in memory) and PostgreSQL are the
embedded ones, started fresh by the script (data in `bench/out/stream/`).

Per size, in one run: the synthetic market (`synthetic_messages`, default dials: 3 symbols, about
5% disordered, 0.2% late, 1% duplicates, 0.5% invalid) is produced to a new 4-partition topic in
feed order. The symbol keys land on only two of the partitions ({spread} messages on partitions
0 to 3 at {first.trades:,} trades), so the worker has two busy partitions. Then, on that topic:

- **bare consumer**: an aiokafka consumer group with the worker's fetch settings,
  `getmany(max_records={first.batch_size})` (the worker's batch size), no processing, offsets
  committed per batch; msgs/s from the first batch to the last, and the CPU time of the process
  it runs in over the same span. It runs before and after the worker; the ratio uses the better
  of the two.
- **worker**: `candlekeep stream --exit-when-idle {IDLE_EXIT_S}` as a subprocess (batch
  {first.batch_size}, session timeout 3 s), on a fresh database. Trades/s = messages committed to
  PostgreSQL (`sum(stream_progress.consumed)`, polled every {POLL_S} s) between the first poll
  that sees a commit and the first that sees all of them, over the time between those polls:
  start-up, the group join and the final idle wait are excluded.
- **close → commit**: p99 of `candlekeep_window_close_to_commit_seconds`, from the worker's
  `/metrics` (scraped every second, the last time during its final idle wait): from the moment
  the batch holding the message that closed a window was fetched (its first message: a live
  batch gathers for `CANDLEKEEP_STREAM_LINGER`) to the commit of that batch's transaction,
  parsing and writing included. While a backlog is read every batch closes windows, so this is
  about the time one batch takes. The histogram's buckets are 5, 10, 25, 50, 100, 150, 200,
  250, 500 ms, 1, 2.5, 5, 10 s: the p99 is only known to a bucket, and the table gives that
  bucket and a linear interpolation inside it (as Prometheus' `histogram_quantile` does). The
  p99 of `candlekeep_batch_commit_seconds` (one batch's write and commit) is shown next to it.
- **peak RSS**: the worker process's `VmHWM`.
- **CPU**: of the worker process (start-up and the final idle wait included), of PostgreSQL's
  processes and of the broker over the worker's run, and per message consumed.

Last run ({when:%Y-%m-%d %H:%M} UTC{", --quick" if quick else ""}): {m["cpus"]} CPUs
({m["cpu"]}), {m["memory"]} RAM, {m["system"]}, Python {m["python"]}. The broker, PostgreSQL and
the worker share the {m["cpus"]} CPUs.

{HEADER}
{chr(10).join(rows)}

{verdict} {flat}

{details}
{render_live(live)}
{ANALYSIS}"""


def write_docs(text: str) -> None:
    current = DOCS.read_text(encoding="utf-8")  # re-read: others edit other sections
    start = current.find(SECTION)
    if start < 0:
        DOCS.write_text(current.rstrip("\n") + "\n\n" + text, encoding="utf-8")
        return
    following = current.find("\n## ", start + len(SECTION))
    rest = "" if following < 0 else current[following:]
    DOCS.write_text(current[:start] + text.rstrip("\n") + "\n" + rest, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, nargs="+", default=list(SIZES), metavar="N")
    parser.add_argument("--quick", action="store_true", help="200k trades, writes no docs")
    parser.add_argument("--no-write-docs", action="store_true")
    parser.add_argument(
        "--docs-from-last",
        action="store_true",
        help="render the section again from the last run's saved results (no measuring)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="the worker's batch size (default: CANDLEKEEP_BATCH_SIZE's)"
    )
    parser.add_argument(
        "--profile",
        choices=("raw", "flamegraph", "speedscope"),
        help="run py-spy (pip install py-spy) on the worker: bench/out/stream/worker-N.FORMAT",
    )
    parser.add_argument(
        "--live-only",
        type=int,
        metavar="SECONDS",
        help="only the live stream, for SECONDS (its messages: the largest size's), no docs",
    )
    args = parser.parse_args()
    sizes = list(QUICK_SIZES) if args.quick else args.trades
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if args.docs_from_last:
        with LAST.open("rb") as handle:
            results, when, quick, live = pickle.load(handle)
    else:
        when = datetime.now(UTC)
        quick = args.quick or args.live_only is not None
        live_seconds = 0 if args.profile else (10 if args.quick else LIVE_SECONDS)
        if args.live_only is not None:
            live_seconds = args.live_only
        results, live = run_all(
            sizes, args.profile, args.batch_size, live_seconds, args.live_only is not None
        )
        if not (quick or args.profile):  # (what --docs-from-last renders: a documented run)
            with LAST.open("wb") as handle:
                pickle.dump((results, when, quick, live), handle)
    if not results:  # (--live-only: its line above is the result)
        return
    text = render(results, when, quick, live)
    print(text)
    if not (quick or args.no_write_docs):
        write_docs(text)
        print(f"wrote {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
