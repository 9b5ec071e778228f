"""Reconciliation classes (SPEC §6 step 3) against a real PostgreSQL.

The stream side is the real core and the worker's own table writers, fed in an arrival order
with late trades; the batch side is the SQL recomputation.
"""

from __future__ import annotations

import random
from datetime import timedelta
from decimal import Decimal

import pytest

from shared.batch.candle_sql import CANDLE_COLUMNS
from shared.batch.recompute import recompute_batch_candles
from shared.batch.reconcile import classify
from shared.batch.summary import ByTable
from shared.core.intervals import IntervalSet
from shared.core.trades import Trade, datetime_to_ts, ts_to_datetime
from shared.core.windows import PartitionWindows, WindowSettings
from shared.store import db
from shared.store.late_trades import write_late
from shared.store.stream_candles import write_candles
from shared.store.trade_store import store_trades

pytestmark = pytest.mark.integration

INTERVALS = IntervalSet.parse("1m,5m,15m,1h")
HOUR_US = 3_600_000_000
START_US = 1_767_225_600_000_000  # 2026-01-01T00:00Z
S = 1_000_000


@pytest.fixture
def conn(database_url):
    db.upgrade(database_url)
    with db.connect(database_url) as connection:
        connection.execute(
            "TRUNCATE trades, stream_candles, stream_candle_parts, batch_candles, late_trades,"
            " candle_mismatches, stream_progress, trade_gaps"
        )
        connection.commit()
        yield connection


def simulate_stream(conn, seed=1, count=1500):
    """Trades over one hour, a few sent late; the core closes windows; rows are written with
    the worker's writers. Returns the late trades."""
    rnd = random.Random(seed)
    trades = []
    for n in range(count):
        symbol = rnd.choice(["BTCUSDT", "ETHUSDT"])
        ts = START_US + rnd.randrange(HOUR_US - 10 * S)
        trades.append(
            Trade(
                "binance",
                symbol,
                n,
                ts,
                Decimal(rnd.randint(100, 200)),
                Decimal(rnd.randint(1, 9)).scaleb(-2),
                rnd.random() < 0.5,
            )
        )
    arrival = sorted(trades, key=lambda t: t.ts_us + (300 * S if rnd.random() < 0.02 else 0))
    windows = PartitionWindows(WindowSettings(INTERVALS, max_delay_us=2 * S))
    emitted, late = [], []
    for i in range(0, len(arrival), 50):
        out = windows.process(arrival[i : i + 50], now_us=0)
        emitted += out.candles
        late += out.late
    emitted += windows.flush().candles
    latest = {}
    for candle in emitted:
        latest[candle.key] = candle
    store_trades(conn, trades)
    write_candles(conn, list(latest.values()), "t", 0)
    write_late(conn, late, partition=0)
    conn.commit()
    return late


def run(conn):
    start = ts_to_datetime(START_US)
    recompute_batch_candles(conn, start, start + timedelta(hours=1), INTERVALS)
    result = classify(conn, start, start + timedelta(hours=1), INTERVALS)
    conn.commit()
    return result


def mismatches(conn):
    return {
        (r[0], r[1], datetime_to_ts(r[2])): (r[3], r[4], r[5])
        for r in conn.execute(
            "SELECT symbol, interval, window_start, kind, differences, late_trades"
            " FROM candle_mismatches"
        ).fetchall()
    }


def windows_of(trade):
    return {(trade.symbol, i.name, i.window_start(trade.ts_us)) for i in INTERVALS.intervals}


def test_windows_touched_by_late_trades_are_late_and_the_rest_match(conn):
    late = simulate_stream(conn)
    assert len(late) > 10
    result = run(conn)
    touched = set().union(*(windows_of(lt.trade) for lt in late))
    found = mismatches(conn)
    assert {k: v[0] for k, v in found.items()} == dict.fromkeys(touched, "late")
    assert result.counts["late"] == len(touched)
    assert result.counts["unexplained"] == result.counts["missing_in_batch"] == 0
    assert result.counts["match"] > 50
    # Each late row says how many late trades and which fields the late trades changed.
    some = next(v for v in found.values() if v[0] == "late")
    assert some[2] >= 1 and "volume" in some[1]
    assert set(some[1]["volume"]) == {"stream", "batch"}


def test_a_changed_candle_a_lost_trade_and_a_missing_candle_are_told_apart(conn):
    late = simulate_stream(conn, seed=2)
    late_windows = set().union(*(windows_of(lt.trade) for lt in late))
    # Every trade of one base window (no late trade in it) gets lost from `trades`.
    candidates = conn.execute(
        "SELECT symbol, window_start FROM stream_candles WHERE interval = '1m'"
        " ORDER BY window_start DESC"
    ).fetchall()
    symbol, window_start = next(
        r for r in candidates if (r[0], "1m", datetime_to_ts(r[1])) not in late_windows
    )
    conn.execute(
        "DELETE FROM trades WHERE symbol = %s AND ts >= %s AND ts < %s + interval '1 minute'",
        (symbol, window_start, window_start),
    )
    # One stream candle changed (a bug), and one never written (stream behind).
    changed, dropped = conn.execute(
        "SELECT symbol, window_start FROM stream_candles WHERE interval = '1m'"
        " AND window_start <> %s AND trade_count > 3 ORDER BY symbol, window_start LIMIT 2",
        (window_start,),
    ).fetchall()
    conn.execute(
        "UPDATE stream_candles SET close = close + 0.5 WHERE interval = '1m' AND symbol = %s"
        " AND window_start = %s",
        changed,
    )
    conn.execute(
        "DELETE FROM stream_candles WHERE interval = '1m' AND symbol = %s AND window_start = %s",
        dropped,
    )
    conn.commit()
    run(conn)
    found = {k: v[0] for k, v in mismatches(conn).items()}
    lost = (symbol, "1m", datetime_to_ts(window_start))
    assert found[lost] == "missing_in_batch"
    assert found[(changed[0], "1m", datetime_to_ts(changed[1]))] == "unexplained"
    assert found[(dropped[0], "1m", datetime_to_ts(dropped[1]))] in ("missing_in_stream", "late")
    # The larger windows holding the lost trade differ too, and nothing explains it.
    for interval in INTERVALS.larger:
        key = (symbol, interval.name, interval.window_start(datetime_to_ts(window_start)))
        assert found[key] == "unexplained"
    differences = mismatches(conn)[(changed[0], "1m", datetime_to_ts(changed[1]))][1]
    assert set(differences) == {"close"}
    assert Decimal(differences["close"]["stream"]) - Decimal(differences["close"]["batch"]) == (
        Decimal("0.5")
    )


