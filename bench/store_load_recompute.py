"""Benchmark: ``candlekeep load`` and the SQL batch recomputation on one day of 20 symbols.

For 1M and then 10M trades (one UTC day, 20 symbols, one Binance trades CSV per symbol, seeded
and cached in ``bench/out/``), each in a fresh database on the same server:

1. ``candlekeep load FILE...`` runs as the real CLI in a subprocess: wall time → rows/s, and its
   peak RSS from ``wait4`` (that child's own maximum, not the maximum over all children);
2. ``VACUUM ANALYZE trades``, then, alternating which goes first, the recomputation of the whole
   day (``recompute_batch_candles`` with 1m, 5m, 15m, 1h) and a reference single-pass
   ``GROUP BY`` count over the same rows. The result is the ratio of the medians.

The database server is ``DATABASE_URL``'s (a new database is created on it for each size), or
else an embedded PostgreSQL with its data in ``bench/out/pg``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from candlekeep.embedded import EmbeddedPostgres  # noqa: E402
from shared.batch import candle_sql  # noqa: E402
from shared.batch.recompute import WORK_MEM, recompute_batch_candles  # noqa: E402
from shared.core.intervals import IntervalSet  # noqa: E402
from shared.store import db  # noqa: E402

OUT_DIR = BENCH_DIR / "out"
PG_DIR = OUT_DIR / "pg"
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Store: load and recompute"
DEFAULT_SEED = 20260101
SIZES = (1_000_000, 10_000_000)
INTERVALS = "1m,5m,15m,1h"
TARGET_RATIO = 2.0
TARGET_RSS_MB = 200.0
DAY = datetime(2026, 1, 1, tzinfo=UTC)
DAY_US = 86_400_000_000
DAY_START_US = int(DAY.timestamp()) * 1_000_000
#: Bump when the generated files change for a given (trades, seed), so caches are not reused.
VERSION = 1

# --- the trades ---------------------------------------------------------------------------------

#: (symbol, opening price, price decimals, lot size in units of 1e-8). Trade counts fall off
#: with rank like real volumes: BTCUSDT gets the most, the last symbol about a fifth as many.
SYMBOLS = (
    ("BTCUSDT", "87000.00", 2, 1_000),
    ("ETHUSDT", "2950.00", 2, 10_000),
    ("SOLUSDT", "125.00", 2, 100_000),
    ("BNBUSDT", "860.00", 2, 100_000),
    ("XRPUSDT", "1.8500", 4, 10_000_000),
    ("DOGEUSDT", "0.12500", 5, 100_000_000),
    ("ADAUSDT", "0.3500", 4, 10_000_000),
    ("TRXUSDT", "0.2800", 4, 10_000_000),
    ("LINKUSDT", "12.50", 2, 1_000_000),
    ("AVAXUSDT", "12.00", 2, 1_000_000),
    ("DOTUSDT", "1.800", 3, 1_000_000),
    ("LTCUSDT", "78.00", 2, 100_000),
    ("BCHUSDT", "510.0", 1, 100_000),
    ("NEARUSDT", "1.600", 3, 10_000_000),
    ("UNIUSDT", "5.200", 3, 1_000_000),
    ("ATOMUSDT", "2.100", 3, 1_000_000),
    ("ETCUSDT", "12.00", 2, 1_000_000),
    ("FILUSDT", "1.300", 3, 1_000_000),
    ("APTUSDT", "1.6000", 4, 1_000_000),
    ("ARBUSDT", "0.2000", 4, 10_000_000),
)
#: Share of trades stamped with the previous trade's time (one taker order filling makers).
SAME_TIME_SHARE = 0.25
#: Share of trades stamped up to MAX_DISORDER_US before the newest time seen.
LATE_SHARE = 0.02
MAX_DISORDER_US = 2_000_000
FIRST_TRADE_ID = 5_000_000_000


def symbol_counts(total: int) -> list[int]:
    """Trades per symbol: weights 1/rank^0.55, summing exactly to ``total``."""
    weights = [1 / (rank + 1) ** 0.55 for rank in range(len(SYMBOLS))]
    counts = [int(total * w / sum(weights)) for w in weights]
    counts[0] += total - sum(counts)
    return counts


def _decimal(units: int, scale: int, decimals: int) -> str:
    """``units / 10**scale`` written with exactly ``decimals`` decimals (``decimals >= scale``)."""
    whole, frac = divmod(units, 10**scale)
    digits = f"{frac:0{scale}d}" if scale else ""
    return f"{whole}.{digits}{'0' * (decimals - scale)}" if decimals else str(whole)


def write_symbol(path: Path, index: int, trades: int, seed: int) -> Path:
    """One day of one symbol's trades as a Binance spot trades CSV (microsecond timestamps, as
    Binance writes them from 2025), written atomically."""
    symbol, opening, scale, lot = SYMBOLS[index]
    rng = random.Random(f"{seed}:{symbol}")
    units = int(opening.replace(".", ""))
    floor = max(1, units // 10)
    slot = DAY_US / trades
    latest = DAY_START_US
    trade_id = FIRST_TRADE_ID + index * 100_000_000
    lines = []
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="ascii", newline="") as handle:
        for offset in range(trades):
            # A random walk with volatility clustering, about 2e-5 of the price per trade.
            sigma = units * (0.5 + 2.0 * abs(math.sin(offset / 40_000))) / 40_000
            units = max(floor, units + round(rng.gauss(0, sigma)))
            quantity = max(1, round(rng.lognormvariate(2.5, 1.8))) * lot
            quote = (units * quantity * 10**8 // 10**scale + 5 * 10**7) // 10**8
            draw = rng.random()
            if draw < LATE_SHARE:
                ts = max(DAY_START_US, latest - rng.randint(1, MAX_DISORDER_US))
            elif draw < LATE_SHARE + SAME_TIME_SHARE:
                ts = latest
            else:  # somewhere in this trade's slot of the day: never past the day's end
                latest = max(latest, DAY_START_US + int((offset + rng.random()) * slot))
                ts = latest
            maker = "True" if rng.random() < 0.5 else "False"
            price = _decimal(units, scale, max(scale, rng.randint(2, 8)))
            lines.append(
                f"{trade_id + offset},{price},{_decimal(quantity, 8, 8)},"
                f"{_decimal(quote, 8, 8)},{ts},{maker},True\n"
            )
            if len(lines) >= 100_000:
                handle.writelines(lines)
                lines.clear()
        handle.writelines(lines)
    os.replace(partial, path)
    return path


def dataset(total: int, seed: int) -> list[Path]:
    """The CSV files of ``total`` trades (one per symbol), generated on first use."""
    directory = OUT_DIR / f"store-v{VERSION}-{len(SYMBOLS)}sym-{total}-{seed}"
    directory.mkdir(parents=True, exist_ok=True)
    date = DAY.strftime("%Y-%m-%d")
    paths = [directory / f"{s[0]}-trades-{date}.csv" for s in SYMBOLS]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    if missing:
        print(f"generating {total:,} trades into {directory} ...", flush=True)
        counts = symbol_counts(total)
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            list(
                pool.map(
                    write_symbol,
                    [paths[i] for i in missing],
                    missing,
                    [counts[i] for i in missing],
                    [seed] * len(missing),
                )
            )
    return paths


# --- the database -------------------------------------------------------------------------------


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    return urlunsplit(urlsplit(db.libpq_url(url))._replace(path="/" + database))


def fresh_database(server_url: str, name: str) -> str:
    """Drop and create ``name`` on the server, migrate it, return its URL."""
    with psycopg.connect(with_database(server_url, "postgres"), autocommit=True) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        conn.execute(drop)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(server_url, name)
    db.upgrade(url)
    return url


SETTINGS = (
    "shared_buffers",
    "work_mem",
    "hash_mem_multiplier",
    "maintenance_work_mem",
    "effective_cache_size",
    "max_parallel_workers_per_gather",
    "jit",
    "synchronous_commit",
    "max_wal_size",
)


def server_info(url: str) -> dict[str, str]:
    with db.connect(url) as conn:
        info = {"version": conn.execute("SHOW server_version").fetchone()[0]}
        for name in SETTINGS:
            info[name] = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
    return info


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Load:
    wall_s: float
    cpu_s: float
    max_rss_mb: float
    message: str


def run_load(files: list[Path], url: str) -> Load:
    """``candlekeep load FILE...`` in a subprocess: wall time, CPU time and its own peak RSS
    (``wait4`` returns the rusage of that one child, not a maximum over all children)."""
    command = [str(Path(sys.executable).with_name("candlekeep")), "load", *map(str, files)]
    env = {**os.environ, "DATABASE_URL": url}
    with tempfile.TemporaryFile() as output:  # a file, not a pipe: a full pipe would block
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command[:3])} ...\n{text}")
    message = next((line for line in text.splitlines() if line.startswith("loaded ")), text)
    return Load(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, message.strip())


#: The reference: one pass over the same rows, grouped by the same keys as the base candles.
REFERENCE = """\
SELECT count(*) FROM (
    SELECT exchange, symbol, date_bin('1 minute', ts, timestamptz 'epoch'), count(*)
    FROM trades
    WHERE ts >= %(start)s AND ts < %(end)s
    GROUP BY 1, 2, 3
) AS per_minute"""

#: For the breakdown: the reference plus the recomputation's aggregates, a group at a time. The
#: outer ``num_nonnulls`` uses every column, or PostgreSQL would not compute the unused ones.
_NUMERIC_AGGREGATES = {
    "high": "max(price)",
    "low": "min(price)",
    "volume": "sum(quantity)",
    "quote_volume": "sum(price * quantity)",
    "trade_count": "sum(raw_trades)",
    "sided": "bool_or(is_buyer_maker IS NOT NULL)",
    "taker_volume": "sum(quantity) FILTER (WHERE NOT is_buyer_maker)",
    "taker_quote": "sum(price * quantity) FILTER (WHERE NOT is_buyer_maker)",
}


def _breakdown(aggregates: dict[str, str]) -> str:
    columns = ", ".join(f"{expression} AS {name}" for name, expression in aggregates.items())
    return f"""\
