"""Trade identity (SPEC §2): the same (exchange, symbol, trade_id) is one trade whatever its copies'
timestamps, prices or quantities say; the first copy wins in the stream, in ``load``, in
``aggregate`` and in batch, and a copy that differs is counted as a conflicting duplicate and kept
in ``trade_conflicts``. Real broker, real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest

from shared.batch.recompute import recompute_batch_candles
from shared.batch.reconcile import classify
from shared.core.intervals import IntervalSet
from shared.core.trades import datetime_to_ts, ts_to_datetime
from shared.store import db
from stream.feeds.produce import FeedMessage
from stream.worker import StreamWorker

from .streaming import (
    expected_candles,
    produce_all,
    reference_model,
    reset_tables,
    stream_settings,
    tables,
)

pytestmark = pytest.mark.integration

T0_US = 1_767_225_600_000_000  # 2026-01-01T00:00Z
S = 1_000_000
DAY = 86_400 * S


def _message(trade_id, ts_us, price="100", quantity="1", maker=False, key=b"ABC"):
    value = {
        "symbol": "ABC",
        "trade_id": trade_id,
        "price": price,
        "quantity": quantity,
        "timestamp": ts_us // 1000,
        "is_buyer_maker": maker,
    }
    return FeedMessage(0.0, key, json.dumps(value).encode(), "trade")


def _original(trade_id):
    """Trade ``trade_id`` (1..600) every half second from T0, its price from its id."""
    return _message(trade_id, T0_US + trade_id * S // 2, price=str(100 + trade_id % 17))


def _first_phase():
    """600 trades over 5 minutes, with copies of some ids in between (and one late trade).

    Returns the messages and the number of conflicting copies among them."""
    out = []
    for i in range(1, 601):
        out.append(_original(i))
        if i == 10:  # right behind its first copy (one batch): re-stamped and re-priced
            out.append(_message(10, T0_US + 6 * S, price="999"))
        if i == 300:  # id 20's window closed long ago: a re-stamped copy that looks late
            out.append(_message(20, T0_US + 12 * S, price=str(100 + 20 % 17)))
        if i == 400:  # a copy of 30 stamped into an open window, re-priced
            out.append(_message(30, T0_US + 201 * S, price="1"))
        if i == 410:  # a copy of 40 on the next day (another day's range of ts)
            out.append(_message(40, T0_US + DAY + 40 * S // 2, price=str(100 + 40 % 17)))
        if i == 420:  # an exact copy of 50: a duplicate, not conflicting
            out.append(_original(50))
        if i == 430:  # only the quantity differs
            out.append(_message(60, T0_US + 60 * S // 2, price=str(100 + 60 % 17), quantity="7"))
        if i == 440:  # only the side differs
            out.append(_message(70, T0_US + 70 * S // 2, price=str(100 + 70 % 17), maker=True))
        if i == 500:  # a late trade (its window closed 2.5 minutes ago) ...
            out.append(_message(601, T0_US + 100 * S, price="55"))
        if i == 550:  # ... and a copy of it stamped into an open window: never folded
            out.append(_message(601, T0_US + 276 * S, price="55"))
    return out, 7


def run_worker(settings, url, bootstrap, idle_s=3.0):
    return asyncio.run(StreamWorker(settings, url, bootstrap, exit_when_idle_s=idle_s).run())


def _other_key(settings, bootstrap):
    """A casing of ABC's key that the default partitioner puts on another partition than
    ``ABC`` (keys compare without regard to case), so that copies arrive on two partitions."""
    from aiokafka.partitioner import DefaultPartitioner

    partitions = list(range(4))
    home = DefaultPartitioner()(b"ABC", partitions, partitions)
    for key in (b"abc", b"Abc", b"aBc", b"abC", b"ABc", b"AbC", b"aBC"):
        if DefaultPartitioner()(key, partitions, partitions) != home:
            return key
    return b"abc"


def test_copies_of_an_id_are_one_trade_in_the_stream(database_url, kafka_bootstrap):
    """Re-stamped and re-priced copies, in the same batch, later, stamped into a closed window
    (looks late), into an open one, onto the next day, of a late trade, and on another
    partition: each id is stored once with its first copy's values, never folded twice nor set
    aside as late, counted as a (conflicting) duplicate; conservation holds, candles equal the
    core's over the first copies, and reconciliation finds nothing unexplained."""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m")
    first, conflicting_first = _first_phase()
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, first)
    one = run_worker(settings, database_url, kafka_bootstrap)
    other = _other_key(settings, kafka_bootstrap)
    second = [
        _message(80, T0_US + 299 * S, price="3", key=other),  # another partition, re-stamped
        _message(20, T0_US + 12 * S, price=str(100 + 20 % 17), key=other),  # as before: kept once
        _message(90, T0_US + 45 * S, price=str(100 + 90 % 17), key=other),  # exact copy
    ]
    deliveries += produce_all(kafka_bootstrap, settings.topic_trades, second)
    two = run_worker(settings, database_url, kafka_bootstrap)
    assert len({d.partition for d in deliveries}) == 2

    expected = reference_model(deliveries, settings)
    assert expected.conflicting == conflicting_first + 2  # the model agrees with the test
    found = tables(database_url)
    # Each id once, with its first copy's time and price.
    assert len(found["trades"]) == 601 == len(expected.stored)
    stored = {(r[2], datetime_to_ts(r[3]), r[4], r[5], r[6]) for r in found["trades"]}
    firsts = {
        (t.trade_id, t.ts_us, t.price, t.quantity, t.is_buyer_maker)
        for t in expected.firsts.values()
    }
    assert stored == firsts
    # Conservation, and the duplicates' count with the conflicting ones among them.
    totals = [sum(row[i] for row in found["progress"].values()) for i in range(2, 7)]
    consumed, stored_n, duplicates, invalid, late = totals
    assert consumed == len(deliveries) == stored_n + duplicates + invalid
    assert (stored_n, duplicates, invalid) == (601, expected.duplicates, 0) == (601, 11, 0)
    assert one.conflicting + two.conflicting == expected.conflicting
    with db.connect(database_url) as conn:
        counted = conn.execute("SELECT sum(conflicting) FROM stream_progress").fetchone()[0]
        kept = conn.execute(
            "SELECT trade_id, source, source_offset IS NOT NULL FROM trade_conflicts"
        ).fetchall()
    assert counted == expected.conflicting
    # One row per distinct conflicting copy (20's came twice), with where it came from.
    assert sorted(r[0] for r in kept) == [10, 20, 30, 40, 60, 70, 80, 601]
    assert {r[1:] for r in kept} == {(f"kafka:{settings.topic_trades}", True)}
    # Only the real late trade was set aside; no copy was.
    assert {r[2] for r in found["late"]} == {601} and late == 1
    assert {k[2] for k in expected.late} == {601}
    # The stream's candles are the core's over the first copies that were on time.
    want = expected_candles(expected, settings, found["progress"])
    got = {(k[0], k[1], k[2], datetime_to_ts(k[3])): v[:-1] for k, v in found["candles"].items()}
    assert got == want and len(want) >= 5
    # And the batch side agrees: nothing unexplained, the late trade explains its windows.
    with db.connect(database_url) as conn:
        start = ts_to_datetime(T0_US)
        intervals = IntervalSet.parse("1m,5m")
        recompute_batch_candles(conn, start, start + timedelta(hours=1), intervals)
        result = classify(conn, start, start + timedelta(hours=1), intervals)
        conn.commit()
    assert result.counts["unexplained"] == 0
    assert result.counts["late"] >= 1


