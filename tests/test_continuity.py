"""Trade-id continuity in the core (SPEC §4): a hole in a symbol's ids becomes a gap only once
its upper neighbour is older than the watermark. Properties (hypothesis): disorder within
``max_delay`` makes no gap; dropped ids make exactly their runs; memory holds only the ids of
the last ``max_delay``; a snapshot restored anywhere changes nothing."""

from __future__ import annotations

import json
from decimal import Decimal
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from shared.core.continuity import Gap, IdContinuity
from shared.core.trades import Trade
from shared.core.windows import WatermarkClock

SECOND = 1_000_000
MAX_DELAY = 5 * SECOND
CONSECUTIVE = ("binance", "binance-usdm", "kraken")
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def trade(trade_id: int, ts_us: int, symbol="BTCUSDT", exchange="binance", kind="market"):
    return Trade(exchange, symbol, trade_id, ts_us, Decimal("1.5"), Decimal("2"), None, 1, kind)


@st.composite
def markets(draw, drops: bool):
    """Per symbol, consecutive ids from a random start with non-decreasing timestamps (several
    trades may share a millisecond), some ids dropped (``drops``), and for each delivered trade
    a delivery delay within ``max_delay`` (inclusive) and a tie-break."""
    trades = []
    dropped = set()
    for symbol in SYMBOLS[: draw(st.integers(1, 3))]:
        start = draw(st.integers(0, 10**12))
        ts = 1_767_225_600_000_000 + draw(st.integers(0, 10 * SECOND))
        for n in range(draw(st.integers(1, 60))):
            ts += draw(
                st.sampled_from((0, 0, 1000, 250_000, SECOND, 3 * SECOND, MAX_DELAY, 7 * SECOND))
            )
            t = trade(start + n, ts, symbol)
            if drops and draw(st.integers(0, 5)) == 0:
                dropped.add(t.key)
            else:
                trades.append(t)
    delay = st.sampled_from((0, MAX_DELAY)) | st.integers(0, MAX_DELAY)  # the edge is likely
    delays = draw(st.lists(delay, min_size=len(trades), max_size=len(trades)))
    ties = draw(st.permutations(range(len(trades))))
    arrive_at = [t.ts_us + d for t, d in zip(trades, delays, strict=True)]
    arrival = [t for _, _, t in sorted(zip(arrive_at, ties, trades, strict=True))]
    cuts = sorted(draw(st.lists(st.integers(0, len(arrival)), max_size=6)))
    batches = [arrival[a:b] for a, b in zip([0, *cuts], [*cuts, len(arrival)], strict=True)]
    return batches, dropped


def run(batches, restore_every_batch=False, check=None):
    """Feed the batches as the stream does (observe, then ask with the watermark after the
    batch); the gaps emitted along the way, then those of the end (every hole)."""
    continuity = IdContinuity(CONSECUTIVE)
    clock = WatermarkClock(MAX_DELAY, MAX_DELAY)
    emitted = []
    for batch in batches:
        continuity.observe(batch)
        for t in batch:
            clock.observe(t.ts_us, 0)
        emitted += continuity.gaps(clock.watermark_us)
        if check:
            check(continuity, clock.watermark_us)
        if restore_every_batch:
            state = json.loads(json.dumps(continuity.snapshot()))
            continuity = IdContinuity.restore(CONSECUTIVE, state)
    return emitted, continuity.gaps(2**62)


def held_after(continuity, watermark_us):
    """Only ids of the last ``max_delay`` are held: none older than the watermark."""
    for _, _, _, _, above in continuity.snapshot()["symbols"]:
        assert all(ts >= watermark_us for _, ts in above)


@given(markets(drops=False))
def test_disorder_within_max_delay_is_never_a_gap(market):
    batches, _ = market
    emitted, at_end = run(batches, check=held_after)
    assert emitted == [] and at_end == []