def test_rerunning_an_interval_gives_identical_tables(conn):
    simulate_stream(conn, seed=3)
    first = run(conn)
    rows = conn.execute(
        "SELECT exchange, symbol, interval, window_start, kind, differences, late_trades"
        " FROM candle_mismatches ORDER BY 1, 2, 3, 4"
    ).fetchall()
    batch = conn.execute("SELECT * FROM batch_candles ORDER BY 1, 2, 3, 4").fetchall()
    second = run(conn)
    assert second.counts == first.counts
    assert (
        conn.execute(
            "SELECT exchange, symbol, interval, window_start, kind, differences, late_trades"
            " FROM candle_mismatches ORDER BY 1, 2, 3, 4"
        ).fetchall()
        == rows
    )
    strip = [r[:-1] for r in batch]  # computed_at aside
    assert [
        r[:-1] for r in conn.execute("SELECT * FROM batch_candles ORDER BY 1, 2, 3, 4").fetchall()
    ] == strip


def test_a_stream_that_lags_is_a_warning_not_a_broken_rollup(conn, database_url, tmp_path):
    """The DAG gave up waiting: the stream's watermark is mid-hour, so its 1m candles are
    written up to there and the 5m/15m/1h windows still open have no candle yet. That is a
    stream that lags (``warn``), never "not the merge of their base candles" (``fail``)."""
    from shared.batch.batch_run import run_period
    from shared.config import Settings
    from shared.store.progress import write_progress

    rnd = random.Random(5)
    trades = [
        Trade(
            "binance",
            rnd.choice(["BTCUSDT", "ETHUSDT"]),
            n,
            START_US + n * 2 * S,  # in order, no late trade, one every 2 s over the hour
            Decimal(rnd.randint(100, 200)),
            Decimal(rnd.randint(1, 9)).scaleb(-2),
            None,
        )
        for n in range(1800)
    ]
    windows = PartitionWindows(WindowSettings(INTERVALS, max_delay_us=2 * S))
    arrived = [t for t in trades if t.ts_us < START_US + 37 * 60 * S]  # the stream stopped here
    emitted = windows.process(arrived, now_us=0).candles  # no flush: the worker is still running
    assert {c.interval for c in emitted} == {"1m", "5m", "15m"}  # 35-37 min: 1m ahead of 5m
    store_trades(conn, trades)  # every trade is stored (e.g. by `load`), the stream lags
    write_candles(conn, emitted, "trades", 0)
    settings = Settings(report_dir=str(tmp_path / "reports"))
    write_progress(conn, settings.consumer_group, settings.topic_trades, 0, len(arrived), windows)
    conn.commit()

    summary = run_period(database_url, settings, "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z")

    assert summary.rollup_violations == ByTable(batch=0, stream=0)
    assert summary.counts["unexplained"] == 0
    assert summary.counts["missing_in_stream"] > 0  # what the stream has not written yet
    assert summary.status == "warn"
    assert summary.stream.watermark.startswith("2026-01-01T00:36")
    assert any("watermark had not passed" in r for r in summary.reasons)
    # A larger candle that *is* written and is wrong still fails, lag or not.
    conn.execute(
        "UPDATE stream_candles SET high = high + 1 WHERE interval = '5m'"
        " AND window_start = %s AND symbol = 'BTCUSDT'",
        (ts_to_datetime(START_US),),
    )
    conn.commit()
    summary = run_period(database_url, settings, "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z")
    assert summary.rollup_violations.stream == 1
    assert summary.status == "fail"


def test_a_stream_that_agrees_everywhere_is_all_match_and_a_rerun_clears_old_mismatches(conn):
    """Where no key differs, the fold without late trades reads no trade (its table is made
    empty), and the run's earlier mismatch rows are gone."""
    late = simulate_stream(conn)
    assert run(conn).counts["late"] > 0 and mismatches(conn)
    for lt in late:  # the stream's candles as if nothing had been late
        conn.execute(
            "DELETE FROM late_trades WHERE exchange = %s AND symbol = %s AND trade_id = %s",
            (lt.trade.exchange, lt.trade.symbol, lt.trade.trade_id),
        )
    conn.execute("DELETE FROM stream_candles")
    columns = ", ".join(CANDLE_COLUMNS)
    conn.execute(f"INSERT INTO stream_candles ({columns}) SELECT {columns} FROM batch_candles")
    conn.commit()
    result = run(conn)
    assert result.counts["match"] == result.compared > 50
    assert mismatches(conn) == {}
