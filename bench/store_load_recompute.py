"""Benchmark: ``candlekeep load`` and the SQL batch recomputation on one day of 20 symbols,
each against issue 15's reference measured in the same run.

For 1M and then 10M trades (one UTC day, 20 symbols, one Binance trades CSV per symbol, seeded
and cached in ``bench/out/``), on the same server:

1. ``candlekeep load FILE...`` (the real CLI, in a subprocess: wall time → rows/s, its own peak
   RSS from ``wait4``) against the reference, a *plain COPY* of the same rows: psycopg's
   ``cursor.copy()`` of rows already in ``COPY trades`` text format (made once, untimed, by the
   loader's parser and the store's encoder) into ``trades`` of another freshly migrated database
   (same table, key and BRIN index), one ``COPY … FROM STDIN`` and transaction per file, written
   in 1 MB blocks. Both each into a fresh database, ``--load-rounds`` rounds alternating which
   goes first; the two tables are checked equal. The ratio is load's rows/s over COPY's.
2. ``VACUUM ANALYZE trades``, then, alternating the order, the recomputation of the whole day
   (``recompute_batch_candles`` with 1m, 5m, 15m, 1h) against the issue's reference: the same
   single-pass ``GROUP BY`` with the same keys as the 1m candles and the same exact NUMERIC
   aggregates, everything but open and close (:data:`REFERENCE`), at the recomputation's
   ``work_mem``. The old count-only ``GROUP BY`` (:data:`COUNT_ONLY`) is a second column. The
   result is the ratio of the medians.

The database server is ``DATABASE_URL``'s (new databases are created on it for each size), or
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
from itertools import islice
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
#: Issue 15's targets: recompute ≤ 1.3× the reference, load ≥ 0.7× the plain COPY.
TARGET_RATIO = 1.3
TARGET_LOAD = 0.7
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


#: The issue's reference (issue 15): one pass over the same rows (the day's market trades, as the
#: recomputation reads them), grouped by the same keys as the 1m candles, with the same exact
#: NUMERIC aggregates as the candles have, everything but open and close: high, low, volume,
#: quote volume, trade count, first and last trade id (least and greatest), whether any trade
#: said its side, and the two taker-buy sums. The outer ``num_nonnulls`` uses every column, or
#: PostgreSQL would not compute the unused ones.
_REFERENCE_AGGREGATES = {
    "high": "max(price)",
    "low": "min(price)",
    "volume": "sum(quantity)",
    "quote_volume": "sum(price * quantity)",
    "trade_count": "sum(raw_trades)",
    "first_id": "min(trade_id)",
    "last_id": "max(trade_id)",
    "sided": "bool_or(is_buyer_maker IS NOT NULL)",
    "taker_volume": "sum(quantity) FILTER (WHERE NOT is_buyer_maker)",
    "taker_quote": "sum(price * quantity) FILTER (WHERE NOT is_buyer_maker)",
}


def _group_by(aggregates: dict[str, str]) -> str:
    columns = "".join(f", {expression} AS {name}" for name, expression in aggregates.items())
    used = f"\nWHERE num_nonnulls({', '.join(aggregates)}) > 0" if aggregates else ""
    return f"""\
