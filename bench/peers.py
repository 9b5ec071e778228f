"""Benchmark: candlekeep side by side with the peers a user would pick instead (issue 15).

``stream``: one embedded broker (Tansu), one topic of the stream benchmark's synthetic messages
(``bench/stream_throughput.py``'s cached file: 3 symbols, ~5% disordered, 0.2% late, 1%
duplicates, 0.5% invalid), produced once; then, in alternating rounds, each system reads the whole
topic on its own consumer group (or, for bytewax, its own assignment) into a fresh database of one
embedded PostgreSQL:

- the bare aiokafka loop of the stream benchmark (``getmany``, nothing done, offsets committed);
- candlekeep's worker (``candlekeep stream``), 1m,5m,15m,1h and 1m only;
- bytewax 0.21 and Quix Streams 3.28 (``bench/peer_flows.py``), 1m and the four intervals.

A system's rate is measured on its candles as they land in PostgreSQL (polled every 0.1 s): from
the first 1m candle to the last one compared, over the messages whose trade time lies between
those windows' ends; its CPU time, and PostgreSQL's, over the same span. Before any number is
printed, every compared 1m candle of every run must equal, to the last digit, the core's fold
(``shared.core.aggregation.aggregate``) over the trades candlekeep's rules call on time (first
copy of each id, watermark per partition 5 s behind its greatest trade time).

``aggregate``: ``candlekeep aggregate`` (all cores, and ``--workers 1``), bytewax ``fold_window``
(``bench/aggregate_vs_bytewax.py``'s flow) and DuckDB 2.0 (one thread, exact DECIMAL) on the same
Binance trades file; every 1m candle checked equal.

Results go to docs/benchmarks.md, section "Peers side by side". Needs ``pip install -e
'.[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH_DIR))

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from peer_flows import CANDLE_TABLE  # noqa: E402
from peer_model import Reference, compare, meanings_differ, reference  # noqa: E402
from stream_throughput import (  # noqa: E402
    PARTITIONS,
    CpuTracker,
    bare_consumer,
    generate,
    machine,
    produce_file,
    messages_path as messages_dir,
    vm_hwm_mb,
)

from candlekeep.embedded import EmbeddedBroker, EmbeddedPostgres  # noqa: E402
from shared.store import db  # noqa: E402
from tests.streaming import settings_env, stream_settings  # noqa: E402

OUT_DIR = BENCH_DIR / "out" / "peers"
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Peers side by side"
TRADES, QUICK_TRADES = 1_000_000, 100_000
POLL_S = 0.1
FOUR = "1m,5m,15m,1h"
BATCH = 5000

#: The systems, in the table's order: (label, kind, intervals).
SYSTEMS = {
    "bare": ("bare aiokafka loop", "bare", ""),
    "candlekeep": ("candlekeep stream, 1m,5m,15m,1h", "candlekeep", FOUR),
    "candlekeep-1m": ("candlekeep stream, 1m", "candlekeep", "1m"),
    "bytewax": ("bytewax 0.21, 4 intervals", "bytewax", FOUR),
    "bytewax-1m": ("bytewax 0.21, 1m", "bytewax", "1m"),
    "quix": ("Quix Streams 3.28, 4 intervals", "quix", FOUR),
    "quix-1m": ("Quix Streams 3.28, 1m", "quix", "1m"),
}
#: What a larger candle holds, per system (bench/peer_model.py).
MEANING = {"candlekeep": "candlekeep", "bytewax": "behind", "quix": "independent"}
GUARANTEES = {
    "bare": "none (reads and commits offsets)",
    "candlekeep": "effectively once: trades, candles, late and invalid rows, offsets and window"
    " state in one transaction per batch",
    "bytewax": "candles only; offsets not stored (no recovery configured: a restart reads the"
    " topic again from the start; with recovery, at least once)",
    "quix": "candles only; at least once (sink flushed, then offsets committed, each checkpoint)",
}


# --- the topic ----------------------------------------------------------------------------------


async def create_topic(bootstrap: str, topic: str) -> None:
    """With ``retention.ms`` set at creation: Tansu reports only the configs a topic was
    created with, and Quix refuses a topic whose retention it cannot read."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, PARTITIONS, 1, topic_configs={"retention.ms": "604800000"})]
        )
    finally:
        await admin.close()