SELECT count(*) FROM (
    SELECT exchange, symbol, date_bin('1 minute', ts, timestamptz 'epoch'), {columns}
    FROM trades
    WHERE ts >= %(start)s AND ts < %(end)s
    GROUP BY 1, 2, 3
) AS per_minute
WHERE num_nonnulls({", ".join(aggregates)}) > 0"""


#: The recomputation's own base candles (its aggregate pass, then the open/close probes), counted.
_BASE_CANDLES = (
    f"WITH {candle_sql.base_fold()} SELECT count(*) FROM base"
    " WHERE num_nonnulls(first, last, volume) > 0"
)

BREAKDOWN = {
    "GROUP BY + high/low, volumes, count, taker volumes (the recomputation's scan)": _breakdown(
        _NUMERIC_AGGREGATES
    ),
    "that scan + open/close, one key probe each per window (the 1m candles)": _BASE_CANDLES,
}


class Backend:
    """A connection and the CPU time of its server process (None when that process cannot be
    seen: a remote server)."""

    def __init__(self, url: str):
        self.conn = db.connect(url)
        try:
            import psutil

            self._process = psutil.Process(self.conn.info.backend_pid)
            self._process.cpu_times()
        except Exception:
            self._process = None

    def cpu(self) -> float | None:
        if self._process is None:
            return None
        times = self._process.cpu_times()
        return times.user + times.system

    def close(self) -> None:
        self.conn.close()


@dataclass
class Timing:
    wall_s: float
    cpu_s: float | None


def timed(url: str, run) -> tuple[Timing, object]:
    """Run ``run(conn)`` on a new connection; its wall time and the server's CPU time."""
    backend = Backend(url)
    try:
        cpu = backend.cpu()
        started = time.perf_counter()
        out = run(backend.conn)
        backend.conn.commit()
        wall = time.perf_counter() - started
        after = backend.cpu()
    finally:
        backend.close()
    return Timing(wall, None if cpu is None or after is None else after - cpu), out