# --- load and aggregate -------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text(
        "".join(
            json.dumps(
                {
                    "symbol": "ABC",
                    "trade_id": i,
                    "price": p,
                    "quantity": "1",
                    "timestamp": T0_US // 1000 + ms,
                }
            )
            + "\n"
            for i, ms, p in rows
        )
    )
    return path


def _cli(*args, url=None):
    env = None
    if url is not None:
        import os

        env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "candlekeep", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def url(database_url):
    reset_tables(database_url)
    return database_url


def test_load_keeps_the_first_copy_within_a_file_across_files_and_runs(url, tmp_path):
    """The issue's reproduction: the same id with price 2 and a timestamp 1 s later is one
    trade; so is a copy on another day, in a later file, or in a later run."""
    one = _jsonl(
        tmp_path / "one.jsonl",
        [(1, 0, "1"), (2, 500, "2"), (1, 1000, "2"), (3, 86_400_000, "3"), (2, 500, "2")],
    )
    two = _jsonl(tmp_path / "two.jsonl", [(3, 1, "3"), (4, 2000, "4"), (1, 0, "1")])
    out = _cli("load", one, two, url=url)
    assert out.returncode == 0, out.stderr
    assert "3 new trades" not in out.stdout + out.stderr
    text = out.stdout + out.stderr
    # 4 ids; copies: 1 (re-stamped, re-priced), 2 (exact), 3 (another day), 1 (exact).
    assert "loaded 4 new trades (4 already stored or duplicated, of which 2 conflicting" in text
    again = _cli("load", two, url=url)  # a later run: all three are copies, 3 conflicting
    assert "loaded 0 new trades (3 already stored or duplicated, of which 1 conflicting" in (
        again.stdout + again.stderr
    )
    with db.connect(url) as conn:
        rows = conn.execute("SELECT trade_id, ts, price FROM trades ORDER BY 1").fetchall()
        kept = conn.execute("SELECT count(*) FROM trade_conflicts").fetchone()[0]
    assert [(i, datetime_to_ts(ts) - T0_US, p) for i, ts, p in rows] == [
        (1, 0, Decimal(1)),
        (2, 500_000, Decimal(2)),
        (3, DAY, Decimal(3)),
        (4, 2_000_000, Decimal(4)),
    ]
    assert kept == 2  # 1's copy and 3's: the later run's copy of 3 is the same copy