# --- one run of one system ----------------------------------------------------------------------


@dataclass
class Run:
    system: str
    rate: float  # messages a second, over the measured span
    cpu_us: float  # the system's process, a message
    pg_cpu_us: float | None  # PostgreSQL, a message
    peak_rss_mb: float
    candles: dict = field(default_factory=dict)  # (symbol, interval, start_us) -> values


def fresh_database(postgres: EmbeddedPostgres, kind: str) -> str:
    name = f"bench_peers_{kind}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(postgres.url_for("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = postgres.url_for(name)
    if kind == "candlekeep":
        db.upgrade(url)
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(CANDLE_TABLE)
    return url


def drop_database(postgres: EmbeddedPostgres, url: str) -> None:
    name = url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(postgres.url_for("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def command_for(kind: str, intervals: str, bootstrap: str, topic: str, url: str, scratch: Path):
    """(argv, extra environment) of one system's process."""
    if kind == "candlekeep":
        settings = stream_settings(topic_trades=topic, intervals=intervals, batch_size=BATCH)
        env = settings_env(settings, url, bootstrap)
        return [sys.executable, "-m", "candlekeep", "stream", "--exit-when-idle", "3"], env
    env = dict(os.environ)
    if kind == "bytewax":
        factory = f"bytewax_flow({bootstrap!r}, {topic!r}, {url!r}, {intervals!r})"
        flow = f"{BENCH_DIR / 'peer_flows.py'}:{factory}"
        return [sys.executable, "-m", "bytewax.run", "-w", "1", flow], env
    script = str(BENCH_DIR / "peer_flows.py")
    return [sys.executable, script, "quix", bootstrap, topic, url, intervals, str(scratch)], env


def run_system(
    system: str, bootstrap: str, topic: str, postgres: EmbeddedPostgres, ref: Reference
) -> Run:
    _, kind, intervals = SYSTEMS[system]
    if kind == "bare":
        return run_bare(bootstrap, topic, ref.messages)
    url = fresh_database(postgres, kind)
    table = "stream_candles" if kind == "candlekeep" else "peer_candles"
    count = sql.SQL(
        "SELECT count(*) FROM {} WHERE interval = '1m' AND window_start < to_timestamp(%s)"
    ).format(sql.Identifier(table))
    cutoff_s = ref.last_start_us / 1e6 + 1  # the compared 1m windows start before this
    log = OUT_DIR / f"{system}.log"
    try:
        with (
            tempfile.TemporaryDirectory(dir=OUT_DIR) as scratch,
            log.open("wb") as out,
            db.connect(url) as conn,
        ):
            argv, env = command_for(kind, intervals, bootstrap, topic, url, Path(scratch))
            process = subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=REPO)
            me = psutil.Process(process.pid)
            cpu = CpuTracker(me, children=True)
            pg_cpu = CpuTracker(psutil.Process(postgres.pid), children=True)
            first = last = None  # (time, own CPU s, PostgreSQL CPU s)
            peak = 0.0
            deadline = time.perf_counter() + 900
            while process.poll() is None and time.perf_counter() < deadline:
                now = time.perf_counter()
                done = conn.execute(count, (cutoff_s,)).fetchone()[0]
                conn.rollback()
                cpu.sample()
                pg_cpu.sample()
                peak = max(peak, vm_hwm_mb(process.pid) or 0.0)
                if done and first is None:
                    first = (now, cpu.seconds, pg_cpu.seconds)
                if done >= ref.compared_1m:
                    last = (now, cpu.seconds, pg_cpu.seconds)
                    break
                time.sleep(POLL_S)
            if kind == "quix" or last is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if last is None or first is None:
                raise SystemExit(f"{system} did not write every compared 1m candle; see {log}")
            candles = read_candles(conn, table)
    finally:
        drop_database(postgres, url)
    span = ref.span_messages
    seconds = max(last[0] - first[0], 1e-9)
    return Run(
        system,
        span / seconds,
        1e6 * (last[1] - first[1]) / span,
        1e6 * (last[2] - first[2]) / span,
        peak,
        candles,
    )


def read_candles(conn: psycopg.Connection, table: str) -> dict:
    rows = conn.execute(
        sql.SQL(
            "SELECT symbol, interval, (extract(epoch FROM window_start) * 1000000)::bigint,"
            " open, high, low, close, volume, quote_volume, trade_count, first_trade_id,"
            " last_trade_id, taker_buy_volume, taker_buy_quote_volume FROM {}"
        ).format(sql.Identifier(table))
    ).fetchall()
    conn.rollback()
    return {tuple(r[:3]): tuple(r[3:]) for r in rows}


def run_bare(bootstrap: str, topic: str, total: int) -> Run:
    """The stream benchmark's bare loop, in a process of its own (its CPU and peak RSS alone)."""
    argv = [sys.executable, __file__, "--bare", bootstrap, topic, str(total)]
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the bare loop failed:\n{text}")
    result = json.loads(text.strip().splitlines()[-1])
    return Run(
        "bare",
        result["consumed"] / result["seconds"],
        1e6 * result["cpu_s"] / result["consumed"],
        None,
        usage.ru_maxrss / 1024,
    )


def bare_main(bootstrap: str, topic: str, total: str) -> None:
    run = asyncio.run(bare_consumer(bootstrap, topic, int(total), BATCH))
    print(json.dumps({"consumed": run.consumed, "seconds": run.seconds, "cpu_s": run.cpu_s}))


# --- the stream table ---------------------------------------------------------------------------


@dataclass
class StreamResult:
    trades: int
    ref: Reference
    rounds: int
    runs: dict[str, list[Run]]
    checked: dict[str, tuple[int, int]]
    load: tuple[float, float]  # load average (1 min) at the start and at the end


def run_stream(trades: int, systems: list[str], rounds: int) -> StreamResult:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    messages_dir(trades).parent.mkdir(parents=True, exist_ok=True)
    path = generate(trades)
    print(f"== stream: {trades:,} trades, systems {', '.join(systems)}, {rounds} round(s)")
    ref = reference(path)
    print(
        f"  reference: {ref.messages:,} messages, {ref.compared_1m:,} compared 1m candles,"
        f" {ref.late_1m:,} trades late for 1m, {ref.span_messages:,} messages in the span"
    )
    load_start = os.getloadavg()[0]
    postgres = EmbeddedPostgres(OUT_DIR / "pg").start()
    broker = EmbeddedBroker(OUT_DIR / "broker").start()
    runs: dict[str, list[Run]] = {s: [] for s in systems}
    checked: dict[str, tuple[int, int]] = {}
    try:
        bootstrap = broker.bootstrap_servers
        topic = f"peers-{uuid.uuid4().hex[:8]}.trades"
        asyncio.run(create_topic(bootstrap, topic))
        sent, _ = asyncio.run(produce_file(bootstrap, topic, path))
        assert sent == ref.messages, (sent, ref.messages)
        for round_number in range(rounds):
            shift = round_number % len(systems)
            for system in systems[shift:] + systems[:shift]:
                run = run_system(system, bootstrap, topic, postgres, ref)
                _, kind, intervals = SYSTEMS[system]
                if kind != "bare":
                    try:
                        checked[system] = compare(run.candles, ref, intervals, MEANING[kind])
                    except AssertionError as exc:
                        raise SystemExit(f"{system}: candles differ: {exc}") from None
                    run.candles = {}
                runs[system].append(run)
                pg = "" if run.pg_cpu_us is None else f", PostgreSQL {run.pg_cpu_us:.1f}"
                print(
                    f"  round {round_number + 1}: {system:<14} {run.rate:>9,.0f} msgs/s,"
                    f" CPU µs a message: {run.cpu_us:.1f}{pg}; peak RSS {run.peak_rss_mb:.0f} MB",
                    flush=True,
                )
    finally:
        broker.stop()
        postgres.stop()
    return StreamResult(trades, ref, rounds, runs, checked, (load_start, os.getloadavg()[0]))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--bare":
        bare_main(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=TRADES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--quick", action="store_true", help="100k trades, 1 round, no docs")
    parser.add_argument("--no-write-docs", action="store_true")
    args = parser.parse_args()
    trades, rounds = (QUICK_TRADES, 1) if args.quick else (args.trades, args.rounds)
    result = run_stream(trades, args.systems, rounds)
    print(json.dumps({s: [r.rate for r in rs] for s, rs in result.runs.items()}))


if __name__ == "__main__":
    main()
