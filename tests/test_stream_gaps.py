"""Live trade-id gaps in the stream (SPEC §4 "Trade-id continuity", §7 ``trade_gaps``): trades
of a venue with consecutive ids that the feed never delivered are recorded once, exactly the
missing ids, with the timestamps of the trades on either side; never for disorder within
``max_delay``, a symbol's first trade, an exchange without consecutive ids, or a symbol whose
trades arrive on two partitions; across a SIGKILL between a hole's neighbours and a rebalance;
a late trade fills the gap it made.

Real Kafka-protocol broker, real PostgreSQL; the synthetic market (consecutive ids per symbol
from 1, ``binance`` unless said) with some messages taken out. Every run also conserves every
message: consumed = stored + duplicates + invalid = produced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from itertools import pairwise

import pytest
import structlog
from prometheus_client import REGISTRY

from shared.core.trade_messages import parse_trade_message
from shared.core.trades import Rejection, ts_to_datetime
from shared.store import db
from stream.feeds.synthetic import MarketDials, synthetic_messages
from stream.worker import StreamWorker

from . import test_stream_operations as operations
from .streaming import (
    produce_all,
    reference_model,
    rekey,
    reset_tables,
    settings_env,
    stream_settings,
    tables,
)
from .test_stream_operations import PacedProducer, assignments, consumed, wait_until

workers = operations.workers  # (the fixture: worker subprocesses, killed if left running)

pytestmark = pytest.mark.integration


def market(seed: int, count: int, late: float = 0.0, **dials) -> list:
    """The synthetic market: 10% disordered (up to 2 s, within the 5 s max_delay), 2%
    duplicates, 0.5% invalid, ``late`` held back 180-360 s."""
    values = dict(count=count, disorder=0.1, late=late, duplicates=0.02, invalid=0.005, seed=seed)
    values.update(dials)
    return list(synthetic_messages(MarketDials(**values)))


def trade_of(message):
    if message.kind == "invalid":
        return None
    trade = parse_trade_message(message.value)
    return None if isinstance(trade, Rejection) else trade


def without(messages, dropped: dict[tuple[str, str], set[int]]) -> list:
    """The messages without the trades of ``dropped`` ids (nor their copies): never delivered."""
    out = []
    for m in messages:
        trade = trade_of(m)
        if trade is None or trade.trade_id not in dropped.get((trade.exchange, trade.symbol), ()):
            out.append(m)
    return out


def by_send_time(*feeds) -> list:
    return sorted((m for feed in feeds for m in feed), key=lambda m: m.send_at_s)


def missing_runs(messages, exchanges=("binance",)) -> dict:
    """What is missing in the end, from the delivered trades: per symbol of ``exchanges``, the
    runs between two delivered ids, with the timestamps of those two (the gaps that stay open)."""
    delivered: dict = {}
    for m in messages:
        trade = trade_of(m)
        if trade is not None and trade.exchange in exchanges:
            delivered.setdefault((trade.exchange, trade.symbol), {}).setdefault(
                trade.trade_id, trade.ts_us
            )
    out = {}
    for (exchange, symbol), ts_of in delivered.items():
        for low, high in pairwise(sorted(ts_of)):
            if high > low + 1:
                out[(exchange, symbol, low + 1, high - 1)] = (
                    ts_to_datetime(ts_of[low]),
                    ts_to_datetime(ts_of[high]),
                )
    return out


def late_ids(messages) -> set:
    return {trade_of(m).key for m in messages if m.kind == "late"}


def gap_rows(url: str) -> dict:
    with db.connect(url) as conn:
        rows = conn.execute(
            "SELECT exchange, symbol, first_missing_id, last_missing_id, missing_count,"
            " before_ts, after_ts, detected_by, filled_at IS NOT NULL, filled_by FROM trade_gaps"
        ).fetchall()
    out = {}
    for exchange, symbol, first, last, count, before, after, by, filled, filled_by in rows:
        assert count == last - first + 1 and by == "stream"
        out[(exchange, symbol, first, last)] = (before, after, filled, filled_by)
    return out


def check_gaps(url: str, messages, deliveries, settings) -> tuple[dict, dict]:
    """The open gaps are exactly what is missing in the end, with their neighbours' times; any
    other gap holds late trades only, each filled by its arrival (filled_by stream); every
    message is counted once. Returns (open, filled)."""
    found = gap_rows(url)
    opened = {k: v[:2] for k, v in found.items() if not v[2]}
    filled = {k: v for k, v in found.items() if v[2]}
    assert opened == missing_runs(messages)
    late = late_ids(messages)
    for (exchange, symbol, first, last), (_, _, _, filled_by) in filled.items():
        assert filled_by == "stream"
        assert all((exchange, symbol, i) in late for i in range(first, last + 1))
    expected = reference_model(deliveries, settings)
    progress = tables(url)["progress"]
    total, stored, duplicates, invalid = (
        sum(r[i] for r in progress.values()) for i in (2, 3, 4, 5)
    )
    assert total == len(deliveries) == stored + duplicates + invalid
    assert (stored, duplicates, invalid) == (
        len(expected.stored),
        expected.duplicates,
        len(expected.invalid),
    )
    return opened, filled


def counter(name: str, exchange: str) -> float:
    return REGISTRY.get_sample_value(name, {"exchange": exchange}) or 0.0


def test_dropped_ids_are_the_gaps_and_nothing_else_is(database_url, kafka_bootstrap):
    """Binance trades with ids taken out (BTCUSDT's first three too), disordered, duplicated and
    late ones among them, beside a venue whose ids are not consecutive (``coinbase``, ids taken
    out as well): the open gaps are exactly the ids taken out after each symbol's first trade;
    each late trade's gap is recorded and then filled by its arrival; nothing for coinbase."""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m", batch_size=200)
    dropped = {
        ("binance", "BTCUSDT"): {1, 2, 3, 400, *range(900, 905)},
        ("binance", "ETHUSDT"): {700, 701},
        ("binance", "SOLUSDT"): {1500},
        ("coinbase", "BTC-USD"): set(range(50, 61)),
    }
    binance = market(3, 6000, late=0.004)
    coinbase = market(4, 1500, exchange="coinbase", symbols=("BTC-USD",), rate=5)
    messages = without(by_send_time(binance, coinbase), dropped)
    # One partition: nothing else holds a hole back, so each late trade makes its gap first.
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages, partitions=1)
    before = {
        n: counter(n, "binance")
        for n in ("candlekeep_trade_gaps_total", "candlekeep_trades_missing_total")
    }
    with structlog.testing.capture_logs() as logs:
        summary = asyncio.run(
            StreamWorker(settings, database_url, kafka_bootstrap, exit_when_idle_s=3).run()
        )
    opened, filled = check_gaps(database_url, messages, deliveries, settings)
    assert sorted(k[1:] for k in opened) == [
        ("BTCUSDT", 400, 400),
        ("BTCUSDT", 900, 904),
        ("ETHUSDT", 700, 701),
        ("SOLUSDT", 1500, 1500),
    ]
    assert filled, "no late trade made a gap: the test needs some"
    # What an operator sees: a log line per gap, the metrics, the run's summary.
    logged = {
        (e["exchange"], e["symbol"], e["first_missing_id"], e["last_missing_id"]): e["missing"]
        for e in logs
        if e["event"] == "trade gap"
    }
    assert logged == {k: k[3] - k[2] + 1 for k in [*opened, *filled]}
    assert summary.gaps == len(logged) and summary.missing == sum(logged.values())
    assert summary.gaps_filled == len(filled)
    assert counter("candlekeep_trade_gaps_total", "binance") - before[
        "candlekeep_trade_gaps_total"
    ] == len(logged)
    assert counter("candlekeep_trades_missing_total", "binance") - before[
        "candlekeep_trades_missing_total"
    ] == sum(logged.values())
    assert counter("candlekeep_trade_gaps_total", "coinbase") == 0