def _span() -> dict[str, datetime]:
    return {"start": DAY, "end": DAY + timedelta(days=1)}


def recompute(conn: psycopg.Connection) -> dict[str, int]:
    return recompute_batch_candles(conn, DAY, DAY + timedelta(days=1), IntervalSet.parse(INTERVALS))


def reference(conn: psycopg.Connection) -> int:
    return conn.execute(REFERENCE, _span()).fetchone()[0]


def breakdown_query(query: str):
    def run(conn: psycopg.Connection) -> int:
        conn.execute("SELECT set_config('work_mem', %s, true)", (WORK_MEM,))
        params = _span() | {
            "base_len": timedelta(minutes=1),
            "scan_start": DAY,
            "scan_end": DAY + timedelta(days=1),
        }
        return conn.execute(query, params).fetchone()[0]

    return run


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) and known else None


@dataclass
class SizeResult:
    trades: int
    load: Load
    table_mb: float
    recompute: list[Timing] = field(default_factory=list)
    reference: list[Timing] = field(default_factory=list)
    breakdown: dict[str, list[Timing]] = field(default_factory=dict)
    candles: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.trades / self.load.wall_s

    def wall(self, timings: list[Timing]) -> float:
        return statistics.median(t.wall_s for t in timings)

    def cpu(self, timings: list[Timing]) -> float | None:
        return median([t.cpu_s for t in timings])

    @property
    def ratio(self) -> float:
        return self.wall(self.recompute) / self.wall(self.reference)

    @property
    def cpu_ratio(self) -> float | None:
        a, b = self.cpu(self.recompute), self.cpu(self.reference)
        return a / b if a is not None and b else None