SELECT count(*) FROM (
    SELECT exchange, symbol, date_bin('1 minute', ts, timestamptz 'epoch'){columns}
    FROM trades
    WHERE ts >= %(start)s AND ts < %(end)s AND kind = 'market'
    GROUP BY 1, 2, 3
) AS per_minute{used}"""


REFERENCE = _group_by(_REFERENCE_AGGREGATES)
#: The old reference, kept as a second column: the same GROUP BY returning only a count.
COUNT_ONLY = _group_by({})

#: The recomputation's own base candles (its aggregate pass, then the open/close probes), counted.
_BASE_CANDLES = (
    f"WITH {candle_sql.base_fold()} SELECT count(*) FROM base"
    " WHERE num_nonnulls(first, last, volume) > 0"
)

BREAKDOWN = {
    "the recomputation's 1m candles alone (its scan, then open/close)": _BASE_CANDLES,
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


def _at_work_mem(query: str):
    """``query`` run at the recomputation's ``work_mem`` (its transaction only): the references
    and the breakdown hash as many windows as it does, and would spill to disk at the default."""

    def run(conn: psycopg.Connection) -> int:
        conn.execute("SELECT set_config('work_mem', %s, true)", (WORK_MEM,))
        params = _span() | {
            "base_len": timedelta(minutes=1),
            "scan_start": DAY,
            "scan_end": DAY + timedelta(days=1),
        }
        return conn.execute(query, params).fetchone()[0]

    return run


# --- the load's reference: a plain COPY of the same rows ----------------------------------------


def copy_rows_files(files: list[Path]) -> list[Path]:
    """Per trades CSV, the rows ``load`` stores, as ``COPY trades`` text (exchange, symbol, id,
    ts as UTC text, price and quantity as written, side, raw_trades, kind): made once with the
    loader's own parser and the store's encoder (``shared.store.trade_store.copy_rows``), not
    timed, cached next to the CSV."""
    from candlekeep.trade_input import TradeInput
    from shared.store.trade_store import copy_rows

    out = []
    for path in files:
        rows = path.with_suffix(".copy")
        if not rows.exists():
            partial = rows.with_name(rows.name + ".partial")
            trades = TradeInput([str(path)]).trades()
            with open(partial, "wb") as handle:
                while chunk := list(islice(trades, 100_000)):
                    handle.write(copy_rows(chunk))
            os.replace(partial, rows)
        out.append(rows)
    return out


def run_copy(rows_files: list[Path], url: str) -> Timing:
    """The reference for ``load``: psycopg's ``cursor.copy()`` of the ready rows into ``trades``
    of a freshly migrated database (the same table, key and BRIN index), one ``COPY … FROM
    STDIN`` and one transaction per file, written in 1 MB blocks: what a user with the rows
    already in the table's format would run (no parsing, no checks, no first-copy-wins)."""
    from shared.store.trade_store import COPY_TRADES

    def copy_all(conn: psycopg.Connection) -> None:
        for path in rows_files:
            with open(path, "rb") as handle, conn.cursor().copy(COPY_TRADES) as copy:
                while block := handle.read(1 << 20):
                    copy.write(block)
            conn.commit()

    timing, _ = timed(url, copy_all)
    return timing


#: What two loads of the same files must agree on (per symbol), cheaply.
_DIGEST = """
SELECT exchange, symbol, count(*), sum(trade_id), sum(price), sum(quantity),
       sum(extract(epoch FROM ts)), count(*) FILTER (WHERE is_buyer_maker), sum(raw_trades)
FROM trades GROUP BY 1, 2 ORDER BY 1, 2"""


def digest(url: str) -> list[tuple]:
    with db.connect(url) as conn:
        return conn.execute(_DIGEST).fetchall()


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) and known else None


@dataclass
class SizeResult:
    trades: int
    loads: list[Load]
    copies: list[Timing]
    table_mb: float
    recompute: list[Timing] = field(default_factory=list)
    reference: list[Timing] = field(default_factory=list)
    count_only: list[Timing] = field(default_factory=list)
    breakdown: dict[str, list[Timing]] = field(default_factory=dict)
    candles: dict[str, int] = field(default_factory=dict)

    @property
    def load_wall(self) -> float:
        return statistics.median(load.wall_s for load in self.loads)

    @property
    def load_rss_mb(self) -> float:
        return max(load.max_rss_mb for load in self.loads)

    @property
    def rate(self) -> float:
        return self.trades / self.load_wall

    @property
    def copy_rate(self) -> float:
        return self.trades / self.wall(self.copies)

    @property
    def load_ratio(self) -> float:
        """load's rows/s over the plain COPY's (issue 15: ≥ 0.7)."""
        return self.rate / self.copy_rate

    def wall(self, timings: list[Timing]) -> float:
        return statistics.median(t.wall_s for t in timings)

    def cpu(self, timings: list[Timing]) -> float | None:
        return median([t.cpu_s for t in timings])

    @property
    def ratio(self) -> float:
        return self.wall(self.recompute) / self.wall(self.reference)

    @property
    def count_ratio(self) -> float:
        return self.wall(self.recompute) / self.wall(self.count_only)

    @property
    def cpu_ratio(self) -> float | None:
        a, b = self.cpu(self.recompute), self.cpu(self.reference)
        return a / b if a is not None and b else None


