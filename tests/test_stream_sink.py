"""The stream's trade path (``store_trades`` with a worker's tried ids, and a writer's batch):
first copies only, in arrival order, the same rows as the loader's exact path, whichever way
(direct COPY or staging table) a batch goes."""

from __future__ import annotations

from decimal import Decimal

import pytest

from shared.core.trades import Trade
from shared.store import db
from shared.store.trade_staging import store_staged
from shared.store.trade_store import prepare_trades, store_trades
from stream.parse import PartitionBatch
from stream.writers import apply_batch, record_batch

from .strategies import T0_US
from .streaming import reset_tables


@pytest.fixture
def conn(database_url):
    reset_tables(database_url)
    with db.connect(database_url) as connection:
        yield connection


@pytest.fixture
def tried():
    """A worker's greatest trade id tried per symbol (``stream.parse.Parser.tried``)."""
    return {}


def _trade(trade_id, ts_us=None, price="1.5", quantity="2", maker=None, symbol="BTCUSDT"):
    ts = T0_US + trade_id * 1_000_000 if ts_us is None else ts_us
    return Trade("binance", symbol, trade_id, ts, Decimal(price), Decimal(quantity), maker)


def _stored(conn):
    return conn.execute(
        "SELECT exchange, symbol, trade_id, ts, price::text, quantity::text, is_buyer_maker,"
        " raw_trades FROM trades ORDER BY symbol, trade_id"
    ).fetchall()


def test_first_copies_in_arrival_order_whatever_path_the_batch_takes(conn, tried):
    first = [_trade(5), _trade(3), _trade(7, maker=True), _trade(3, price="9")]
    conn.commit()
    assert store_trades(conn, first, tried=tried).new == first[:3]  # one COPY (all fresh)
    conn.commit()
    # 8 and 9 are fresh, 4 is below what was tried (staging), 5 and 7 repeat stored trades.
    second = [_trade(8), _trade(5), _trade(4), _trade(9, maker=False), _trade(7)]
    assert store_trades(conn, second, tried=tried).new == [second[0], second[2], second[3]]
    conn.commit()
    # A new process (nothing tried yet) whose first batch repeats a stored trade: the COPY
    # meets it, and the whole batch takes the staging path.
    tried.clear()
    third = [_trade(10), _trade(9), _trade(11)]
    assert store_trades(conn, third, tried=tried).new == [third[0], third[2]]
    conn.commit()
    assert [r[2] for r in _stored(conn)] == [3, 4, 5, 7, 8, 9, 10, 11]
    assert _stored(conn)[0][4] == "1.5"  # the first copy of 3 won


def test_copy_rows_store_what_the_loader_stores(conn, tried):
    odd = [
        _trade(1, price="0.00000001", quantity="123456789012345678901234567890.5", maker=True),
        _trade(2, price="1E+3", quantity="1.000", maker=False),
        _trade(3, ts_us=T0_US - T0_US % 60_000_000 + 59_999_999, price="7E-8"),  # 59.999999 s
        _trade(4, ts_us=0, symbol="X.Y_Z-1"),  # the epoch itself
        Trade("kraken", "ETHUSDT", 9, T0_US + 123, Decimal("3"), Decimal("4"), None, 17),
    ]
    conn.commit()
    assert store_trades(conn, odd, tried=tried).new == odd
    conn.commit()
    direct = _stored(conn)
    # The loader's path (psycopg's own dumpers, the other encoder of COPY trades), and the
    # exact path (the staging table, times converted in SQL).
    for store in (store_trades, store_staged):
        conn.execute("TRUNCATE trades")
        store(conn, odd)
        conn.commit()
        assert direct == _stored(conn)


def test_a_batch_folds_exactly_its_new_trades_whichever_path_it_takes(conn, tried):
    from shared.config import Settings
    from shared.core.windows import PartitionWindows

    settings = Settings(consumer_group="g", topic_trades="t").window_settings()
    windows = PartitionWindows(settings)
    reference = PartitionWindows(settings)
    minute = 60_000_000

    def batch(trades, resumed_from, next_offset):
        b = PartitionBatch(0, resumed_from, next_offset, list(trades))
        b.offsets = list(range(resumed_from or 0, (resumed_from or 0) + len(trades)))
        b.consumed = len(trades)
        b.prepared = prepare_trades(b.trades, tried)  # (as the parse stage does)
        return b

    def run(b, expected_new, now_us):
        result = apply_batch(conn, "g", "t", b, windows, now_us)
        record_batch(conn, "g", "t", b, windows, result)
        conn.commit()
        assert result.stored == len(expected_new)
        want = reference.process(expected_new, now_us)
        assert result.emission == want
        assert windows.snapshot() == reference.snapshot()

    first = [_trade(i, ts_us=T0_US + i * minute // 4) for i in range(1, 12)]
    conn.commit()
    run(batch(first[:6], None, 6), first[:6], 1)  # all fresh: one COPY
    # Fresh ones, a disordered new one (0 is below the ids tried), a copy of 4 at another time
    # and price (a conflicting duplicate: never folded) and a repeat of 2.
    disordered = _trade(0, ts_us=first[3].ts_us + 1)
    restamped = _trade(4, ts_us=first[3].ts_us + 2, price="99")
    second = [first[6], first[7], disordered, restamped, first[1]]
    run(batch(second, 6, 11), [first[6], first[7], disordered], 2)
    # A restarted process (nothing tried) repeats a stored trade: the COPY fails, the windows
    # go back to where they were, and the staging path decides.
    tried.clear()
    third = [first[8], first[7], first[9]]
    run(batch(third, 11, 14), [first[8], first[9]], 3)
    assert [r[2] for r in _stored(conn)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
