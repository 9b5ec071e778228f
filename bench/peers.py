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
import dataclasses
import json
import os
import pickle
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
from peer_model import Reference, compare, reference  # noqa: E402
from stream_throughput import (  # noqa: E402
    PARTITIONS,
    CpuTracker,
    bare_consumer,
    generate,
    machine,
    messages_path,
    produce_file,
    vm_hwm_mb,
)

from candlekeep.embedded import EmbeddedBroker, EmbeddedPostgres  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.store import db  # noqa: E402
from tests.streaming import settings_env, stream_settings  # noqa: E402

OUT_DIR = BENCH_DIR / "out" / "peers"
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Peers side by side"
TRADES, QUICK_TRADES = 1_000_000, 50_000
POLL_S = 0.1
FOUR = "1m,5m,15m,1h"
#: The worker's batch size: the setting's default (the bare loop fetches as many at a time).
BATCH = Settings().batch_size
#: Where ``--profile`` writes the systems' CPU profiles (None: no profiling).
PROFILE_DIR: Path | None = None

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
    created with, and Quix stops with ``KeyError: 'retention.ms'`` on a topic without it."""
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
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def command_for(kind: str, intervals: str, bootstrap: str, topic: str, url: str, scratch: Path):
    """(argv, environment) of one system's process."""
    env = dict(os.environ)
    if kind == "candlekeep":
        settings = stream_settings(topic_trades=topic, intervals=intervals, batch_size=BATCH)
        env = settings_env(settings, url, bootstrap)
        command = ["-m", "candlekeep", "stream", "--exit-when-idle", "3"]
    elif kind == "bytewax":
        factory = f"bytewax_flow({bootstrap!r}, {topic!r}, {url!r}, {intervals!r})"
        flow = f"{BENCH_DIR / 'peer_flows.py'}:{factory}"
        # One epoch for the whole run (`-s`; default 10 s): at an epoch's end bytewax snapshots
        # the operators' state with deepcopy, the dedupe sets included, and without recovery
        # nothing uses the snapshots. Favours bytewax.
        command = ["-m", "bytewax.run", "-w", "1", "-s", "86400", flow]
    else:
        script = str(BENCH_DIR / "peer_flows.py")
        command = [script, "quix", bootstrap, topic, url, intervals, str(scratch)]
    if PROFILE_DIR is not None:  # yappi, CPU clock, every thread: bench/cpu_profile.py
        name = f"{kind}-{intervals.replace(',', '-')}-{uuid.uuid4().hex[:4]}.txt"
        command = [str(BENCH_DIR / "cpu_profile.py"), str(PROFILE_DIR / name), *command]
    return [sys.executable, *command], env


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
            deadline = time.perf_counter() + 2400
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
    """The stream benchmark's bare loop, in a process of its own (its CPU and peak RSS alone;
    ``VmHWM``, as wait4's figure starts from this process's size at the fork)."""
    argv = [sys.executable, __file__, "--bare", bootstrap, topic, str(total)]
    peak = 0.0
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            peak = max(peak, vm_hwm_mb(process.pid) or 0.0)
            time.sleep(POLL_S)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"the bare loop failed:\n{text}")
    result = json.loads(text.strip().splitlines()[-1])
    return Run(
        "bare",
        result["consumed"] / result["seconds"],
        1e6 * result["cpu_s"] / result["consumed"],
        None,
        peak,
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


LAST = OUT_DIR / "last.pickle"
KEEP_RESULTS = True


def save(stream: StreamResult | None = None, aggregate: AggregateResult | None = None) -> None:
    """Keep what was measured so far (``--docs-from-last`` renders it again), the reference's
    candles left out."""
    if not KEEP_RESULTS:
        return
    saved = load_last()
    if stream is not None:
        stream = dataclasses.replace(
            stream, ref=dataclasses.replace(stream.ref, candlekeep={}, independent={}, behind={})
        )
    saved = (stream or saved[0], aggregate or saved[1])
    with LAST.open("wb") as handle:
        pickle.dump(saved, handle)


def load_last() -> tuple:
    if not LAST.exists():
        return None, None
    with LAST.open("rb") as handle:
        return pickle.load(handle)


#: Systems slow enough (Quix Streams: ~10 minutes a round at 1M trades) that ``--slow-rounds``
#: may give them fewer rounds than the others; the rounds column says how many each had.
SLOW = ("quix", "quix-1m")


def run_stream(
    trades: int, systems: list[str], rounds: int, slow_rounds: int | None = None
) -> StreamResult:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    messages_path(trades).parent.mkdir(parents=True, exist_ok=True)
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
                if system in SLOW and slow_rounds is not None and round_number >= slow_rounds:
                    continue
                run = run_system(system, bootstrap, topic, postgres, ref)
                _, kind, intervals = SYSTEMS[system]
                if kind != "bare":
                    try:
                        checked[system] = compare(run.candles, ref, intervals, MEANING[kind])
                    except AssertionError as exc:
                        raise SystemExit(f"{system}: candles differ: {exc}") from None
                    run.candles = {}
                runs[system].append(run)
                save(StreamResult(trades, ref, round_number + 1, runs, checked, (0.0, 0.0)))
                pg = "" if run.pg_cpu_us is None else f", PostgreSQL {run.pg_cpu_us:.1f}"
                print(
                    f"  round {round_number + 1}: {system:<14} {run.rate:>9,.0f} msgs/s,"
                    f" CPU µs a message: {run.cpu_us:.1f}{pg}; peak RSS {run.peak_rss_mb:.0f} MB",
                    flush=True,
                )
    finally:
        broker.stop()
        postgres.stop()
    result = StreamResult(trades, ref, rounds, runs, checked, (load_start, os.getloadavg()[0]))
    save(result)
    return result


# --- aggregate: candlekeep, bytewax and DuckDB on one trades file ------------------------------

#: DuckDB's query: one thread, exact DECIMAL. Prices and quantities are read as DECIMAL(18,8)
#: (the file has at most 8 decimals); their product is taken in DECIMAL(38,8) × DECIMAL(38,8) =
#: DECIMAL(38,16), since DECIMAL(18,8) × DECIMAL(18,8) overflows DuckDB's 18-digit
#: intermediate. Open and close are the prices with the least and greatest (time, id).
DUCKDB_QUERY = """
COPY (
  SELECT time // 60000 * 60000 AS window_start_ms,
    arg_min(price, {'t': time, 'i': id})::VARCHAR AS open, max(price)::VARCHAR AS high,
    min(price)::VARCHAR AS low, arg_max(price, {'t': time, 'i': id})::VARCHAR AS close,
    sum(quantity)::VARCHAR AS volume,
    sum(price::DECIMAL(38, 8) * quantity::DECIMAL(38, 8))::VARCHAR AS quote_volume,
    count(*) AS trade_count,
    arg_min(id, {'t': time, 'i': id}) AS first_trade_id,
    arg_max(id, {'t': time, 'i': id}) AS last_trade_id,
    coalesce(sum(quantity) FILTER (WHERE NOT maker), 0)::VARCHAR AS taker_buy_volume,
    coalesce(sum(price::DECIMAL(38, 8) * quantity::DECIMAL(38, 8)) FILTER (WHERE NOT maker), 0)
      ::VARCHAR AS taker_buy_quote_volume
  FROM read_csv('{path}', header = false, columns = {
    'id': 'BIGINT', 'price': 'DECIMAL(18,8)', 'quantity': 'DECIMAL(18,8)',
    'quote': 'VARCHAR', 'time': 'BIGINT', 'maker': 'BOOLEAN', 'best': 'VARCHAR'})
  GROUP BY 1 ORDER BY 1
) TO '{out}' (FORMAT json)
"""


def duckdb_main(csv_path: str, out_path: str) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads TO 1")
    con.execute(DUCKDB_QUERY.replace("{path}", csv_path).replace("{out}", out_path))


@dataclass
class AggregateResult:
    trades: int
    rounds: int
    runs: dict  # name -> [aggregate_vs_bytewax.Run]
    windows: int


def run_aggregate(trades: int, rounds: int) -> AggregateResult:
    import aggregate_vs_bytewax as avb
    from make_trades import cached_trades

    out = BENCH_DIR / "out"
    print(f"== aggregate: {trades:,} trades, {rounds} round(s)")
    csv_path = cached_trades(out, trades)
    ck, ck1 = out / "peers-candlekeep.jsonl", out / "peers-candlekeep-w1.jsonl"
    bw, bw_late, duck = (
        out / "peers-bytewax.jsonl",
        out / "peers-bytewax-late.txt",
        out / "peers-duckdb.jsonl",
    )
    commands = {
        AGG_CK: avb.candlekeep_command(csv_path, ck),
        AGG_CK1: avb.candlekeep_command(csv_path, ck1, workers=1),
        AGG_BW: avb.bytewax_command(csv_path, bw, bw_late),
        AGG_DUCK: [sys.executable, __file__, "--duckdb", str(csv_path), str(duck)],
    }
    outputs = {AGG_CK: [ck], AGG_CK1: [ck1], AGG_BW: [bw, bw_late], AGG_DUCK: [duck]}
    runs: dict = {name: [] for name in commands}
    names = list(commands)
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            for stale in outputs[name]:
                stale.unlink(missing_ok=True)
            run = avb.timed(commands[name])
            runs[name].append(run)
            print(
                f"  round {round_number + 1}: {name:<24} {run.wall_s:6.2f} s wall,"
                f" {1e6 * run.cpu_s / trades:5.2f} µs CPU a trade",
                flush=True,
            )
    assert ck.read_bytes() == ck1.read_bytes(), "candlekeep: all cores != --workers 1"
    windows = avb.check_agreement(ck, bw, bw_late)
    ours, theirs = avb.candlekeep_candles(ck), avb.bytewax_candles(duck)
    assert ours == theirs, "DuckDB's candles differ from candlekeep's"
    print(f"  checked: {windows} 1m candles, equal in candlekeep, bytewax and DuckDB")
    result = AggregateResult(trades, rounds, runs, windows)
    save(aggregate=result)
    return result


AGG_CK, AGG_CK1 = "candlekeep (all cores)", "candlekeep --workers 1"
AGG_BW, AGG_DUCK = "bytewax -w 1", "DuckDB 2.0, 1 thread"


# --- reporting ----------------------------------------------------------------------------------


def median(values) -> float:
    return statistics.median(values)


def target_line(label: str, value: float, target: float, more_is_better: bool = True) -> str:
    met = value >= target if more_is_better else value <= target
    sign = "≥" if more_is_better else "≤"
    return (
        f"- {label}: **{value:.2f}** (target {sign} {target:g}): **{'met' if met else 'not met'}**"
    )


STREAM_HEADER = (
    "| system | msgs/s | CPU µs a message (process) | PostgreSQL CPU µs a message"
    " | peak RSS (MB) | rounds | guarantees |\n|---|---:|---:|---:|---:|---|---|"
)


def render_stream(result: StreamResult) -> tuple[str, list[str]]:
    runs, ref = result.runs, result.ref
    rows = []
    for system, system_runs in runs.items():
        label, kind, _ = SYSTEMS[system]
        pg = [r.pg_cpu_us for r in system_runs if r.pg_cpu_us is not None]
        rows.append(
            f"| {label} | {median(r.rate for r in system_runs):,.0f}"
            f" | {median(r.cpu_us for r in system_runs):.1f}"
            f" | {f'{median(pg):.1f}' if pg else '–'}"
            f" | {max(r.peak_rss_mb for r in system_runs):.0f}"
            f" | {', '.join(f'{r.rate / 1000:.1f}k' for r in system_runs)}"
            f" | {GUARANTEES[kind]} |"
        )
    rate = {s: median(r.rate for r in rs) for s, rs in runs.items()}
    targets = []
    for ours, theirs, target in (
        ("candlekeep", "bytewax", 3.0),
        ("candlekeep", "quix", 10.0),
        ("candlekeep-1m", "bytewax-1m", 2.0),
    ):
        if ours in rate and theirs in rate:
            targets.append(
                target_line(
                    f"{SYSTEMS[ours][0]} / {SYSTEMS[theirs][0]}",
                    rate[ours] / rate[theirs],
                    target,
                )
            )
    for system in ("candlekeep", "candlekeep-1m"):
        if system not in runs:
            continue
        cpu = median(r.cpu_us + (r.pg_cpu_us or 0) for r in runs[system])
        label = SYSTEMS[system][0]
        targets.append(
            target_line(f"{label}: worker + PostgreSQL CPU µs a message", cpu, 10.0, False)
        )
        if "bare" in runs:
            bare = median(r.cpu_us for r in runs["bare"])
            targets.append(
                target_line(f"{label}: the same / the bare loop's", cpu / bare, 4.5, False)
            )
    checked = "\n".join(
        f"- {SYSTEMS[s][0]}: {one:,} 1m candles"
        + (f" and {larger:,} larger ones" if larger else "")
        for s, (one, larger) in result.checked.items()
    )
    differ = ref.differ
    text = f"""Stream: {result.trades:,} trades, {ref.messages:,} messages on 4 partitions,
{result.rounds} round(s) (each system's in its rounds column); load average
{result.load[0]:.1f} at the start and {result.load[1]:.1f} at the end. Rates are messages a second
over the {ref.span_messages:,} messages between the first and the last compared 1m window;
medians of the rounds (each round's rate in its column).

{STREAM_HEADER}
{chr(10).join(rows)}

Checked before the table was printed, in every run, every candle equal to the last digit to
candlekeep's core over the same trades ({ref.compared_1m:,} 1m windows; {ref.late_1m:,} trades
late for 1m by candlekeep's rule, which every system left out alike):

{checked}

Larger candles mean different things (see below): of the compared 5m, 15m and 1h candles,
{", ".join(f"{n} {name}" for name, n in differ["independent"].items())} differ between
candlekeep's meaning and Quix's, and
{", ".join(f"{n} {name}" for name, n in differ["behind"].items())} between candlekeep's and
bytewax's; each system's larger candles were checked against its own meaning.
"""
    return text, targets


def render_aggregate(result: AggregateResult) -> tuple[str, list[str]]:
    runs, trades = result.runs, result.trades
    cpu_us = {n: median(1e6 * r.cpu_s / trades for r in rs) for n, rs in runs.items()}
    cores = {AGG_CK: f"{os.cpu_count()} worker processes", AGG_CK1: "1", AGG_BW: "1"}
    cores[AGG_DUCK] = "1"
    rows = "\n".join(
        f"| {name} | {cores[name]} | {trades / median(r.wall_s for r in rs):,.0f}"
        f" | {cpu_us[name]:.2f} | {', '.join(f'{r.wall_s:.2f}' for r in rs)} |"
        for name, rs in runs.items()
    )
    wall = {n: median(r.wall_s for r in rs) for n, rs in runs.items()}
    text = f"""`aggregate`: {trades:,} Binance trades (`bench/make_trades.py`), 1m candles, each
system a subprocess timed from start to exit, {result.rounds} round(s); all {result.windows}
candles equal in the four outputs.

| | cores | trades/s (wall) | CPU µs a trade | wall times (s) |
|---|---|---:|---:|---|
{rows}
"""
    targets = [
        target_line(
            "`aggregate` one core each, candlekeep / bytewax (CPU a trade)",
            cpu_us[AGG_BW] / cpu_us[AGG_CK1],
            3.0,
        ),
        f"- beside it, DuckDB / candlekeep on one core: DuckDB needs"
        f" {cpu_us[AGG_DUCK] / cpu_us[AGG_CK1]:.2f}× candlekeep's CPU a trade; candlekeep on all"
        f" cores takes {wall[AGG_CK] / wall[AGG_DUCK]:.2f}× DuckDB's one-thread wall time",
    ]
    return text, targets


def render(stream: StreamResult | None, aggregate: AggregateResult | None, quick: bool) -> str:
    m = machine()
    when = datetime.now(UTC)
    parts, targets = [], []
    for result, renderer in ((stream, render_stream), (aggregate, render_aggregate)):
        if result is not None:
            text, met = renderer(result)
            parts.append(text)
            targets += met
    return f"""{SECTION}

How to run: `make .venv/bin/.bench-installed` (the `[bench]` extra: bytewax, Quix Streams,
DuckDB), then `.venv/bin/python bench/peers.py [--trades N] [--rounds K] [--slow-rounds K]
[--systems ...] [--only stream|aggregate] [--quick] [--no-write-docs]` (defaults: {TRADES:,}
trades, 3 rounds, every system: about an hour, most of it Quix Streams;
`--quick`: {QUICK_TRADES:,} trades,
one round, no docs). The embedded broker and PostgreSQL are started fresh (`bench/out/peers/`).
What each system runs and how it is measured: the docstrings of `bench/peers.py`,
`bench/peer_flows.py` (the peers' pipelines) and `bench/peer_model.py` (the check).

Last run ({when:%Y-%m-%d %H:%M} UTC{", --quick" if quick else ""}): {m["cpus"]} CPUs ({m["cpu"]}),
{m["memory"]} RAM, {m["system"]}, Python {m["python"]}; the broker, PostgreSQL and the system
measured share the CPUs.

{(chr(10) * 2).join(parts)}
Targets of issue 15 measured here (ratios within this run):

{chr(10).join(targets)}
"""


def write_section(text: str) -> None:
    """Replace this section of docs/benchmarks.md (or append it); keep the rest, and the
    hand-written analysis that follows the generated part (from ANALYSIS_MARK on)."""
    current = DOCS.read_text(encoding="utf-8")
    start = current.find(SECTION)
    if start < 0:
        DOCS.write_text(current.rstrip("\n") + "\n\n" + text, encoding="utf-8")
        return
    following = current.find("\n## ", start + len(SECTION))
    section = current[start:] if following < 0 else current[start:following]
    rest = "" if following < 0 else current[following:]
    kept = section[section.find(ANALYSIS_MARK) :] if ANALYSIS_MARK in section else ""
    body = text.rstrip("\n") + "\n" + ("\n" + kept.rstrip("\n") + "\n" if kept else "")
    DOCS.write_text(current[:start] + body + rest, encoding="utf-8")


ANALYSIS_MARK = "### Where the time goes"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--bare":
        bare_main(*sys.argv[2:])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--duckdb":
        duckdb_main(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=TRADES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--slow-rounds",
        type=int,
        metavar="K",
        help=f"run {', '.join(SLOW)} in the first K rounds only (default: every round)",
    )
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--only", choices=("stream", "aggregate"))
    parser.add_argument("--quick", action="store_true", help="50k trades, 1 round, no docs")
    parser.add_argument("--no-write-docs", action="store_true")
    parser.add_argument(
        "--docs-from-last",
        action="store_true",
        help="render the section again from the last run's saved results (no measuring)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run each system under yappi (pip install yappi) into DIR; writes no docs",
    )
    args = parser.parse_args()
    if args.profile:
        global PROFILE_DIR
        PROFILE_DIR = args.profile.resolve()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        args.no_write_docs = True
    trades, rounds = (QUICK_TRADES, 1) if args.quick else (args.trades, args.rounds)
    stream = aggregate = None
    if args.docs_from_last:
        stream, aggregate = load_last()
    else:
        global KEEP_RESULTS
        KEEP_RESULTS = not (args.quick or args.profile)  # (only a documented run's)
        if args.only != "aggregate":
            stream = run_stream(trades, args.systems, rounds, args.slow_rounds)
        if args.only != "stream":
            aggregate = run_aggregate(trades, rounds)
    text = render(stream, aggregate, args.quick)
    print(text)
    if not (args.quick or args.no_write_docs):
        write_section(text)
        print(f"wrote {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
