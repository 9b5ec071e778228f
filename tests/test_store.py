"""The PostgreSQL store against a real server: migrations, COPY loading, SQL recomputation."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine

from shared.batch.recompute import recompute_batch_candles
from shared.core.aggregation import aggregate
from shared.core.intervals import IntervalSet
from shared.core.trades import datetime_to_ts, ts_to_datetime
from shared.store import db
from shared.store.schema import include_in_migrations, metadata
from shared.store.trade_store import store_trades

from .services import _admin, with_database
from .strategies import T0_US, trade_lists

pytestmark = pytest.mark.integration

INTERVALS = IntervalSet.parse("1m,5m,15m,1h")
HOUR = 3_600_000_000


@pytest.fixture(scope="module")
def store_url(database_url):
    db.upgrade(database_url)
    return database_url


@pytest.fixture
def conn(store_url):
    with db.connect(store_url) as connection:
        connection.execute("TRUNCATE trades, batch_candles, invalid_trades, trade_conflicts")
        connection.commit()
        yield connection


def batch_candles(conn):
    rows = conn.execute(
        "SELECT exchange, symbol, interval, window_start, open, high, low, close, volume,"
        " quote_volume, trade_count, first_trade_id, last_trade_id, taker_buy_volume,"
        " taker_buy_quote_volume FROM batch_candles"
    ).fetchall()
    return {(r[0], r[1], r[2], datetime_to_ts(r[3])): tuple(r[4:]) for r in rows}


def test_migrations_create_exactly_the_declared_schema(store_url):
    engine = create_engine(db.sqlalchemy_url(store_url))
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_name": include_in_migrations}
        )
        diff = compare_metadata(context, metadata)
    engine.dispose()
    assert diff == []
    assert db.current_revision(store_url) == db.head_revision()


def test_upgrade_is_idempotent(store_url):
    assert db.upgrade(store_url) == db.head_revision()


@pytest.fixture
def old_store(database_url):
    """A database of its own, for upgrading from an older revision."""
    name = f"candlekeep_upgrade_{uuid.uuid4().hex[:12]}"
    server = with_database(database_url, "postgres")
    _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)
    _admin(server, "CREATE DATABASE {}", name)
    try:
        yield with_database(database_url, name)
    finally:
        _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def _day_partitions(conn, trades):
    """The daily partitions revisions 0001 and 0002 needed before storing."""
    for day in {t.ts_us // 86_400_000_000 for t in trades}:
        conn.execute(
            "SELECT candlekeep_ensure_trade_partition(date '1970-01-01' + %s::int)", (day,)
        )


def test_upgrading_a_store_with_trades_keeps_them_and_keys_them_by_identity(old_store):
    """0001 -> head on a database that holds trades: nothing lost, copies still rejected, the
    key is the trade's identity."""
    from shared.core.trades import Trade

    url = old_store
    db.upgrade(url, "0001")
    trades = [
        Trade("binance", "BTCUSDT", i, T0_US + (i // 2) * 1000, Decimal(100 + i), Decimal(1))
        for i in range(50)
    ]
    with db.connect(url) as conn:
        _day_partitions(conn, trades)
        for t in trades:  # as revision 0001's writer stored them (no later column)
            conn.execute(
                "INSERT INTO trades (exchange, symbol, trade_id, ts, price, quantity)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (t.exchange, t.symbol, t.trade_id, ts_to_datetime(t.ts_us), t.price, t.quantity),
            )
        conn.commit()
    assert db.upgrade(url) == db.head_revision()
    with db.connect(url) as conn:
        key = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'trades_pkey'"
            " AND conrelid = 'trades'::regclass"
        ).fetchone()[0]
        assert key == "PRIMARY KEY (exchange, symbol, trade_id)"
        assert store_trades(conn, trades[:10]).new == []
        conn.commit()
        assert conn.execute("SELECT count(*), sum(price) FROM trades").fetchone() == (
            50,
            sum(Decimal(100 + i) for i in range(50)),
        )


def test_upgrading_from_0002_keeps_the_first_copy_of_ids_stored_twice(old_store):
    """Revision 0002 stored a re-stamped copy as a second row (also on another day): the
    upgrade keeps the first copy ingested (then the earliest ts), keeps the others in
    trade_conflicts, and drops the late_trades row of a copy that is no longer stored."""
    url = old_store
    db.upgrade(url, "0002")
    day = 86_400_000_000
    rows = [  # trade_id, ts, price, ingested (seconds after T0)
        (1, T0_US, "10", 5),
        (1, T0_US + 3_000_000, "11", 9),  # a later copy, re-stamped and re-priced
        (2, T0_US + day, "20", 7),  # next day's partition ...
        (2, T0_US + 1_000_000, "21", 6),  # ... but this copy was ingested first
        (3, T0_US + 5_000_000, "30", 8),  # two copies ingested together: the earlier ts wins
        (3, T0_US + 4_000_000, "31", 8),
        (4, T0_US + 6_000_000, "40", 8),  # a trade stored once
    ]
    with db.connect(url) as conn:
        for ts in {r[1] for r in rows}:
            conn.execute(
                "SELECT candlekeep_ensure_trade_partition(date '1970-01-01' + %s::int)",
                (ts // day,),
            )
        for trade_id, ts, price, ingested in rows:
            conn.execute(
                "INSERT INTO trades (exchange, symbol, trade_id, ts, price, quantity,"
                " ingested_at) VALUES ('binance', 'ABC', %s, %s, %s, 1, %s)",
                (
                    trade_id,
                    ts_to_datetime(ts),
                    Decimal(price),
                    ts_to_datetime(T0_US + ingested * 1_000_000),
                ),
            )
        # The old stream set the re-stamped copy of 1 aside as late (and folded the first).
        conn.execute(
            "INSERT INTO late_trades (exchange, symbol, trade_id, ts, price, quantity,"
            " window_start, watermark, lateness) VALUES ('binance', 'ABC', 1, %s, 11, 1, %s,"
            " %s, interval '1 minute')",
            (ts_to_datetime(T0_US + 3_000_000), ts_to_datetime(T0_US), ts_to_datetime(T0_US)),
        )
        conn.commit()
    assert db.upgrade(url) == db.head_revision()
    with db.connect(url) as conn:
        kept = conn.execute("SELECT trade_id, ts, price FROM trades ORDER BY trade_id").fetchall()
        assert [(i, datetime_to_ts(ts), str(p)) for i, ts, p in kept] == [
            (1, T0_US, "10"),
            (2, T0_US + 1_000_000, "21"),
            (3, T0_US + 4_000_000, "31"),
            (4, T0_US + 6_000_000, "40"),
        ]
        conflicts = conn.execute(
            "SELECT trade_id, first_ts, first_price, ts, price FROM trade_conflicts"
            " ORDER BY trade_id"
        ).fetchall()
        assert [
            (i, datetime_to_ts(a), str(ap), datetime_to_ts(b), str(bp))
            for i, a, ap, b, bp in conflicts
        ] == [
            (1, T0_US, "10", T0_US + 3_000_000, "11"),
            (2, T0_US + 1_000_000, "21", T0_US + day, "20"),
            (3, T0_US + 4_000_000, "31", T0_US + 5_000_000, "30"),
        ]
        assert conn.execute("SELECT count(*) FROM late_trades").fetchone()[0] == 0
        # And from now on PostgreSQL itself refuses a second row for an id.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "INSERT INTO trades (exchange, symbol, trade_id, ts, price, quantity)"
                " VALUES ('binance', 'ABC', 4, now(), 1, 1)"
            )


@settings(max_examples=40)
@given(trade_lists(max_size=80), st.randoms(use_true_random=False), st.booleans())
def test_sql_candles_equal_the_core_candles(store_url, trades, rnd, with_duplicates):
    with db.connect(store_url) as conn:
        conn.execute("TRUNCATE trades, batch_candles")
        conn.commit()
        # Without duplicates the batch takes the direct COPY path, with them the staging path.
        dupes = [rnd.choice(trades) for _ in range(3)] if trades and with_duplicates else []
        store_trades(conn, trades + dupes)
        start = ts_to_datetime(T0_US - T0_US % HOUR)
        recompute_batch_candles(conn, start, start + timedelta(hours=2), INTERVALS)
        conn.commit()
        assert batch_candles(conn) == {c.key: c.values() for c in aggregate(trades, INTERVALS)}


@settings(max_examples=25)
@given(trade_lists(min_size=1, max_size=80, span_us=30 * HOUR))
def test_every_interval_merged_from_the_next_smaller_one_equals_the_core_candles(store_url, trades):
    """Each larger interval is rolled up from the next smaller one's states (1d from 4h from
    1h ...), not from the base: the candles are still the core's, on a run of three days."""
    intervals = IntervalSet.parse("1m,5m,15m,1h,4h,1d")
    with db.connect(store_url) as conn:
        conn.execute("TRUNCATE trades, batch_candles")
        store_trades(conn, trades)
        start = ts_to_datetime(T0_US - T0_US % (24 * HOUR))
        counts = recompute_batch_candles(conn, start, start + timedelta(days=3), intervals)
        conn.commit()
        expected = {c.key: c.values() for c in aggregate(trades, intervals)}
        assert batch_candles(conn) == expected
        assert counts == {
            i.name: sum(k[2] == i.name for k in expected) for i in intervals.intervals
        }


def test_a_run_owns_the_windows_that_end_in_its_interval(conn):
    day = 1_700_006_400_000_000  # 2023-11-15T00:00Z
    from shared.core.trades import Trade

    trades = [
        Trade("binance", "BTCUSDT", i, day + i * 7 * 60_000_000, Decimal(100 + i), Decimal(1))
        for i in range(400)  # ~47 hours
    ]
    store_trades(conn, trades)
    conn.commit()
    intervals = IntervalSet.parse("1m,15m,1h,1d")
    start = ts_to_datetime(day)
    hourly = {}
    for hour in range(48):
        counts = recompute_batch_candles(
            conn, start + timedelta(hours=hour), start + timedelta(hours=hour + 1), intervals
        )
        hourly[hour] = counts
    conn.commit()
    assert hourly[0]["1d"] == 0 and hourly[23]["1d"] == 1 and hourly[47]["1d"] == 1
    assert [c["1h"] for c in hourly.values()] == [1] * 47 + [0]  # the last trade is at 46h33m
    assert batch_candles(conn) == {c.key: c.values() for c in aggregate(trades, intervals)}
    # Rerunning an hour replaces its rows: a deleted trade disappears from its candles.
    before = batch_candles(conn)
    conn.execute("DELETE FROM trades WHERE trade_id = 3")
    recompute_batch_candles(conn, start, start + timedelta(hours=1), intervals)
    conn.commit()
    after = batch_candles(conn)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {
        ("binance", "BTCUSDT", "1m", day + 21 * 60_000_000),
        ("binance", "BTCUSDT", "15m", day + 15 * 60_000_000),
        ("binance", "BTCUSDT", "1h", day),
    }


def test_store_keeps_the_first_copy_and_reports_new_trades(conn):
    from shared.core.trades import Trade

    a = Trade("binance", "ETHUSDT", 1, T0_US, Decimal("10"), Decimal("1"), True)
    a_copy = Trade("binance", "ETHUSDT", 1, T0_US, Decimal("99"), Decimal("5"), False)
    b = Trade("binance", "ETHUSDT", 2, T0_US + 1, Decimal("11"), Decimal("1"))
    assert store_trades(conn, [a, a_copy, b]).new == [a, b]
    assert store_trades(conn, [b, a_copy]).new == []
    conn.commit()
    price = conn.execute("SELECT price FROM trades WHERE trade_id = 1").fetchone()[0]
    assert price == Decimal("10")


def test_copies_of_an_id_at_other_times_are_one_trade_and_conflicting(conn):
    """SPEC §2: whatever ts (another day too), price or quantity a later copy carries, the id is
    stored once with the first copy's values, by either path of store_trades; each differing
    copy is counted as conflicting and kept once in trade_conflicts."""
    from shared.core.trades import Trade

    day = 86_400_000_000
    first = [Trade("binance", "X", i, T0_US + i, Decimal(1), Decimal(1), True) for i in range(3)]
    assert store_trades(conn, first).stored == 3  # the direct COPY
    copies = [
        Trade("binance", "X", 0, T0_US + day, Decimal(1), Decimal(1), True),  # next day
        Trade("binance", "X", 1, T0_US + 1, Decimal(2), Decimal(1), True),  # re-priced
        Trade("binance", "X", 2, T0_US + 2, Decimal(1), Decimal(1), True),  # an exact copy
        Trade("binance", "X", 3, T0_US + 3, Decimal(3), Decimal(1), None),  # new ...
        Trade("binance", "X", 3, T0_US - day, Decimal(3), Decimal(9), None),  # ... re-stamped
    ]
    result = store_trades(conn, copies)
    assert (result.stored, result.duplicates, result.conflicting) == (1, 4, 3)
    again = store_trades(conn, copies)  # delivered again: same counts, nothing more kept
    assert (again.stored, again.duplicates, again.conflicting) == (0, 5, 3)
    conn.commit()
    stored = conn.execute("SELECT trade_id, ts, price, quantity FROM trades ORDER BY 1").fetchall()
    assert [(i, datetime_to_ts(ts), p, q) for i, ts, p, q in stored] == [
        (0, T0_US, 1, 1),
        (1, T0_US + 1, 1, 1),
        (2, T0_US + 2, 1, 1),
        (3, T0_US + 3, 3, 1),
    ]
    kept = conn.execute(
        "SELECT trade_id, (extract(epoch FROM ts) * 1000000)::bigint, price, quantity"
        " FROM trade_conflicts ORDER BY 1"
    ).fetchall()
    assert kept == [(0, T0_US + day, 1, 1), (1, T0_US + 1, 2, 1), (3, T0_US - day, 3, 9)]


def test_unreachable_database_is_one_line_naming_the_url_without_password(tmp_path):
    url = "postgresql://ck:s3cret@127.0.0.1:1/market"
    proc = subprocess.run(
        [sys.executable, "-m", "candlekeep", "db", "upgrade"],
        capture_output=True,
        text=True,
        env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "postgresql://ck:***@127.0.0.1:1/market" in lines[0]
    assert "s3cret" not in proc.stderr
    assert "DATABASE_URL" in lines[0]


def test_missing_schema_says_to_run_upgrade(database_url):
    with db.connect(database_url) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS empty_schema")
    url = (
        database_url
        + ("&" if "?" in database_url else "?")
        + "options=-csearch_path%3Dempty_schema"
    )
    with pytest.raises(db.DatabaseError, match="candlekeep db upgrade"), db.connect(url) as c:
        db.require_schema(c, url)


def test_psycopg_reads_numeric_as_exact_decimal(conn):
    value = conn.execute("SELECT 0.1::numeric + 0.2::numeric").fetchone()[0]
    assert value == Decimal("0.3") and isinstance(value, Decimal)
    assert isinstance(conn, psycopg.Connection)


def test_upgrading_a_store_with_stream_candles_makes_them_parts_that_merge_exactly(database_url):
    """0002 -> head with stream candles written before parts existed: a candle a partition still
    holds open (allowed lateness) becomes that partition's part, so its next revision replaces
    it instead of adding to it; a final one becomes the part of partition -1 and merges with
    what another partition writes for its window, open and close taken by trade time."""
    from psycopg.types.json import Jsonb

    from shared.core.candles import open_candle
    from shared.core.trades import Trade
    from shared.core.windows import candle_to_state
    from shared.store.stream_candles import write_candles

    name = f"candlekeep_upgrade_{uuid.uuid4().hex[:12]}"
    server = with_database(database_url, "postgres")
    _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)
    _admin(server, "CREATE DATABASE {}", name)
    url = with_database(database_url, name)
    minute = 60_000_000
    w0 = T0_US - T0_US % minute
    one_minute = INTERVALS.base

    def trade(i, ts, price):
        return Trade("binance", "BTCUSDT", i, ts, Decimal(price), Decimal(1))

    try:
        db.upgrade(url, "0002")
        final = [trade(1, w0 + 10, "10"), trade(2, w0 + 20, "11")]  # window w0, final
        held = [trade(3, w0 + minute + 10, "12")]  # window w0 + 1 min, still open to updates
        candles = []
        for trades in (final, held):
            candle = open_candle(trades[0], one_minute)
            for t in trades[1:]:
                candle.add(t)
            candle.revision = 0
            candles.append(candle)
        state = {
            "version": 1,
            "symbols": [
                {
                    "exchange": "binance",
                    "symbol": "BTCUSDT",
                    "bases": [candle_to_state(candles[1])],
                    "larger": [],
                }
            ],
        }
        with db.connect(url) as conn:
            _day_partitions(conn, final + held)  # revision 0002's layout
            conn.cursor().executemany(
                "INSERT INTO trades (exchange, symbol, trade_id, ts, price, quantity)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (t.exchange, t.symbol, t.trade_id, ts_to_datetime(t.ts_us), t.price, t.quantity)
                    for t in final + held
                ],
            )
            for c in candles:
                conn.execute(
                    "INSERT INTO stream_candles (exchange, symbol, interval, window_start,"
                    " window_end, open, high, low, close, volume, quote_volume, trade_count,"
                    " first_trade_id, last_trade_id, revision) VALUES (%s, %s, %s, %s, %s, %s,"
                    " %s, %s, %s, %s, %s, %s, %s, %s, 0)",
                    (
                        *c.key[:3],
                        ts_to_datetime(c.window_start_us),
                        ts_to_datetime(c.window_end_us),
                        *c.values()[:9],
                    ),
                )
            conn.execute(
                "INSERT INTO stream_progress (consumer_group, topic, partition, next_offset,"
                " window_state) VALUES ('g', 'trades', 3, 10, %s)",
                (Jsonb(state),),
            )
            conn.commit()
        assert db.upgrade(url) == db.head_revision()
        with db.connect(url) as conn:
            parts = conn.execute(
                "SELECT window_start, topic, partition, open_ts, close_ts FROM stream_candle_parts"
                " ORDER BY window_start"
            ).fetchall()
            assert [(datetime_to_ts(r[0]), r[1], r[2]) for r in parts] == [
                (w0, "", -1),
                (w0 + minute, "trades", 3),
            ]
            assert [datetime_to_ts(parts[0][3]), datetime_to_ts(parts[0][4])] == [w0 + 10, w0 + 20]
            # Partition 3 revises its window: its part is replaced, not added to.
            late = trade(4, w0 + minute + 5, "13")
            candles[1].add(late)
            candles[1].revision = 1
            (merged,) = write_candles(conn, [candles[1]], "trades", 3)
            assert (merged.trade_count, merged.open, merged.revision) == (2, Decimal(13), 1)
            # Another partition's part of the final window merges with the migrated one: its
            # trade at w0 + 15 falls between the two, so open and close stay theirs.
            other = open_candle(trade(9, w0 + 15, "99"), one_minute)
            other.revision = 0
            (merged,) = write_candles(conn, [other], "trades", 1)
            assert merged.values() == (
                Decimal(10), Decimal(99), Decimal(10), Decimal(11), Decimal(3), Decimal(120),
                3, 1, 2, None, None,
            )  # fmt: skip
            assert merged.revision == 1
            conn.commit()
    finally:
        _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)