@given(markets(drops=True))
def test_dropped_ids_are_exactly_the_gaps(market):
    batches, dropped = market
    delivered = {t.key: t for batch in batches for t in batch}
    first_seen = {}
    for batch in batches:
        for t in batch:
            first_seen.setdefault((t.exchange, t.symbol), t.trade_id)

    def no_false_gap(continuity, watermark_us):
        held_after(continuity, watermark_us)

    emitted, at_end = run(batches, check=no_false_gap)
    # Along the way, only dropped ids (a delayed one is never taken for lost) ...
    for gap in emitted:
        for trade_id in range(gap.first_missing_id, gap.last_missing_id + 1):
            assert (gap.exchange, gap.symbol, trade_id) in dropped
    # ... and in all, exactly the dropped runs between the first id seen and the last one.
    want = []
    for (exchange, symbol), first in sorted(first_seen.items()):
        ids = sorted(i for (e, s, i) in delivered if (e, s) == (exchange, symbol) and i >= first)
        for low, high in pairwise(ids):
            if high > low + 1:
                before = delivered[(exchange, symbol, low)].ts_us
                after = delivered[(exchange, symbol, high)].ts_us
                want.append(Gap(exchange, symbol, low + 1, high - 1, before, after))
    got = sorted(emitted + at_end, key=lambda g: (g.symbol, g.first_missing_id))
    assert got == sorted(want, key=lambda g: (g.symbol, g.first_missing_id))


@given(markets(drops=True))
def test_a_snapshot_restored_after_any_batch_changes_nothing(market):
    batches, _ = market
    assert run(batches, restore_every_batch=True) == run(batches)


def test_the_first_trade_starts_the_symbol_and_nothing_below_it_is_a_gap():
    continuity = IdContinuity(CONSECUTIVE)
    continuity.observe([trade(1000, 10 * SECOND), trade(998, 9 * SECOND)])  # 998: just old
    assert continuity.gaps(10**12) == []
    continuity.observe([trade(1001, 11 * SECOND), trade(1001, 11 * SECOND)])  # a duplicate
    assert continuity.gaps(10**12) == []


def test_a_hole_waits_for_its_upper_neighbour_to_pass_the_watermark():
    continuity = IdContinuity(CONSECUTIVE)
    continuity.observe([trade(1, 1 * SECOND), trade(2, 2 * SECOND), trade(5, 5 * SECOND)])
    assert continuity.next_due_us() == 5 * SECOND
    assert continuity.gaps(5 * SECOND) == []  # strictly older: a trade max_delay late is on time
    assert continuity.gaps(5 * SECOND + 1) == [
        Gap("binance", "BTCUSDT", 3, 4, 2 * SECOND, 5 * SECOND)
    ]
    assert continuity.next_due_us() is None and continuity.held == 0
    # A late trade filling it later is no gap, and the ids go on from 5.
    continuity.observe([trade(3, 3 * SECOND), trade(6, 6 * SECOND), trade(8, 8 * SECOND)])
    assert continuity.gaps(10**12) == [Gap("binance", "BTCUSDT", 7, 7, 6 * SECOND, 8 * SECOND)]


def test_a_filled_hole_is_no_gap_and_every_kind_counts():
    continuity = IdContinuity(CONSECUTIVE)
    continuity.observe(
        [trade(1, SECOND, exchange="binance-usdm"), trade(3, 3 * SECOND, exchange="binance-usdm")]
    )
    assert continuity.held == 1
    # The venue's insurance-fund trade shares the sequence: it fills the hole.
    continuity.observe([trade(2, 2 * SECOND, exchange="binance-usdm", kind="insurance_fund")])
    assert continuity.held == 0 and continuity.gaps(10**12) == []


def test_an_exchange_without_consecutive_ids_never_has_a_gap():
    continuity = IdContinuity(CONSECUTIVE)
    continuity.observe(
        [trade(1, SECOND, exchange="coinbase"), trade(50, 2 * SECOND, exchange="coinbase")]
    )
    assert continuity.gaps(10**12) == [] and continuity.snapshot()["symbols"] == []


def test_a_restore_drops_exchanges_no_longer_consecutive():
    continuity = IdContinuity(CONSECUTIVE)
    continuity.observe(
        [trade(1, SECOND), trade(3, 3 * SECOND, symbol="ETHUSDT", exchange="kraken")]
    )
    restored = IdContinuity.restore(("kraken",), json.loads(json.dumps(continuity.snapshot())))
    assert [s[:2] for s in restored.snapshot()["symbols"]] == [["kraken", "ETHUSDT"]]
