"""The period's trade-id gaps found in SQL (``shared.batch.period_gaps``) against a model written
here: for each symbol of a consecutive-id exchange with trades in the period, the ids stored
nowhere among its ids in the period and between the stored trade just before them (by id, at
any time) and the first. Trades of an exchange whose ids are not consecutive never make a gap."""

from __future__ import annotations

import itertools
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.batch.period_gaps import find_gaps
from shared.core.trades import Trade, ts_to_datetime
from shared.store import db
from shared.store.trade_store import store_trades

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00Z
MINUTE = 60_000_000
START, END = ts_to_datetime(T0), ts_to_datetime(T0) + timedelta(hours=1)
CONSECUTIVE = frozenset({"binance", "kraken"})
SYMBOLS = (("binance", "BTCUSDT"), ("binance", "ETHUSDT"), ("kraken", "BTC-USDT"), ("other", "X"))

#: A symbol's trades: ids from 0 to 60, each stored or not, each before, in or after the hour
#: (mostly in it; the others are disorder across the period's edges).
symbol_trades = st.dictionaries(
    st.integers(0, 60),
    st.sampled_from(["before"] + ["in"] * 6 + ["after"]),
    max_size=40,
)


def ts_of(trade_id: int, where: str) -> int:
    offset = {"before": -61 * MINUTE, "in": 0, "after": 61 * MINUTE}[where]
    return T0 + offset + trade_id * 50_000_000  # ids 0-60 spread over the hour's 50 minutes


def model(stored: dict[tuple[str, str], dict[int, str]]) -> set[tuple]:
    """Each run of ids stored nowhere between two neighbours of the walk (the trade before the
    period, then the period's trades by id), with the stored trades on either side of it."""
    holes = set()
    for (exchange, symbol), ids in stored.items():
        if exchange not in CONSECUTIVE:
            continue
        period = sorted(i for i, where in ids.items() if where == "in")
        if not period:
            continue
        before = [i for i in ids if i < period[0]]
        walk = ([max(before)] if before else []) + period
        for prev, cur in itertools.pairwise(walk):
            missing = [i for i in range(prev + 1, cur) if i not in ids]
            for run in _runs(missing):
                first, last = run[0], run[-1]
                holes.add(
                    (
                        exchange,
                        symbol,
                        first,
                        last,
                        ts_to_datetime(ts_of(first - 1, ids[first - 1])),
                        ts_to_datetime(ts_of(last + 1, ids[last + 1])),
                    )
                )
    return holes


def _runs(ids: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


@pytest.fixture(scope="module")
def store_url(database_url):
    db.upgrade(database_url)
    return database_url


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({key: symbol_trades for key in SYMBOLS}))
def test_the_periods_gaps_are_the_holes_among_its_ids_and_before_its_first(store_url, stored):
    trades = [
        Trade(exchange, symbol, i, ts_of(i, where), Decimal("10.5"), Decimal("1"))
        for (exchange, symbol), ids in stored.items()
        for i, where in ids.items()
    ]
    with db.connect(store_url) as conn:
        conn.execute("TRUNCATE trades, trade_gaps, trade_conflicts")
        store_trades(conn, trades)
        found = find_gaps(conn, START, END, CONSECUTIVE)
        recorded = set(
            conn.execute(
                "SELECT exchange, symbol, first_missing_id, last_missing_id, before_ts, after_ts"
                " FROM trade_gaps"
            ).fetchall()
        )
        conn.rollback()
    expected = model(stored)
    assert recorded == expected
    assert (found["found"] == 0) == (not expected)