def bench_size(
    server_url: str, trades: int, seed: int, rounds: int, breakdown: bool
) -> tuple[SizeResult, str]:
    files = dataset(trades, seed)
    url = fresh_database(server_url, f"candlekeep_bench_{trades}")
    print(f"{trades:,} trades: loading {len(files)} files ...", flush=True)
    load = run_load(files, url)
    print(
        f"  {load.message}; wall {load.wall_s:.1f}s, peak RSS {load.max_rss_mb:.0f} MB", flush=True
    )
    with db.connect(url, autocommit=True) as conn:
        stored = conn.execute("SELECT count(*) FROM trades").fetchone()[0]
        conn.execute("VACUUM ANALYZE trades")
        size = conn.execute("SELECT pg_total_relation_size('trades')").fetchone()[0]
    if stored != trades:
        raise SystemExit(f"expected {trades:,} trades in the table, found {stored:,}")
    result = SizeResult(trades, load, size / 2**20)
    runs = [("recompute", recompute), ("reference", reference)]
    if breakdown:
        runs += [(name, breakdown_query(query)) for name, query in BREAKDOWN.items()]
    groups = set()
    for n in range(rounds):
        for name, run in runs if n % 2 == 0 else runs[::-1]:
            timing, out = timed(url, run)
            if name == "recompute":
                result.recompute.append(timing)
                result.candles = out
            elif name == "reference":
                result.reference.append(timing)
                groups.add(out)
            else:
                result.breakdown.setdefault(name, []).append(timing)
                groups.add(out)
            cpu = "" if timing.cpu_s is None else f" (server CPU {timing.cpu_s:.2f}s)"
            print(f"  round {n + 1}: {name}: {timing.wall_s:.2f}s{cpu}", flush=True)
    if groups != {result.candles["1m"]}:
        raise SystemExit(f"groups {groups} but {result.candles['1m']} 1m candles")
    print(
        f"  recompute {result.wall(result.recompute):.2f}s vs GROUP BY "
        f"{result.wall(result.reference):.2f}s: {result.ratio:.2f}x",
        flush=True,
    )
    return result, explain(url)


EXPLAINED = {
    "An hour of the day, read through the BRIN index": (
        "SELECT count(*) FROM trades WHERE ts >= %(start)s AND ts < %(end)s",
        {"start": DAY + timedelta(hours=13), "end": DAY + timedelta(hours=14)},
    ),
    "The whole day, as the recomputation and the reference read it": (
        "SELECT count(*) FROM trades WHERE ts >= %(start)s AND ts < %(end)s",
        _span(),
    ),
}


def explain(url: str) -> str:
    """EXPLAIN ANALYZE of range scans (after the timings)."""
    out = []
    with db.connect(url, autocommit=True) as conn:
        pages = conn.execute("SELECT relpages FROM pg_class WHERE relname = 'trades'").fetchone()
        out.append(f"-- trades: {pages[0]:,} heap pages")
        for title, (query, params) in EXPLAINED.items():
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + query, params)
            shown = query % {k: f"'{v.isoformat()}'" for k, v in params.items()}
            out.append(f"-- {title}\n-- {shown}\n" + "\n".join(r[0] for r in plan.fetchall()))
    return "\n\n".join(out)


# --- reporting ----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    memory = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), cpu
            )
        with open("/proc/meminfo", encoding="utf-8") as handle:
            kb = int(next(ln for ln in handle if ln.startswith("MemTotal")).split()[1])
            memory = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _walls(timings: list[Timing]) -> str:
    return ", ".join(f"{t.wall_s:.2f}" for t in timings)