def test_a_worker_killed_between_a_holes_neighbours_records_it_once_after_restart(
    database_url, kafka_bootstrap, workers
):
    """The trades up to BTCUSDT 599 are committed, the worker is killed -9; 600 never comes, 601
    and the rest arrive for the next worker: it knows from the committed continuity that 600 is
    missing. (No idle advance here: its watermark moves with the trades only.)"""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m", batch_size=100, idle_timeout="60")
    dropped = {("binance", "BTCUSDT"): {600}, ("binance", "ETHUSDT"): {200, 201}}
    dropped[("binance", "SOLUSDT")] = {1100}
    messages = without(market(7, 4000), dropped)
    split = 1 + max(
        n
        for n, m in enumerate(messages)
        if (t := trade_of(m)) is not None and t.symbol == "BTCUSDT" and t.trade_id == 599
    )
    env = settings_env(settings, database_url, kafka_bootstrap)
    env["CANDLEKEEP_IDLE_TIMEOUT"] = "60"
    first = produce_all(kafka_bootstrap, settings.topic_trades, messages[:split])
    a = workers(env, "--exit-when-idle", "600")
    wait_until(lambda: consumed(database_url) == len(first), 60, "A to commit the first part")
    a.process.send_signal(signal.SIGKILL)
    a.process.wait()
    assert not [e for e in a.events("trade gap") if e["symbol"] == "BTCUSDT"]
    # A committed BTCUSDT up to 599 (and anything above it it saw), not past the hole.
    with db.connect(database_url) as conn:
        states = [r[0] for r in conn.execute("SELECT continuity_state FROM stream_progress")]
    assert ["binance", "BTCUSDT", 599] in [
        s[:3] for state in states if state for s in state["symbols"]
    ]
    rest = produce_all(kafka_bootstrap, settings.topic_trades, messages[split:])
    b = workers(env, "--exit-when-idle", "3")
    b_summary = b.finish()
    opened, filled = check_gaps(database_url, messages, first + rest, settings)
    assert sorted(k[1:] for k in opened) == [
        ("BTCUSDT", 600, 600),
        ("ETHUSDT", 200, 201),
        ("SOLUSDT", 1100, 1100),
    ]
    assert not filled
    logged = [(e["symbol"], e["first_missing_id"]) for w in (a, b) for e in w.events("trade gap")]
    assert sorted(logged) == [("BTCUSDT", 600), ("ETHUSDT", 200), ("SOLUSDT", 1100)]
    assert ("BTCUSDT", 600) in [(e["symbol"], e["first_missing_id"]) for e in b.events("trade gap")]
    assert b_summary["gaps"] == len(b.events("trade gap"))


