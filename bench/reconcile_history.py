"""Benchmark: does an hour's run cost more as the trades stored before it pile up?

A data engineer keeps months of trades in ``trades``; the DAG reconciles one hour at a time. Every
step of the run (wait, recompute, reconcile, check against the venue, checks, report) must cost
what the hour holds, not what the table holds. This script builds two databases holding the same
hour and differing only in the history before it, then runs ``run_period`` (what
``candlekeep reconcile`` runs) on that hour in both, alternating, and compares each step:

- the hour: ``--trades`` trades of 20 symbols (exchange ``bench``, consecutive ids per symbol, so
  the period's trade-id gaps are looked for in SQL), 0.5% of them late (in ``late_trades``, left
  out of the stream's candles), one hole of 7 ids, and a symbol that traded the hour before and
  is silent in this one;
- *short history*: one hour of the same market before it (what the silent symbol needs);
- *long history*: ``--hours-before`` hours before it (default 9: ten times the trades), with
  their stream and batch candles.

The venue is not asked (``bench`` has no venue module: its candles are ``unverified``, no network
wait). Target: every step reads (shared blocks hit or read) within 10% of what it reads with
the short history; times are shown beside.

Usage: ``.venv/bin/python bench/reconcile_history.py [--trades 1000000] [--hours-before 9]
[--rounds 5] [--reuse] [--no-write-docs]`` (``--reuse``: the databases an earlier run of the
same size left, instead of preparing them again, which takes minutes). Uses DATABASE_URL if
set, else an embedded PostgreSQL under bench/out/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconcile_hour import database, machine, postgres_server, write_docs  # noqa: E402

from shared.batch import batch_run  # noqa: E402
from shared.batch.recompute import recompute_batch_candles  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.store import db  # noqa: E402

HOUR = datetime(2026, 3, 2, 14, tzinfo=UTC)
END = HOUR + timedelta(hours=1)
SECTION = "## An hour's run as the history grows"
STEPS = (
    "wait_step",
    "recompute_step",
    "reconcile_step",
    "verify_step",
    "checks_step",
    "publish_step",
)
LATE_EVERY = 199  # 0.5% of the hour's trades are late
CANDLE_COLUMNS = (
    "exchange, symbol, interval, window_start, window_end, open, high, low, close, volume,"
    " quote_volume, trade_count, first_trade_id, last_trade_id, taker_buy_volume,"
    " taker_buy_quote_volume"
)
TRADES = """
INSERT INTO trades (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker)
SELECT 'bench', 'SYM' || lpad((n %% 20)::text, 2, '0'), n / 20,
       %(first_hour)s + (n * 3600000000::bigint / %(per_hour)s) * interval '1 microsecond',
       round((100 + 50 * sin(n / 5000.0))::numeric + (n %% 97) / 100.0, 2),
       round(((n * 7919) %% 100000) / 10000.0 + 0.0001, 4), (n * 31) %% 3 = 0
