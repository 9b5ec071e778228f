"""The one SQL fold (``shared.batch.candle_sql``) as recompute, reconcile and the rollup check use
it, against the core's fold in Python, digit for digit."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.batch.candle_sql import CANDLE_COLUMNS
from shared.batch.quality import rollup_violations
from shared.batch.recompute import recompute_batch_candles
from shared.batch.reconcile import classify
from shared.core.aggregation import aggregate
from shared.core.intervals import IntervalSet
from shared.core.trades import ts_to_datetime
from shared.store import db
from shared.store.schema import batch_candles
from shared.store.trade_store import store_trades

from .strategies import T0_US, trade_lists

pytestmark = pytest.mark.integration

INTERVALS = IntervalSet.parse("1m,5m,15m,1h")
HOUR = 3_600_000_000
START = ts_to_datetime(T0_US - T0_US % HOUR)
END = START + timedelta(hours=2)


@pytest.fixture(scope="module")
def store_url(database_url):
    db.upgrade(database_url)
    return database_url


def _reset(conn):
    conn.execute(
        "TRUNCATE trades, batch_candles, stream_candles, late_trades, candle_mismatches,"
        " trade_conflicts, trade_gaps"
    )


def _insert_stream_candles(conn, candles):
    conn.cursor().executemany(
        f"INSERT INTO stream_candles ({', '.join(CANDLE_COLUMNS)})"
        f" VALUES ({', '.join(['%s'] * len(CANDLE_COLUMNS))})",
        [
            (
                c.exchange,
                c.symbol,
                c.interval,
                ts_to_datetime(c.window_start_us),
                ts_to_datetime(c.window_end_us),
                *c.values(),
            )
            for c in candles
        ],
    )


def test_candle_columns_are_the_candle_tables_columns():
    assert [c.name for c in batch_candles.columns if c.name in CANDLE_COLUMNS] == list(
        CANDLE_COLUMNS
    )


@settings(max_examples=25, deadline=None)
@given(trade_lists(min_size=1, max_size=80), st.randoms(use_true_random=False))
def test_the_rollup_check_finds_nothing_in_recomputed_candles_and_exactly_a_changed_one(
    store_url, trades, rnd
):
    with db.connect(store_url) as conn:
        _reset(conn)
        store_trades(conn, trades)
        recompute_batch_candles(conn, START, END, INTERVALS)
        conn.commit()
        assert rollup_violations(conn, "batch_candles", START, END, INTERVALS) == 0
        # One larger candle changed in one field: exactly one violation.
        key = rnd.choice(
            conn.execute(
                "SELECT exchange, symbol, interval, window_start FROM batch_candles"
                " WHERE interval <> '1m' ORDER BY 1, 2, 3, 4"
            ).fetchall()
        )
        field = rnd.choice(["open", "high", "close", "volume", "trade_count", "last_trade_id"])
        conn.execute(
            f"UPDATE batch_candles SET {field} = {field} + 1 WHERE exchange = %s AND symbol = %s"
            " AND interval = %s AND window_start = %s",
            key,
        )
        assert rollup_violations(conn, "batch_candles", START, END, INTERVALS) == 1
        conn.rollback()


@settings(max_examples=25, deadline=None)
@given(trade_lists(min_size=1, max_size=80), st.randoms(use_true_random=False))
def test_the_fold_without_late_trades_is_the_core_fold_of_the_on_time_ones(store_url, trades, rnd):
    """The stream folded the on-time trades (the core's fold) and set the others aside: every
    key reconciles as ``match`` or, exactly where a late trade fell, ``late``."""
    late = [t for t in trades if rnd.random() < 0.2]
    on_time = [t for t in trades if t not in late]
    with db.connect(store_url) as conn:
        _reset(conn)
        store_trades(conn, trades)
        _insert_stream_candles(conn, aggregate(on_time, INTERVALS))
        conn.cursor().executemany(
            "INSERT INTO late_trades (exchange, symbol, trade_id, ts, price, quantity,"
            " window_start, watermark, lateness) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
            " interval '1 second')",
            [
                (t.exchange, t.symbol, t.trade_id, ts_to_datetime(t.ts_us), t.price, t.quantity)
                + (ts_to_datetime(t.ts_us),) * 2
                for t in late
            ],
        )
        recompute_batch_candles(conn, START, END, INTERVALS)
        result = classify(conn, START, END, INTERVALS)
        kinds = {
            (r[0], r[1], r[2], r[3]): r[4]
            for r in conn.execute(
                "SELECT exchange, symbol, interval, window_start, kind FROM candle_mismatches"
            ).fetchall()
        }
        conn.rollback()
    touched = {
        (t.exchange, t.symbol, i.name, ts_to_datetime(i.window_start(t.ts_us)))
        for t in late
        for i in INTERVALS.intervals
    }
    owned = {k for k in touched if k[3] >= START and k[3] + _length(k[2]) <= END}
    assert kinds == dict.fromkeys(owned, "late")
    assert result.counts["unexplained"] == result.counts["missing_in_stream"] == 0


def _length(name: str) -> timedelta:
    return timedelta(microseconds=INTERVALS.by_name(name).length_us)