def test_aggregate_and_load_agree_on_a_file_with_re_stamped_copies(url, tmp_path):
    """``aggregate`` folds the first copies only, says how many duplicates conflict, and its
    candles are the batch recomputation of what ``load`` stored from the same file."""
    rows = [(i, i * 7_000, str(100 + i % 5)) for i in range(1, 40)]
    rows += [(5, 200_000, "9"), (6, 6 * 7_000, str(100 + 6 % 5)), (7, 400, "7")]  # copies
    path = _jsonl(tmp_path / "copies.jsonl", rows)
    agg = _cli("aggregate", path, "--interval", "1m", "--workers", "1", "-o", tmp_path / "c.jsonl")
    assert agg.returncode == 0, agg.stderr
    assert "aggregated 39 trades (3 duplicates, 2 conflicting," in agg.stderr
    load = _cli("load", path, url=url)
    assert "loaded 39 new trades (3 already stored or duplicated, of which 2 conflicting" in (
        load.stdout + load.stderr
    )
    with db.connect(url) as conn:
        start = ts_to_datetime(T0_US)
        recompute_batch_candles(conn, start, start + timedelta(hours=1), IntervalSet.parse("1m"))
        conn.commit()
        batch = conn.execute(
            "SELECT window_start, open, high, low, close, volume, trade_count FROM batch_candles"
            " ORDER BY 1"
        ).fetchall()
    candles = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [
        (
            datetime_to_ts(w) - T0_US,
            str(o),
            str(h),
            str(lo),
            str(c),
            str(v),
            n,
        )
        for w, o, h, lo, c, v, n in batch
    ] == [
        (
            datetime_to_ts_iso(c["window_start"]) - T0_US,
            c["open"],
            c["high"],
            c["low"],
            c["close"],
            c["volume"],
            c["trade_count"],
        )
        for c in candles
    ]


def datetime_to_ts_iso(text: str) -> int:
    from datetime import datetime

    return datetime_to_ts(datetime.fromisoformat(text.replace("Z", "+00:00")))