def checkpoint(server_url: str) -> None:
    """Write out the previous step's dirty pages first, so that neither side of a comparison
    pays for the other's checkpoint (a 10M-trade COPY leaves gigabytes of WAL behind it)."""
    with psycopg.connect(with_database(server_url, "postgres"), autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def bench_load(
    server_url: str, files: list[Path], trades: int, rounds: int
) -> tuple[str, list[Load], list[Timing]]:
    """``load`` and the plain COPY, alternating which goes first, each into a fresh database;
    the two tables are checked equal. Returns the URL of the database ``load`` filled last."""
    rows_files = copy_rows_files(files)
    loads, copies = [], []
    url = copy_url = ""
    for n in range(rounds):
        for what in ("copy", "load") if n % 2 == 0 else ("load", "copy"):
            if what == "load":
                url = fresh_database(server_url, f"candlekeep_bench_{trades}")
                checkpoint(server_url)
                print(f"{trades:,} trades: loading {len(files)} files ...", flush=True)
                load = run_load(files, url)
                loads.append(load)
                print(
                    f"  {load.message}; wall {load.wall_s:.1f}s, peak RSS {load.max_rss_mb:.0f} MB",
                    flush=True,
                )
            else:
                copy_url = fresh_database(server_url, f"candlekeep_bench_copy_{trades}")
                checkpoint(server_url)
                timing = run_copy(rows_files, copy_url)
                copies.append(timing)
                cpu = "" if timing.cpu_s is None else f", server CPU {timing.cpu_s:.1f}s"
                print(f"  plain COPY of the same rows: wall {timing.wall_s:.1f}s{cpu}", flush=True)
    if digest(url) != digest(copy_url):
        raise SystemExit("load and the plain COPY stored different rows")
    with psycopg.connect(with_database(server_url, "postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                sql.Identifier(f"candlekeep_bench_copy_{trades}")
            )
        )
    return url, loads, copies


def bench_size(
    server_url: str, trades: int, seed: int, rounds: int, load_rounds: int, breakdown: bool
) -> tuple[SizeResult, str]:
    files = dataset(trades, seed)
    url, loads, copies = bench_load(server_url, files, trades, load_rounds)
    with db.connect(url, autocommit=True) as conn:
        stored = conn.execute("SELECT count(*) FROM trades").fetchone()[0]
        conn.execute("VACUUM ANALYZE trades")
        size = conn.execute("SELECT pg_total_relation_size('trades')").fetchone()[0]
        conn.execute("CHECKPOINT")
    if stored != trades:
        raise SystemExit(f"expected {trades:,} trades in the table, found {stored:,}")
    result = SizeResult(trades, loads, copies, size / 2**20)
    print(
        f"  load {result.rate:,.0f} rows/s vs plain COPY {result.copy_rate:,.0f} rows/s: "
        f"{result.load_ratio:.2f}x",
        flush=True,
    )
    runs = [
        ("recompute", recompute),
        ("reference", _at_work_mem(REFERENCE)),
        ("count_only", _at_work_mem(COUNT_ONLY)),
    ]
    if breakdown:
        runs += [(name, _at_work_mem(query)) for name, query in BREAKDOWN.items()]
    groups = set()
    for n in range(rounds):
        for name, run in runs if n % 2 == 0 else runs[::-1]:
            timing, out = timed(url, run)
            if name == "recompute":
                result.recompute.append(timing)
                result.candles = out
            elif name in ("reference", "count_only"):
                getattr(result, name).append(timing)
                groups.add(out)
            else:
                result.breakdown.setdefault(name, []).append(timing)
                groups.add(out)
            cpu = "" if timing.cpu_s is None else f" (server CPU {timing.cpu_s:.2f}s)"
            print(f"  round {n + 1}: {name}: {timing.wall_s:.2f}s{cpu}", flush=True)
    if groups != {result.candles["1m"]}:
        raise SystemExit(f"groups {groups} but {result.candles['1m']} 1m candles")
    print(
        f"  recompute {result.wall(result.recompute):.2f}s vs the issue's GROUP BY "
        f"{result.wall(result.reference):.2f}s: {result.ratio:.2f}x (count-only "
        f"{result.wall(result.count_only):.2f}s: {result.count_ratio:.2f}x)",
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


def _sql_shown(query: str) -> str:
    return query.replace("%(start)s", "'2026-01-01T00:00:00Z'").replace(
        "%(end)s", "'2026-01-02T00:00:00Z'"
    )


_LOAD_HEAD = (
    "| trades | load wall (s) | load rows/s | COPY wall (s) | COPY rows/s | load / COPY |"
    " CPU: loader / COPY's server (s) | loader peak RSS (MB) | table + indexes (MB) |\n"
    "|---:|---|---:|---|---:|---:|---:|---:|---:|"
)
_RECOMPUTE_HEAD = (
    "| trades | recompute (s) | reference (s) | ratio (wall) | server CPU (s) | ratio (CPU) |"
    " count-only GROUP BY (s) | vs count-only |\n|---:|---|---|---:|---:|---:|---|---:|"
)

#: What the runs showed, written by hand after them (the tables above it are the script's).
NOTES = """
**Before and after this branch** (`store`, 2026-11-30; the code before it is commit `c700059`,
run with this same script from an export of that commit; the same embedded PostgreSQL 18, the
same cached files; before and after runs alternated; the machine was shared with other helpers'
builds and tests, load average 1.5–6, so wall times jumped by up to 2× from one round to the
next: the server CPU times are the figures to compare). Recompute / the issue's reference,
median server CPU of the three rounds:

| run | 1M | 3M | 10M |
|---|---:|---:|---:|
| before, first baseline (1 load round) | 1.14 / 0.44 s = 2.59× | 2.16 / 1.18 s = 1.83× | |
| before | 1.35 / 0.44 s = 3.07× | 2.27 / 1.18 s = 1.92× | |
| after, run 1 | 0.90 / 0.43 s = 2.09× | 1.68 / 1.14 s = 1.47× | |
| after, run 2 | 0.95 / 0.44 s = 2.16× | 1.83 / 1.20 s = 1.53× | |
| after, run 3 (loaded) | 0.88 / 0.42 s = 2.10× | 1.71 / 1.12 s = 1.53× | 4.32 / 3.64 s = 1.19× |
| after, the run above | 0.91 / 0.43 s = 2.12× | 1.71 / 1.11 s = 1.54× | 4.20 / 3.61 s = 1.16× |

In wall time (medians): before 2.58×, 2.69× at 1M and 1.82×, 2.04× at 3M; after 2.07×, 2.31×,
2.13×, 2.04× at 1M, 1.61×, 2.14×, 2.13×, 1.50× at 3M, and 1.48× (a loaded run) and 1.17× at 10M.
What changed, all in the one SQL fold (`shared/batch/candle_sql.py`) that recompute, reconcile
and the checks build from: the windows are probed in key order (the hash aggregate emits them in
hash order, and consecutive probes then read pages all over the table); each window's open is
first looked up by its least id and kept when that trade is at the window's first time, exact
(the walk through the id range only otherwise), the close likewise by its greatest id; each
larger interval is rolled up from the next smaller one (1h from 15m from 5m) instead of from the
base windows. Measured one by one: the probes went from 0.44 s to 0.25 s on the 1M day
(sorted) and from 0.48 s to 0.30 s on the 3M day (the lookup by id); the rollups merge
28,800 + 5,760 + 1,920 states instead of 3 × 28,800.

**Recompute: 10M meets 1.3× (1.16–1.19× in server CPU, 1.17× wall on a quiet run); 1M and 3M
do not.** What is left over the reference is per window, not per trade: 57,600 key lookups for
open and close (≈ 3–5 µs each: an index descent and a heap page, 0.2 s at 1M), the insert of
the 36,960 candles with the delete of the previous round's (≈ 0.1–0.15 s), the rollups
(≈ 0.05 s); the aggregate pass itself, with the reference's aggregates plus the least and
greatest time, takes the reference's time (0.51 s against 0.48 s at 1M). At 1M (35 trades a
window) those ~0.4 s are as much as the reference; at 3M about half of it; at 10M 15%. Meeting
1.3× on a day with fewer than ~300 trades a window would need open and close at no cost per
window, i.e. inside the aggregate pass: PostgreSQL has no `min_by`/`arg_min`, an
`ARRAY[epoch, id, price]` built per trade cost twice these lookups (the design before migration
0002), and index-only lookups would need `ts` and `price` in the key's index (`INCLUDE`), which
costs every writer what a second index costs (+50% on the COPY, [storage.md](storage.md)). A C
aggregate (an extension) is not available in the embedded server.

**Load: met at 1M and 3M in the run above (0.75×, 0.83×), not at 10M (0.65×).** The loader is
bound by its own CPU: 2.45 µs a trade (measured in-process on 1M: reading, validating and
making the `Trade`s 1.21 µs, psycopg's `write_row` encoding and sending 1.23 µs; 2.7 µs in the
table's runs, with the interpreter's start and the migrations check), against the server's
2.0 µs a row for the same COPY. Until this branch each 100,000-trade chunk was read into a list
before its COPY, so the server sat idle while the next chunk was parsed; now the chunk is read
as it is sent (`candlekeep/load.py`, `StreamedChunk`), and parsing overlaps the inserts. Before
that change, in the runs above this one: 0.50×, 0.54× at 1M; 0.39×, 0.48×, 0.43×, 0.58× at 3M;
0.62× at 10M (the load alone: 3M in 11.0–12.8 s before, 9.6–11.0 s after, on quiet moments).
What is left: the loader and the server need both cores, the plain COPY one, so the ratio falls
as soon as other work takes a core; and the client's 2.45 µs a trade exceed the server's 2.0.
Halving the client's CPU would take encoding the `COPY` text straight from the validated CSV
fields (the price and quantity as written, no `Decimal` → text round trip, no object per line):
a second encoder next to the one the stream and the staging path share, with a test that both
store the same rows; not done here. Peak RSS: 115 MB from 1M to 10M in the run above; before
the chunk was read as it was sent, 171 MB at 10M and once 167 MB at 3M, in runs on a loaded
machine; the old code run in-process on the same 10M files stayed at 107 MB from the first
chunk to the last, so it was not held per trade (not explained further).
"""


def section(record: dict, results: list[SizeResult], rounds: int, load_rounds: int) -> str:
    m, srv = record["machine"], record["server"]
    where = "embedded PostgreSQL (`bench/out/pg`)" if record["embedded"] else "`DATABASE_URL`"
    load_rows = "\n".join(
        f"| {r.trades:,} | {r.load_wall:.1f} ({', '.join(f'{x.wall_s:.1f}' for x in r.loads)}) | "
        f"{r.rate:,.0f} | {r.wall(r.copies):.1f} ({_walls(r.copies)}) | {r.copy_rate:,.0f} | "
        f"**{r.load_ratio:.2f}×** | {statistics.median(x.cpu_s for x in r.loads):.1f} / "
        f"{_s(r.cpu(r.copies))} | **{r.load_rss_mb:.0f}** | {r.table_mb:,.0f} |"
        for r in results
    )
    recompute_rows = "\n".join(
        f"| {r.trades:,} | {r.wall(r.recompute):.2f} ({_walls(r.recompute)}) | "
        f"{r.wall(r.reference):.2f} ({_walls(r.reference)}) | **{r.ratio:.2f}×** | "
        f"{_s(r.cpu(r.recompute))} / {_s(r.cpu(r.reference))} | "
        f"{'–' if r.cpu_ratio is None else f'{r.cpu_ratio:.2f}×'} | "
        f"{r.wall(r.count_only):.2f} ({_walls(r.count_only)}) | {r.count_ratio:.2f}× |"
        for r in results
    )
    largest = results[-1]
    breakdown = ""
    if largest.breakdown:
        ref_wall, ref_cpu = largest.wall(largest.reference), largest.cpu(largest.reference)

        def versus(timings: list[Timing]) -> str:
            cpu = largest.cpu(timings)
            both = f"{largest.wall(timings) / ref_wall:.2f}×"
            return both if cpu is None or not ref_cpu else f"{both} / {cpu / ref_cpu:.2f}×"

        rows = "\n".join(
            f"| {name} | {largest.wall(t):.2f} ({_walls(t)}) | {_s(largest.cpu(t))} | {versus(t)} |"
            for name, t in [
                ("the issue's reference", largest.reference),
                ("count-only GROUP BY", largest.count_only),
                *largest.breakdown.items(),
                ("the recomputation (1m candles, rollups, delete, insert)", largest.recompute),
            ]
        )
        breakdown = f"""
Where the time goes ({largest.trades:,} trades, medians, `work_mem` {WORK_MEM} for all):

| statement | wall (s) | server CPU (s) | vs the issue's reference (wall / CPU) |
|---|---:|---:|---:|
{rows}
"""
    rss = [r.load_rss_mb for r in results]
    rss_met = max(rss) < TARGET_RSS_MB
    flat = max(rss) - min(rss) < 0.1 * min(rss)
    ratio_met = max(r.ratio for r in results) <= TARGET_RATIO
    load_met = min(r.load_ratio for r in results) >= TARGET_LOAD
    sizes = " and ".join(f"{r.trades:,}" for r in results)
    rss_text = " → ".join(f"{v:.0f} MB" for v in rss)
    loads = record["load_average"]
    settings = _paragraph(
        f"""Last run ({record["date"]}): {m["cpus"]} CPUs ({m["cpu"]}), {m["memory"]} RAM,
        {m["system"]}, Python {m["python"]}, load average {loads[0]:.1f} at the start and
        {loads[1]:.1f} at the end (other work shares this machine). PostgreSQL {srv["version"]},
        {where}, default settings: `shared_buffers` {srv["shared_buffers"]}, `work_mem`
        {srv["work_mem"]} (the recomputation raises it to {WORK_MEM} for its own transaction, and
        the references are run at {WORK_MEM} too), `hash_mem_multiplier`
        {srv["hash_mem_multiplier"]}, `maintenance_work_mem` {srv["maintenance_work_mem"]},
        `effective_cache_size` {srv["effective_cache_size"]}, `max_parallel_workers_per_gather`
        {srv["max_parallel_workers_per_gather"]}, `jit` {srv["jit"]}, `synchronous_commit`
        {srv["synchronous_commit"]}, `max_wal_size` {srv["max_wal_size"]}."""
    )
    return f"""{SECTION}

How to run: `.venv/bin/python bench/store_load_recompute.py [--trades N ...] [--rounds K]
[--load-rounds L] [--no-breakdown] [--no-write-docs]` (defaults: 1,000,000 then 10,000,000
trades, 3 rounds, 2 load rounds). Without `DATABASE_URL` it starts the embedded PostgreSQL with
its data in `bench/out/pg`; with it, it creates databases `candlekeep_bench_<N>` and
`candlekeep_bench_copy_<N>` on that server (dropped and re-created at each run). Schema and
indexes: [storage.md](storage.md).

The script generates one UTC day (2026-01-01) of Binance spot trades for 20 symbols, one
`SYMBOL-trades-2026-01-01.csv` per symbol (the loader takes the symbol from the file name),
seeded and cached in `bench/out/`: trade counts fall off with rank (BTCUSDT 14%, the smallest
3%), microsecond timestamps as Binance writes them since 2025, 25% of trades at the same
microsecond as the one before, 2% up to 2 s out of order, prices with 2 to 8 decimals. For each
size:

1. **load** against a **plain COPY**, {load_rounds} round(s) alternating which goes first, each
   into a fresh database (`candlekeep db upgrade`'s schema): `candlekeep load FILE...` (the real
   CLI, 20 files) in a subprocess, timed from start to exit, its peak RSS from `wait4`; and the
   reference, psycopg's `cursor.copy()` of the same rows, ready in `COPY trades` text format
   (made beforehand, untimed, by the loader's own parser and the store's encoder), into the
   same table with its key and BRIN index, one `COPY … FROM STDIN` and one transaction per
   file, in 1 MB blocks: no parsing, no validation, no first-copy-wins. The two tables are
   checked equal (per symbol: count and sums of ids, prices, quantities, times, sides) before
   a number is printed. The ratio is of rows/s (median walls).
2. `VACUUM ANALYZE trades`, then {rounds} rounds alternating the order, each statement on a new
   connection: the **recomputation** of the whole day
   (`recompute_batch_candles(conn, day, day + 1 day, IntervalSet.parse("{INTERVALS}"))`: one
   statement that scans the day into 1m candles, rolls them up to 5m, 15m and 1h, and inserts
   the 36,960 candles into `batch_candles`, replacing the previous round's), and **the issue's
   reference**: one `GROUP BY` over the same rows with the same keys as the 1m candles and the
   same exact `numeric` aggregates, everything but open and close (the outer `num_nonnulls`
   makes PostgreSQL compute every column), at the same `work_mem`:

```sql
{_sql_shown(REFERENCE)}
```

The old reference, the same `GROUP BY` returning only a count, is kept as the last columns.
Ratios are of median wall times. Server CPU is the CPU time (user + system) of the connection's
backend process: this machine is shared, and CPU time moves much less than wall time when
other work runs.

{settings}

Load (`candlekeep load`, 20 files) against the plain COPY (medians; each round in brackets):

{_LOAD_HEAD}
{load_rows}

Recomputation against the issue's reference (medians; each round in brackets):

{_RECOMPUTE_HEAD}
{recompute_rows}
{breakdown}
Targets (issue 15), on {sizes} trades:

- recompute ≤ {TARGET_RATIO:g}× the issue's reference: **{"met" if ratio_met else "not met"}**
  ({", ".join(f"{r.ratio:.2f}×" for r in results)}).
- load ≥ {TARGET_LOAD:g}× the plain COPY: **{"met" if load_met else "not met"}**
  ({", ".join(f"{r.load_ratio:.2f}×" for r in results)}).
- loader peak RSS under {TARGET_RSS_MB:.0f} MB: **{"met" if rss_met else "not met"}**
  ({rss_text}); flat as the trades grow: **{"yes" if flat else "no"}**.
{NOTES}"""


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


def results_of(record: dict) -> list[SizeResult]:
    """The results of a saved run (``--docs-from-last``)."""

    def timings(rows: list[dict]) -> list[Timing]:
        return [Timing(**row) for row in rows]

    return [
        SizeResult(
            r["trades"],
            [Load(**row) for row in r["loads"]],
            timings(r["copies"]),
            r["table_mb"],
            timings(r["recompute"]),
            timings(r["reference"]),
            timings(r["count_only"]),
            {k: timings(v) for k, v in r["breakdown"].items()},
            r["candles"],
        )
        for r in record["results"]
    ]


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
    parser.add_argument("--load-rounds", type=int, default=2, help="load and COPY rounds")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip timing the aggregates one group at a time"
    )
    parser.add_argument("--no-write-docs", action="store_true")
    parser.add_argument(
        "--docs-from-last",
        action="store_true",
        help="write the docs section from the saved results of the last run of these sizes",
    )
    args = parser.parse_args()
    name = "store_load_recompute-" + "-".join(map(str, args.trades)) + ".json"
    if args.docs_from_last:
        record = json.loads((OUT_DIR / name).read_text())
        write_section(section(record, results_of(record), args.rounds, args.load_rounds))
        print(f"wrote the results of {OUT_DIR / name} to {DOCS}")
        return

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
            result, plans = bench_size(
                server_url, trades, args.seed, args.rounds, args.load_rounds, breakdown
            )
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
                "loads": [vars(x) for x in r.loads],
                "load_rows_per_s": r.rate,
                "copies": [vars(t) for t in r.copies],
                "copy_rows_per_s": r.copy_rate,
                "load_ratio": r.load_ratio,
                "table_mb": r.table_mb,
                "recompute": [vars(t) for t in r.recompute],
                "reference": [vars(t) for t in r.reference],
                "count_only": [vars(t) for t in r.count_only],
                "breakdown": {k: [vars(t) for t in v] for k, v in r.breakdown.items()},
                "ratio": r.ratio,
                "cpu_ratio": r.cpu_ratio,
                "count_ratio": r.count_ratio,
                "candles": r.candles,
            }
            for r in results
        ],
    }
    (OUT_DIR / name).write_text(json.dumps(record, indent=2))
    (OUT_DIR / "store_explain.txt").write_text(plans + "\n")
    print(f"wrote {OUT_DIR / name} and {OUT_DIR / 'store_explain.txt'}")
    if not args.no_write_docs:
        write_section(section(record, results, args.rounds, args.load_rounds))
        print(f"wrote the results to {DOCS}")


if __name__ == "__main__":
    main()
