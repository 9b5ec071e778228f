"""``trade_gaps`` against a real PostgreSQL: a candidate is checked against the stored trades, so
only the runs really missing are recorded, once; a gap is filled when every one of its ids is
stored (a late trade, ``load``); readers find a period's gaps."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest

from candlekeep.load import load_trades
from candlekeep.trade_input import TradeInput
from shared.core.continuity import Gap
from shared.core.trades import Trade, ts_to_datetime
from shared.store import db
from shared.store.trade_gaps import gaps_of, mark_filled, open_gap_ids, open_gaps, record_gaps
from shared.store.trade_store import store_trades

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00Z
S = 1_000_000


def trade(trade_id: int, symbol: str = "BTCUSDT") -> Trade:
    return Trade("binance", symbol, trade_id, T0 + trade_id * S, Decimal("100.5"), Decimal("1"))


@pytest.fixture
def conn(database_url):
    db.upgrade(database_url)
    with db.connect(database_url) as connection:
        connection.execute("TRUNCATE trades, trade_gaps, trade_conflicts, invalid_trades")
        connection.commit()
        yield connection


def rows(conn):
    return conn.execute(
        "SELECT symbol, first_missing_id, last_missing_id, missing_count, before_ts, after_ts,"
        " detected_by, partition, filled_by, filled_at IS NOT NULL FROM trade_gaps"
        " ORDER BY symbol, first_missing_id"
    ).fetchall()


def candidate(first: int, last: int, symbol: str = "BTCUSDT") -> Gap:
    """A hole one partition saw between ``first - 1`` and ``last + 1``."""
    return Gap("binance", symbol, first, last, T0 + (first - 1) * S, T0 + (last + 1) * S)


def test_only_the_ids_no_stored_trade_fills_are_recorded_each_run_once(conn):
    # Another partition stored 12-14 and 17 of the hole 11..19 this one saw.
    store_trades(conn, [trade(i) for i in (10, 12, 13, 14, 17, 20)])
    recorded = gaps_of(
        record_gaps(conn, [candidate(11, 19)], detected_by="stream", topic="t", partition=2)
    )
    conn.commit()
    assert [(g.first_missing_id, g.last_missing_id) for g in recorded] == [
        (11, 11),
        (15, 16),
        (18, 19),
    ]
    at = lambda i: ts_to_datetime(T0 + i * S)  # noqa: E731
    want = [(11, 11, 1, 10, 12), (15, 16, 2, 14, 17), (18, 19, 2, 17, 20)]
    assert rows(conn) == [
        ("BTCUSDT", first, last, count, at(before), at(after), "stream", 2, None, False)
        for first, last, count, before, after in want
    ]
    # Found again (a restart, the symbol's other partition, the batch side): nothing added,
    # even where that one saw a narrower or wider run.
    again = [candidate(11, 19), candidate(15, 15), candidate(16, 19)]
    assert gaps_of(record_gaps(conn, again, detected_by="batch")) == []
    # A hole wholly stored is no gap.
    assert gaps_of(record_gaps(conn, [candidate(12, 14)], detected_by="stream")) == []
    conn.commit()
    assert len(rows(conn)) == 3


def test_a_gap_is_filled_once_every_one_of_its_ids_is_stored(conn):
    store_trades(conn, [trade(i) for i in (1, 5, 9)])
    record_gaps(conn, [candidate(2, 4), candidate(6, 8)], detected_by="stream")
    conn.commit()
    assert open_gap_ids(conn) == {("binance", "BTCUSDT"): [(2, 4), (6, 8)]}
    store_trades(conn, [trade(2), trade(3), trade(6), trade(7), trade(8)])
    filled = gaps_of(mark_filled(conn, "stream", [("binance", "BTCUSDT")]))
    conn.commit()
    assert [(g.first_missing_id, g.last_missing_id) for g in filled] == [(6, 8)]
    assert [r[1:3] + r[8:] for r in rows(conn)] == [(2, 4, None, False), (6, 8, "stream", True)]
    # Another symbol's fills are not looked at; marking again changes nothing.
    assert gaps_of(mark_filled(conn, "stream", [("binance", "ETHUSDT")])) == []
    assert gaps_of(mark_filled(conn, "stream", detected_within=timedelta(minutes=2))) == []
    assert open_gap_ids(conn) == {("binance", "BTCUSDT"): [(2, 4)]}


def test_load_fills_the_gaps_its_trades_close(conn, database_url, tmp_path):
    store_trades(conn, [trade(1), trade(4)])
    record_gaps(conn, [candidate(2, 3)], detected_by="stream")
    conn.commit()
    path = tmp_path / "missing.jsonl"
    lines = [
        {
            "symbol": "BTCUSDT",
            "trade_id": i,
            "price": "100.5",
            "quantity": "1",
            "timestamp": (T0 + i * S) // 1000,
        }
        for i in (2, 3)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    totals = load_trades(database_url, TradeInput([str(path)], keep_invalid=True))
    assert totals["stored"] == 2 and totals["gaps_filled"] == 1
    assert [r[8:] for r in rows(conn)] == [("load", True)]


def test_a_period_finds_the_gaps_whose_missing_trades_may_lie_in_it(conn):
    store_trades(conn, [trade(i) for i in (1, 100, 200, 3700)])
    record_gaps(
        conn, [candidate(2, 99), candidate(101, 199), candidate(201, 3699)], detected_by="batch"
    )
    conn.commit()
    store_trades(conn, [trade(i) for i in range(101, 200)])
    mark_filled(conn, "repair")
    conn.commit()
    first_minute = open_gaps(conn, ts_to_datetime(T0), ts_to_datetime(T0 + 60 * S))
    assert [(g["first_missing_id"], g["missing_count"]) for g in first_minute] == [(2, 98)]
    hour = open_gaps(conn, ts_to_datetime(T0 + 3600 * S), ts_to_datetime(T0 + 7200 * S))
    assert [g["first_missing_id"] for g in hour] == [201]  # (before_ts 200 s, after_ts 3700 s)