FROM generate_series(0::bigint, %(total)s::bigint - 1) AS n
"""


#: What the runs showed, written by hand after them (the table above it is the script's).
NOTES = """Before this benchmark (2026-11-30), three statements of a run read more than the hour:
the lateness advice counted each symbol's trades of the period through the primary key (every
trade of the symbol since the first, filtered by time: 0.95 s of the checks' 1.35 s with only the
hour stored, more with every hour added), the silent-symbol probe did the same for a symbol
without a candle (270 ms at 500k stored trades of the symbol), and the period's trade-id gaps
sorted every trade of the period by symbol and id, spilling to disk (0.65 s for 100k trades;
it sorts only the symbols that may hold a hole now). Steps of a few hundred ms move by ±15%
between rounds on this machine: the fastest rounds are compared. Hence blocks as the measure: the
steps' times in the two databases differ by what is in shared buffers (128 MB here) when a step
starts, not by what it reads. What the steps read is listed in
[storage.md](storage.md#an-hours-run-reads-the-hour-not-the-history)."""


def prepared(server_url: str, url: str, name: str) -> dict | None:
    """The facts of a database an earlier run prepared (``--reuse``), or None."""
    with db.connect(server_url) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return None
    with db.connect(url) as conn:
        trades, late, stream = conn.execute(
            "SELECT (SELECT count(*) FROM trades), (SELECT count(*) FROM late_trades),"
            " (SELECT count(*) FROM stream_progress)"
        ).fetchone()
    return {"trades": trades, "late": late, "hole": 7} if stream else None


def prepare(url: str, per_hour: int, hours_before: int) -> dict:
    """The hour and ``hours_before`` hours of history, with the stream's and batch candles of
    the history, the stream's candles of the hour (without its late trades) and its progress."""
    db.upgrade(url)
    intervals = Settings().interval_set
    first_hour = HOUR - timedelta(hours=hours_before)
    with db.connect(url) as conn:
        conn.execute(
            TRADES,
            {
                "first_hour": first_hour,
                "per_hour": per_hour,
                "total": per_hour * (hours_before + 1),
            },
        )
        # A symbol that traded in the hour before and not in the hour; a hole of 7 ids in it.
        conn.execute(
            "INSERT INTO trades (exchange, symbol, trade_id, ts, price, quantity)"
            " SELECT 'bench', 'QUIET', n, %s + n * interval '1 second', 10, 1"
            " FROM generate_series(1, 3000) AS n",
            (HOUR - timedelta(hours=1),),
        )
        hole = conn.execute(
            "DELETE FROM trades WHERE exchange = 'bench' AND symbol = 'SYM03' AND trade_id IN"
            " (SELECT trade_id FROM trades WHERE exchange = 'bench' AND symbol = 'SYM03'"
            "  AND ts >= %s ORDER BY trade_id LIMIT 7 OFFSET %s)",
            (HOUR, per_hour // 40),
        ).rowcount
        # History: the batch's candles and the stream's, equal.
        recompute_batch_candles(conn, first_hour - timedelta(hours=1), HOUR, intervals)
        conn.execute(
            f"INSERT INTO stream_candles ({CANDLE_COLUMNS}) SELECT {CANDLE_COLUMNS}"
            " FROM batch_candles"
        )
        # The hour: its late trades are left out of the stream's candles.
        late = conn.execute(
            "INSERT INTO late_trades (exchange, symbol, trade_id, ts, price, quantity,"
            " window_start, watermark, lateness)"
            " SELECT exchange, symbol, trade_id, ts, price, quantity,"
            " date_bin('1 minute', ts, timestamptz 'epoch'),"
            " date_bin('1 minute', ts, timestamptz 'epoch') + interval '90 seconds',"
            " interval '30 seconds' FROM trades WHERE ts >= %s AND ts < %s"
            " AND trade_id %% %s = 0",
            (HOUR, END, LATE_EVERY),
        ).rowcount
        conn.execute(
            "CREATE TEMP TABLE held AS SELECT * FROM trades WHERE ts >= %s AND ts < %s"
            " AND trade_id %% %s = 0",
            (HOUR, END, LATE_EVERY),
        )
        conn.execute(
            "DELETE FROM trades WHERE ts >= %s AND ts < %s AND trade_id %% %s = 0",
            (HOUR, END, LATE_EVERY),
        )
        conn.execute("DELETE FROM batch_candles WHERE window_start >= %s", (HOUR,))
        recompute_batch_candles(conn, HOUR, END, intervals)
        conn.execute(
            f"INSERT INTO stream_candles ({CANDLE_COLUMNS}) SELECT {CANDLE_COLUMNS}"
            " FROM batch_candles WHERE window_start >= %s",
            (HOUR,),
        )
        conn.execute("DELETE FROM batch_candles WHERE window_start >= %s", (HOUR,))
        conn.execute("INSERT INTO trades SELECT * FROM held")
        conn.execute(
            "INSERT INTO stream_progress (topic, partition, consumer_group, next_offset,"
            " watermark, window_state) VALUES ('trades', 0, 'candlekeep', 0, %s, '{}')",
            (END + timedelta(minutes=5),),
        )
        trades = conn.execute("SELECT count(*) FROM trades").fetchone()[0]
        conn.commit()
    with db.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return {"trades": trades, "late": late, "hole": hole}


def blocks(server_url: str, name: str) -> int:
    """Shared blocks the database's backends have touched so far (hit or read): what a step
    reads, free of the machine's noise. Backends report when they exit, so after a short wait."""
    time.sleep(0.3)
    with db.connect(server_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT blks_hit + blks_read FROM pg_stat_database WHERE datname = %s", (name,)
        ).fetchone()[0]


def timed_run(
    url: str, settings: Settings, server_url: str
) -> tuple[dict[str, float], dict[str, int], object]:
    """One ``run_period`` of the hour: each step's time, and the blocks it touched."""
    name = url.rsplit("/", 1)[1]
    times: dict[str, float] = {}
    touched: dict[str, int] = {}
    originals = {name: getattr(batch_run, name) for name in STEPS}

    def timing(step_name, step):
        def run(*args, **kwargs):
            before = blocks(server_url, name)
            started = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                times[step_name] = time.perf_counter() - started
                touched[step_name] = blocks(server_url, name) - before

        return run

    for step_name, step in originals.items():
        setattr(batch_run, step_name, timing(step_name, step))
    try:
        summary = batch_run.run_period(url, settings, HOUR.isoformat(), END.isoformat())
    finally:
        for step_name, step in originals.items():
            setattr(batch_run, step_name, step)
    times["total"] = sum(times.values())
    touched["total"] = sum(touched.values())
    return times, touched, summary


def main() -> None:
    load_at_start = os.getloadavg()[0]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000, help="trades in the hour")
    parser.add_argument("--hours-before", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write-docs", action="store_true")
    parser.add_argument(
        "--reuse", action="store_true", help="use the databases of an earlier run of the same size"
    )
    args = parser.parse_args()
    server_url, server = postgres_server()
    settings = Settings(
        report_dir=str(ROOT / "bench" / "out" / "reports"),
        consecutive_id_exchanges="bench",
    )
    histories = {"short": 1, "long": args.hours_before}
    try:
        urls, data = {}, {}
        for label, hours in histories.items():
            print(f"preparing the hour and {hours} hour(s) before it ...", flush=True)
            name = f"candlekeep_bench_history_{label}_{args.trades}_{hours}"
            urls[label] = server_url.rsplit("/", 1)[0] + "/" + name
            if args.reuse and (facts := prepared(server_url, urls[label], name)):
                data[label] = facts
                continue
            database(server_url, name)
            data[label] = prepare(urls[label], args.trades, hours)
        timed_run(urls["short"], settings, server_url)  # imports, the template: not timed
        times: dict[str, dict[str, list[float]]] = {label: {} for label in histories}
        touched: dict[str, dict[str, list[int]]] = {label: {} for label in histories}
        summaries = {}
        for round_ in range(args.rounds):
            order = list(histories) if round_ % 2 == 0 else list(reversed(histories))
            for label in order:
                took, read, summaries[label] = timed_run(urls[label], settings, server_url)
                for step, seconds in took.items():
                    times[label].setdefault(step, []).append(seconds)
                    touched[label].setdefault(step, []).append(read[step])
        with db.connect(urls["long"]) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
    finally:
        if server is not None:
            server.stop()
    same = {
        label: (
            s.status,
            s.counts,
            sum(g.missing for g in s.open_gaps),
            [x.symbol for x in s.silent_symbols],
        )
        for label, s in summaries.items()
    }
    if same["short"] != same["long"]:
        sys.exit(f"the two databases' reports differ: {same}")
    # Times: the fastest round (other work on the machine only adds time; steps of a few hundred
    # ms moved by ±15% between rounds). Blocks: the median (they hardly move).
    best = {label: {k: min(v) for k, v in t.items()} for label, t in times.items()}
    reads = {label: {k: statistics.median(v) for k, v in t.items()} for label, t in touched.items()}
    info = machine()
    short, long_ = data["short"], data["long"]
    lines = [
        SECTION,
        "",
        f"`.venv/bin/python bench/reconcile_history.py` — the same hour ({args.trades:,} trades"
        f" of 20 symbols, {short['late']:,} late, a hole of {short['hole']} ids, a silent symbol)"
        f" in two databases: *short* holds {short['trades']:,} trades (the hour and the one"
        f" before it), *long* {long_['trades']:,} ({args.hours_before} hours before it, with"
        " their candles). `run_period` (what `candlekeep reconcile` runs) on the hour in both,"
        f" alternating, {args.rounds} rounds. Blocks: the shared buffers each step's statements"
        " touched (hit or read; `pg_stat_database`), medians: what a step reads, which the"
        " machine's noise does not move. Times: the fastest round of each.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}; PostgreSQL "
        f"{version} ({'DATABASE_URL' if server is None else 'embedded'}); "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average {load_at_start:.1f} at the start,"
        f" {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| step | blocks, short history | blocks, long history | long / short |"
        " time short (s) | time long (s) | long / short |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    flat = True
    for step in (*STEPS, "total"):
        a, b = reads["short"][step], reads["long"][step]
        flat &= b <= a * 1.1 + 100
        ta, tb = best["short"][step], best["long"][step]
        lines.append(
            f"| {step.removesuffix('_step')} | {a:,.0f} | {b:,.0f} | {b / max(a, 1):.2f}× |"
            f" {ta:.3f} | {tb:.3f} | {tb / ta:.2f}× |"
        )
    status, counts, gaps, silent = same["long"]
    lines += [
        "",
        f"Both reports alike: status {status}, {gaps} trades missing in open gaps, silent "
        f"{', '.join(silent) or 'none'}; "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        + ".",
        "",
        "Target: every step reads within 10% (+100 blocks) of what it reads with the short"
        " history: "
        f"**{'met' if flat else 'not met'}**.",
    ]
    lines += ["", NOTES]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write_docs:
        write_docs(text, SECTION)


if __name__ == "__main__":
    main()