def _paragraph(text: str, width: int = 96) -> str:
    """Re-wrap a paragraph built from pieces (markdown keeps the meaning)."""
    import textwrap

    return textwrap.fill(" ".join(text.split()), width, break_on_hyphens=False)


def section(record: dict, results: list[SizeResult], rounds: int) -> str:
    m, srv = record["machine"], record["server"]
    where = "embedded PostgreSQL (`bench/out/pg`)" if record["embedded"] else "`DATABASE_URL`"
    load_rows = "\n".join(
        f"| {r.trades:,} | {r.load.wall_s:.1f} | **{r.rate:,.0f}** | {r.load.cpu_s:.1f} | "
        f"**{r.load.max_rss_mb:.0f}** | {r.table_mb:,.0f} |"
        for r in results
    )
    recompute_rows = "\n".join(
        f"| {r.trades:,} | {r.wall(r.recompute):.2f} ({_walls(r.recompute)}) | "
        f"{r.wall(r.reference):.2f} ({_walls(r.reference)}) | **{r.ratio:.2f}×** | "
        f"{_s(r.cpu(r.recompute))} / {_s(r.cpu(r.reference))} | "
        f"{'–' if r.cpu_ratio is None else f'{r.cpu_ratio:.2f}×'} |"
        for r in results
    )
    largest = results[-1]
    ref_wall, ref_cpu = largest.wall(largest.reference), largest.cpu(largest.reference)

    def versus(timings: list[Timing]) -> str:
        cpu = largest.cpu(timings)
        both = f"{largest.wall(timings) / ref_wall:.2f}×"
        return both if cpu is None or not ref_cpu else f"{both} / {cpu / ref_cpu:.2f}×"

    breakdown = ""
    if largest.breakdown:
        rows = "\n".join(
            f"| {name} | {largest.wall(t):.2f} | {_s(largest.cpu(t))} | {versus(t)} |"
            for name, t in largest.breakdown.items()
        )
        breakdown = f"""
Where the time goes ({largest.trades:,} trades, medians): the reference's `GROUP BY` with more of
the recomputation's aggregates, `work_mem` {WORK_MEM} as in the recomputation.

| statement | wall (s) | server CPU (s) | vs reference (wall / CPU) |
|---|---:|---:|---:|
| reference (count only) | {ref_wall:.2f} | {_s(ref_cpu)} | 1.00× |
{rows}
| the recomputation (that scan, rollups, insert, delete, count) | \
{largest.wall(largest.recompute):.2f} | {_s(largest.cpu(largest.recompute))} | \
{versus(largest.recompute)} |
"""
    rss = [r.load.max_rss_mb for r in results]
    rss_met = max(rss) < TARGET_RSS_MB
    flat = max(rss) - min(rss) < 0.1 * min(rss)
    ratio_met = max(r.ratio for r in results) <= TARGET_RATIO
    sizes = " and ".join(f"{r.trades:,}" for r in results)
    rss_text = " → ".join(f"{v:.0f} MB" for v in rss)
    reference_sql = REFERENCE.replace("%(start)s", "'2026-01-01T00:00:00Z'").replace(
        "%(end)s", "'2026-01-02T00:00:00Z'"
    )
    loads = record["load_average"]
    settings = _paragraph(
        f"""Last run ({record["date"]}): {m["cpus"]} CPUs ({m["cpu"]}), {m["memory"]} RAM,
        {m["system"]}, Python {m["python"]}, load average {loads[0]:.1f} at the start and
        {loads[1]:.1f} at the end (other work shares this machine). PostgreSQL {srv["version"]},
        {where}, default settings: `shared_buffers` {srv["shared_buffers"]}, `work_mem`
        {srv["work_mem"]} (the recomputation raises it to {WORK_MEM} for its own transaction),
        `hash_mem_multiplier` {srv["hash_mem_multiplier"]}, `maintenance_work_mem`
        {srv["maintenance_work_mem"]}, `effective_cache_size` {srv["effective_cache_size"]},
        `max_parallel_workers_per_gather` {srv["max_parallel_workers_per_gather"]}, `jit`
        {srv["jit"]}, `synchronous_commit` {srv["synchronous_commit"]}, `max_wal_size`
        {srv["max_wal_size"]}. No parallel plan on either side: an `INSERT … SELECT` never gets
        one, and for the reference the planner, with no statistics on `date_bin(…)`, expects
        millions of groups instead of 28,800 and does not choose one. A day of 10M trades is
        larger than `shared_buffers`, so each scan reads it from the OS page cache."""
    )
    notes = []
    if not ratio_met:
        notes.append(
            _paragraph(
                """Why the ratio is above 2: the scan, hashing and grouping that the reference
                measures are a small part of the recomputation. Exact candles need `numeric`
                arithmetic on every row (max/min of the price, four sums, a multiplication for
                the quote volumes), and that alone costs nearly twice the whole reference (first
                row of the breakdown); open and close, the first and last trade of each window
                by (time, id), add two primary-key probes per window (second row; 57,600
                probes, which read index and heap pages that a 128 MB `shared_buffers` does
                not hold). Until migration 0002 they were a `min`/`max` over an
                `ARRAY[epoch, id, price]` built for every trade, and the ratio was 5.3-6.1.
                Tried and not kept (server CPU, copies of the 10M-trade database, machine
                shared and noisy): a stored generated `price * quantity` column saved 5-10%, the
                same with `STORAGE PLAIN` for the numerics (no detoasting copies) 5-25%, plain
                storage alone nothing measurable; not worth a wider row and a slower load. A
                parallel plan would cut the wall time on 2 CPUs, but with statistics on
                `date_bin(...)` (tried with `CREATE STATISTICS`) the planner makes the reference
                parallel too, so the like-for-like ratio would not move. The probes cost per
                window, not per trade (about 10 µs each with the pages cached, 25 µs when they
                are read from the OS cache), so they pay off in busy windows and cost more than
                the arrays did in quiet ones: at 1M trades (35 a window) the recomputation takes
                longer than with the arrays (2.0-2.7 s against 1.8 s; the ratio went from 6.1 to
                7.6), at 10M (347 a window) about half the time. In absolute terms a quiet
                day's recomputation stays small (a twenty-fourth of that for an hourly run)."""
            )
        )
    if not rss_met:
        notes.append(
            _paragraph(
                """Why the loader's peak is above 200 MB: `candlekeep/load.py` reads the next
                200,000-trade chunk (`list(islice(...))`) while the previous list is still bound
                to `batch`, so two chunks of `Trade` objects (~76 MB each, with their
                `Decimal`s) are alive at the peak, on top of ~65 MB of interpreter and imports
                (Alembic's among them). The peak does not grow with the file: it is set by the
                chunk. Measured with a copy of `load_trades` that deletes the batch after
                storing it: 151 MB; with 100,000-trade chunks as well: 114 MB."""
            )
        )
    notes_text = "".join(f"\n{note}\n" for note in notes)
    return f"""{SECTION}

How to run: `.venv/bin/python bench/store_load_recompute.py [--trades N ...] [--rounds K]
[--no-breakdown] [--no-write-docs]` (defaults: 1,000,000 then 10,000,000 trades, 3 rounds).
Without `DATABASE_URL` it starts the embedded PostgreSQL with its data in `bench/out/pg`; with
it, it creates databases `candlekeep_bench_<N>` on that server (dropped and re-created at each
run). Schema and indexes: [storage.md](storage.md).

The script generates one UTC day (2026-01-01) of Binance spot trades for 20 symbols, one
`SYMBOL-trades-2026-01-01.csv` per symbol (the loader takes the symbol from the file name),
seeded and cached in `bench/out/`: trade counts fall off with rank (BTCUSDT 14%, the smallest
3%), microsecond timestamps as Binance writes them since 2025, 25% of trades at the same
microsecond as the one before, 2% up to 2 s out of order, prices with 2 to 8 decimals. For each
size, in a fresh database (`candlekeep db upgrade`'s schema):

1. **load**: `candlekeep load FILE...` (the real CLI, 20 files) in a subprocess, timed from
   start to exit; rows/s = trades / wall time; peak RSS of that process from `wait4`.
2. `VACUUM ANALYZE trades`, then {rounds} rounds alternating which goes first, each on a new
   connection: the **recomputation** of the whole day
   (`recompute_batch_candles(conn, day, day + 1 day, IntervalSet.parse("{INTERVALS}"))`: one
   statement that scans the day once into 1m candles, takes each 1m window's open and close
   from the primary key (one probe each), rolls them up to 5m, 15m and 1h, and
   inserts the 36,960 candles into `batch_candles`, replacing the previous round's), and the
   **reference**, a single-pass `GROUP BY` over the same rows with the same keys as the 1m
   candles, returning only a count:

```sql
{reference_sql}
```

The ratio is that of the median wall times. Server CPU is the CPU time (user + system) of the
connection's backend process over the statement: this machine is shared, and CPU time moves much
less than wall time when other work runs.

{settings}

Load (`candlekeep load`, 20 files):

| trades | wall (s) | rows/s | CPU of the loader (s) | peak RSS (MB) | table + indexes (MB) |
|---:|---:|---:|---:|---:|---:|
{load_rows}

Recomputation vs reference (medians; each round in brackets):

| trades | recompute (s) | GROUP BY (s) | ratio (wall) | server CPU (s) | ratio (CPU) |
|---:|---|---|---:|---:|---:|
{recompute_rows}
{breakdown}
Targets, on {sizes} trades:

- recompute / GROUP BY ≤ {TARGET_RATIO:g}: **{"met" if ratio_met else "not met"}**
  ({", ".join(f"{r.ratio:.2f}×" for r in results)}).
- loader peak RSS under {TARGET_RSS_MB:.0f} MB: **{"met" if rss_met else "not met"}**
  ({rss_text}); flat as the trades grow: **{"yes" if flat else "no"}**.
{notes_text}
Changes made for this benchmark (2026-11-22). `store_trades` COPYs a batch of new, distinct
trades straight into `trades` (in a savepoint; the staging path remains for batches with
duplicates), so the server inserts while the loader encodes rows: on 1M trades the store step
went from 8–12 s to 4.4 s, and the load from ~79,000 rows/s to 106,000–134,000 in the day's
runs (the table shows this run's). `recompute_batch_candles` raises `work_mem` to {WORK_MEM}
in its transaction: with the default 4 MB the day's hash aggregate spilled to disk, and the
recomputation of 10M trades took 20 s of server CPU instead of 11.5 s (the ratio was about 8).
"""