def test_two_workers_and_a_rebalance_record_each_gap_once(database_url, kafka_bootstrap, workers):
    """Eight symbols on four partitions, a live stream; two workers split them, then one is
    killed -9 and the other takes its partitions over from what was committed."""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m", batch_size=250, idle_timeout="60")
    symbols = operations.SYMBOLS
    dropped = {("binance", s): {150 + 40 * n, 151 + 40 * n, 900} for n, s in enumerate(symbols)}
    messages = without(market(21, 16_000, symbols=symbols, rate=40), dropped)
    env = settings_env(settings, database_url, kafka_bootstrap)
    env["CANDLEKEEP_IDLE_TIMEOUT"] = "60"
    producer = PacedProducer(kafka_bootstrap, settings.topic_trades, messages, 1500)
    a = workers(env, "--exit-when-idle", "4")
    b = workers(env, "--exit-when-idle", "4")

    def split():
        got = [assignments(w)[-1:] for w in (a, b)]
        return all(g and g[0] for g in got) and got[0][0] | got[1][0] == operations.ALL

    wait_until(split, 30, "the group to split the partitions between A and B")
    wait_until(lambda: consumed(database_url) > 4000, 30, "both to consume")
    a.process.send_signal(signal.SIGKILL)
    a.process.wait()
    assert producer.is_alive(), "the stream ended before the kill: slow it down"
    wait_until(lambda: assignments(b)[-1] == operations.ALL, 30, "B to take every partition")
    deliveries = producer.result()
    b.finish()
    opened, filled = check_gaps(database_url, messages, deliveries, settings)
    assert len(opened) == 2 * len(symbols) and not filled
    # Each logged once at most (a worker killed between its commit and its log line says
    # nothing of that gap; its successor never records it again).
    logged = [(e["symbol"], e["first_missing_id"]) for w in (a, b) for e in w.events("trade gap")]
    assert len(logged) == len(set(logged)) and set(logged) <= {(k[1], k[2]) for k in opened}
    assert len(logged) >= len(opened) - 2


def test_a_symbol_on_two_partitions_has_no_false_gap(database_url, kafka_bootstrap):
    """Every other block of 40 ids of a symbol keyed in lower case (SPEC §4): each partition
    sees holes of 40 that the other one fills. Only the ids taken out are gaps, one of them
    across a block's boundary; late trades' gaps are filled."""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m", batch_size=300, stream_writers=2)
    dropped = {
        ("binance", "BTCUSDT"): {*range(78, 83), 500},
        ("binance", "ETHUSDT"): {333},
    }
    messages = without(rekey(market(5, 9000, late=0.004)), dropped)
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages)
    spread = {
        d.partition for d in deliveries if d.message.key and d.message.key.upper() == b"BTCUSDT"
    }
    assert len(spread) == 2
    asyncio.run(StreamWorker(settings, database_url, kafka_bootstrap, exit_when_idle_s=3).run())
    opened, _ = check_gaps(database_url, messages, deliveries, settings)
    assert sorted(k[1:] for k in opened) == [
        ("BTCUSDT", 78, 82),
        ("BTCUSDT", 500, 500),
        ("ETHUSDT", 333, 333),
    ]


def test_only_the_exchanges_of_the_setting_have_gaps(database_url, kafka_bootstrap):
    """CANDLEKEEP_CONSECUTIVE_ID_EXCHANGES without binance: its holes are no gaps."""
    reset_tables(database_url)
    settings = stream_settings(intervals="1m,5m", consecutive_id_exchanges="kraken,binance-usdm")
    messages = without(market(9, 1500), {("binance", "BTCUSDT"): {100, 101}})
    deliveries = produce_all(kafka_bootstrap, settings.topic_trades, messages)
    summary = asyncio.run(
        StreamWorker(settings, database_url, kafka_bootstrap, exit_when_idle_s=3).run()
    )
    assert gap_rows(database_url) == {} and summary.gaps == 0
    assert summary.consumed == len(deliveries)
    assert dataclasses.asdict(summary)["stored"] > 0
