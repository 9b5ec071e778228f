"""``candlekeep load`` into a real PostgreSQL, and Binance's klines recomputed in SQL."""

from __future__ import annotations

import csv
from datetime import timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from candlekeep.cli import cli
from shared.batch.recompute import recompute_batch_candles
from shared.core.intervals import IntervalSet
from shared.core.trades import datetime_to_ts, ts_to_datetime
from shared.store import db

from .conftest import SAMPLE_DIR

pytestmark = pytest.mark.integration

AGG = SAMPLE_DIR / "XRPETH-aggTrades-2019-10-11_13.csv"


@pytest.fixture
def url(database_url):
    db.upgrade(database_url)
    with db.connect(database_url) as conn:
        conn.execute("TRUNCATE trades, batch_candles, invalid_trades")
        conn.commit()
    return database_url


def load(url, *args):
    result = CliRunner().invoke(
        cli, ["load", *map(str, args)], env={"DATABASE_URL": url}, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result


def test_load_is_idempotent_and_sql_candles_reproduce_binance_klines(url):
    first = load(url, AGG)
    assert "loaded 12,477 new trades (0 already stored" in first.stderr
    again = load(url, AGG)
    assert "loaded 0 new trades (12,477 already stored" in again.stderr
    with db.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone()[0] == 12477
        start = ts_to_datetime(1570752000 * 10**6)
        recompute_batch_candles(conn, start, start + timedelta(days=3), IntervalSet.parse("1m,5m"))
        conn.commit()
        rows = conn.execute(
            "SELECT interval, window_start, open, high, low, close, volume FROM batch_candles"
        ).fetchall()
    ours = {(r[0], datetime_to_ts(r[1]) // 1000): tuple(r[2:]) for r in rows}
    compared = 0
    for name in ("1m", "5m"):
        with open(SAMPLE_DIR / f"XRPETH-klines-{name}-2019-10-11_13.csv") as handle:
            reference = list(csv.reader(handle))[1:-1]  # the last kline is partial
        for row in reference:
            values = tuple(Decimal(v) for v in row[1:6])
            if values[4] == 0:  # a trade-less window: no candle in the tables
                assert (name, int(row[0])) not in ours
            else:
                assert ours[(name, int(row[0]))] == values, row
                compared += 1
    assert compared == len(ours) - 2 > 2000  # the last 1m and 5m windows: partial at Binance


def test_invalid_lines_land_in_invalid_trades_once(url, tmp_path):
    path = tmp_path / "XRPETH-aggTrades-bad.csv"
    good = AGG.read_text().splitlines()[:3]
    path.write_text(
        "\n".join(
            [
                good[0],
                "1,abc,1,1,1,1570752011620,True,True",
                *good[1:],
                "2,0.1,0,1,1,1570752011620,True,True",
            ]
        )
        + "\n"
    )
    result = load(url, path)
    assert "2 invalid lines" in result.stderr
    load(url, path)
    with db.connect(url) as conn:
        rows = conn.execute(
            "SELECT source, source_offset, reason_code, reason, raw FROM invalid_trades"
            " ORDER BY source_offset"
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM trades").fetchone()[0] == 3
    assert [(r[1], r[2]) for r in rows] == [(2, "wrong_type"), (5, "not_positive")]
    assert rows[0][0] == str(path) and rows[0][4] == b"1,abc,1,1,1,1570752011620,True,True"
    assert rows[1][3] == "quantity: must be greater than 0, got 0"


def test_chunks_read_as_they_are_sent_store_every_trade_once_when_some_are_stored(url, tmp_path):
    """``load`` reads each chunk while it sends it: chunks that meet stored trades (all of them,
    some of them) take the exact path with every trade of the chunk, none skipped, none twice,
    and the next chunk starts where the last one ended."""
    from candlekeep.load import load_trades
    from candlekeep.trade_input import TradeInput

    lines = AGG.read_text().splitlines()
    part = tmp_path / "XRPETH-aggTrades-part.csv"
    part.write_text("\n".join(lines[1_000:1_500] + lines[2_600:2_700]) + "\n")
    assert load_trades(url, TradeInput([str(part)]), chunk=1_000)["stored"] == 600
    totals = load_trades(url, TradeInput([str(AGG)]), chunk=1_000)
    assert totals["read"] == len(lines) == 12_477
    assert (totals["stored"], totals["duplicates"]) == (12_477 - 600, 600)
    with db.connect(url) as conn:
        stored = conn.execute("SELECT count(*), count(DISTINCT trade_id) FROM trades").fetchone()
    assert stored == (12_477, 12_477)
    assert load_trades(url, TradeInput([str(AGG)]), chunk=1_000)["stored"] == 0