def write_section(text: str) -> None:
    """Replace (or append) our section only; the file is read right before writing."""
    current = DOCS.read_text(encoding="utf-8")
    start = current.find(SECTION)
    if start < 0:
        DOCS.write_text(current.rstrip("\n") + "\n\n" + text, encoding="utf-8")
        return
    following = current.find("\n## ", start + len(SECTION))
    rest = "" if following < 0 else current[following:]
    DOCS.write_text(current[:start] + text.rstrip("\n") + "\n" + rest, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trades",
        type=int,
        nargs="+",
        default=list(SIZES),
        help="sizes to run, smallest first (default: 1000000 10000000)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip timing the aggregates one group at a time"
    )
    parser.add_argument("--no-write-docs", action="store_true")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    server = None
    server_url = os.environ.get("DATABASE_URL")
    if not server_url:
        server = EmbeddedPostgres(PG_DIR).start()
        server_url = server.url
    try:
        info = server_info(server_url)
        results, plans = [], ""
        for n, trades in enumerate(args.trades):
            breakdown = not args.no_breakdown and n == len(args.trades) - 1
            result, plans = bench_size(server_url, trades, args.seed, args.rounds, breakdown)
            results.append(result)
    finally:
        if server is not None:
            server.stop()
    record = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "server": info,
        "embedded": server is not None,
        "load_average": [load_at_start, os.getloadavg()[0]],
        "results": [
            {
                "trades": r.trades,
                "load": vars(r.load),
                "load_rows_per_s": r.rate,
                "table_mb": r.table_mb,
                "recompute": [vars(t) for t in r.recompute],
                "reference": [vars(t) for t in r.reference],
                "breakdown": {k: [vars(t) for t in v] for k, v in r.breakdown.items()},
                "ratio": r.ratio,
                "cpu_ratio": r.cpu_ratio,
                "candles": r.candles,
            }
            for r in results
        ],
    }
    (OUT_DIR / "store_load_recompute.json").write_text(json.dumps(record, indent=2))
    (OUT_DIR / "store_explain.txt").write_text(plans + "\n")
    print(f"wrote {OUT_DIR / 'store_load_recompute.json'} and {OUT_DIR / 'store_explain.txt'}")
    if not args.no_write_docs:
        write_section(section(record, results, args.rounds))
        print(f"wrote the results to {DOCS}")


if __name__ == "__main__":
    main()
