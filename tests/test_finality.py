"""Finality (SPEC §6.2) against a real broker and a real PostgreSQL: the view ``candles`` and
its statuses, corrections reaching a consumer of the ``candles`` topic, stale periods."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaConsumer

from bench.candles_view import READ_DAY, fill_day
from shared.batch import batch_run
from shared.core.trades import Trade, datetime_to_ts, parse_timestamp
from shared.store import db
from shared.store.trade_store import store_trades
from stream.corrections import publish_corrections
from stream.feeds.synthetic import MarketDials, synthetic_messages
from stream.messages import candle_key
from stream.worker import StreamWorker

from .streaming import produce_all, reset_tables, stream_settings

pytestmark = pytest.mark.integration

START, END = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"
CANDLE_ROW = (
    "exchange, symbol, interval, window_start, window_end, open, high, low, close, volume,"
    " quote_volume, trade_count, first_trade_id, last_trade_id, taker_buy_volume,"
    " taker_buy_quote_volume"
)


def rows(url: str, sql: str, *params) -> list:
    with db.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def statuses(url: str) -> dict:
    return {
        (r[0], r[1], r[2], r[3]): r[4]
        for r in rows(
            url,
            "SELECT exchange, symbol, interval, window_start, status FROM candles"
            " WHERE window_start >= %s AND window_end <= %s",
            START,
            END,
        )
    }


def mismatch_kinds(url: str) -> dict:
    return {
        tuple(r[:4]): r[4]
        for r in rows(
            url, "SELECT exchange, symbol, interval, window_start, kind FROM candle_mismatches"
        )
    }


def batch_messages(url: str) -> dict:
    """The hour's batch candles as the ``candles`` topic carries a candle (without revision)."""
    from shared.core.candles import Candle
    from stream.messages import candle_message

    out = {}
    for r in rows(
        url,
        f"SELECT {CANDLE_ROW} FROM batch_candles WHERE window_start >= %s AND window_end <= %s",
        START,
        END,
    ):
        candle = Candle(*r[:3], datetime_to_ts(r[3]), datetime_to_ts(r[4]), *r[5:], 0, 0)
        key, value = candle_message(candle)
        record = json.loads(value)
        record.pop("revision")
        out[key.decode()] = record
    return out


async def _consume_latest(bootstrap: str, topic: str) -> dict:
    """A consumer in a new group that keeps the highest revision of each key (the later
    message on a tie), reading the topic to its end."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"reader-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    latest: dict = {}
    try:
        async with asyncio.timeout(60):
            while not consumer.assignment():
                await asyncio.sleep(0.1)
            tps = list(consumer.assignment())
            ends = await consumer.end_offsets(tps)
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        value = json.loads(r.value)
                        kept = latest.get(r.key.decode())
                        if kept is None or value["revision"] >= kept["revision"]:
                            latest[r.key.decode()] = value
    finally:
        await consumer.stop()
    return latest


def consumed_hour(bootstrap: str, topic: str) -> dict:
    latest = asyncio.run(_consume_latest(bootstrap, topic))
    start_us, end_us = parse_timestamp(START), parse_timestamp(END)
    out = {}
    for key, value in latest.items():
        ws, we = parse_timestamp(value["window_start"]), parse_timestamp(value["window_end"])
        if ws >= start_us and we <= end_us:
            out[key] = {k: v for k, v in value.items() if k != "revision"}
    return out


def snapshot(url: str) -> dict:
    tables = {
        "batch": f"SELECT {CANDLE_ROW} FROM batch_candles ORDER BY 1, 2, 3, 4",
        "mismatches": "SELECT exchange, symbol, interval, window_start, kind, differences,"
        " late_trades FROM candle_mismatches ORDER BY 1, 2, 3, 4",
        "reports": "SELECT interval_start, interval_end, status, summary, html FROM dq_reports",
        "corrections": "SELECT * FROM candle_corrections ORDER BY 1, 2, 3, 4",
        "stale": "SELECT * FROM stale_periods",
        "candles": "SELECT * FROM candles ORDER BY 1, 2, 3, 4",
    }
    return {name: rows(url, sql) for name, sql in tables.items()}


def test_statuses_corrections_and_stale_periods(database_url, kafka_bootstrap, tmp_path):
    reset_tables(database_url)
    settings = stream_settings(
        kafka_bootstrap_servers=kafka_bootstrap, report_dir=str(tmp_path / "reports")
    )
    dials = MarketDials(
        count=12_000,
        rate=3,
        symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT"),
        late=0.01,
        disorder=0.05,
        duplicates=0.01,
        seed=14,
    )  # ~67 minutes of event time: the hour 00:00-01:00 is covered and closed
    produce_all(kafka_bootstrap, settings.topic_trades, synthetic_messages(dials))
    asyncio.run(StreamWorker(settings, database_url, kafka_bootstrap, exit_when_idle_s=3).run())

    # 1. Before the DAG every key of the hour is provisional: the stream's candle.
    before = statuses(database_url)
    assert before and set(before.values()) == {"provisional"}

    # 2. After it: certified, or corrected for exactly the keys classified late, which serve
    #    the batch candle.
    summary = batch_run.run_period(database_url, settings, START, END)
    after = statuses(database_url)
    late = {k for k, kind in mismatch_kinds(database_url).items() if kind == "late"}
    assert len(late) > 10 and set(mismatch_kinds(database_url).values()) == {"late"}
    assert {k for k, s in after.items() if s == "corrected"} == late
    assert {k for k, s in after.items() if s != "corrected"} == set(after) - late
    assert set(after.values()) == {"certified", "corrected"}
    served = rows(
        database_url,
        f"SELECT {CANDLE_ROW} FROM candles WHERE status = 'corrected' ORDER BY 1, 2, 3, 4",
    )
    assert served == rows(
        database_url,
        f"SELECT {CANDLE_ROW} FROM batch_candles b WHERE EXISTS (SELECT 1 FROM"
        " candle_mismatches m WHERE m.kind = 'late' AND (m.exchange, m.symbol, m.interval,"
        " m.window_start) = (b.exchange, b.symbol, b.interval, b.window_start))"
        " ORDER BY 1, 2, 3, 4",
    )
    assert summary.statuses["corrected"] == len(late)
    assert summary.lateness_advice and all(a.late for a in summary.lateness_advice)
    # The late-trade rate, its buckets and each symbol's advice count what the tables hold.
    period = "ts >= %s AND ts < %s"
    stored = dict(
        (r[0], r[1])
        for r in rows(
            database_url,
            f"SELECT symbol, count(*) FROM trades WHERE {period} GROUP BY 1",
            START,
            END,
        )
    )
    lateness_s = [
        r[1].total_seconds()
        for r in rows(
            database_url, f"SELECT symbol, lateness FROM late_trades WHERE {period}", START, END
        )
    ]
    assert summary.late_trades.trades == sum(stored.values())
    assert summary.late_trades.late == len(lateness_s) > 0
    assert [b.count for b in summary.late_trades.lateness] == [
        sum(1 for s in lateness_s if low <= s and (high is None or s < high))
        for low, high in ((0, 1), (1, 5), (5, 30), (30, 60), (60, 300), (300, 900), (900, None))
    ]
    assert {a.symbol: (a.trades, a.late) for a in summary.lateness_advice} == {
        symbol: (stored[symbol], late)
        for symbol, late in rows(
            database_url,
            f"SELECT symbol, count(*) FROM late_trades WHERE {period} GROUP BY 1",
            START,
            END,
        )
    }

    # 3. The corrections reach a consumer of the candles topic: it ends with the batch candles.
    assert publish_corrections(database_url, settings) == len(late)
    assert consumed_hour(kafka_bootstrap, settings.topic_candles) == batch_messages(database_url)

    # 4. A rerun without change sends nothing and changes nothing.
    reconciled = snapshot(database_url)
    batch_run.run_period(database_url, settings, START, END)
    assert publish_corrections(database_url, settings) == 0
    assert snapshot(database_url) == reconciled

    # 5. A trade loaded for the reconciled hour makes it stale; the report says so.
    ts_us = parse_timestamp("2026-01-01T00:30:10Z")
    trade = Trade("binance", "BTCUSDT", 10**12, ts_us, Decimal("1"), Decimal("0.5"))
    with db.connect(database_url) as conn:
        store_trades(conn, [trade])
        conn.commit()
    assert rows(database_url, 'SELECT "start", "end", trades FROM stale_periods') == [
        (datetime.fromisoformat(START), datetime.fromisoformat(END), 1)
    ]
    assert batch_run.report_summary(database_url, settings, START, END).stale
    from shared.batch.report import stored_report_html

    stale_html = stored_report_html(
        database_url, datetime.fromisoformat(START), datetime.fromisoformat(END)
    )
    assert 'id="stale"' in stale_html

    # 6. The next run reconciles it: its candles and report change, it is no longer stale, and
    #    the consumer converges to the new batch candles.
    redone = batch_run.reconcile_stale_step(database_url, settings)
    assert [(p["start"][:19], p["end"][:19]) for p in redone] == [
        ("2026-01-01T00:00:00", "2026-01-01T01:00:00")
    ]
    assert rows(database_url, "SELECT * FROM stale_periods") == []
    now = snapshot(database_url)
    assert now["batch"] != reconciled["batch"] and now["reports"] != reconciled["reports"]
    minute = ("binance", "BTCUSDT", "1m", datetime.fromisoformat("2026-01-01T00:30:00Z"))
    low = rows(
        database_url,
        "SELECT low, trade_count, status FROM candles WHERE exchange = %s AND symbol = %s"
        " AND interval = %s AND window_start = %s",
        *minute,
    )[0]
    # The batch candle is served; the stream never saw the trade: an unexplained difference.
    assert low[0] == Decimal("1") and low[2] == "disputed"
    assert not batch_run.report_summary(database_url, settings, START, END).stale
    assert publish_corrections(database_url, settings) >= 4  # the trade's 1m, 5m, 15m, 1h
    consumed = consumed_hour(kafka_bootstrap, settings.topic_candles)
    assert consumed == batch_messages(database_url)
    assert consumed[candle_key_of(minute)]["low"] == "1"

    # 7. Rerunning without new trades changes nothing: byte-identical rows, nothing stale.
    assert batch_run.reconcile_stale_step(database_url, settings) == []
    settled = snapshot(database_url)
    batch_run.run_period(database_url, settings, START, END)
    assert publish_corrections(database_url, settings) == 0
    assert snapshot(database_url) == settled


def candle_key_of(key: tuple) -> str:
    from shared.core.candles import Candle

    ws = datetime_to_ts(key[3])
    c = Candle(*key[:3], ws, ws, *(Decimal(0),) * 6, 0, 0, 0, None, None, 0, 0)
    return candle_key(c).decode()


def test_verdicts_of_the_venue_and_unexplained_differences_set_the_status(database_url):
    """``verified`` where the venue's candle agrees, ``disputed`` for ``exchange_mismatch``,
    ``unexplained`` and a stream candle with no trade behind it (``missing_in_batch``)."""
    reset_tables(database_url)
    hour = datetime.fromisoformat(START)
    w = [hour.replace(minute=m) for m in range(5)]
    values = "(%s, %s, %s, %s, %s, 10, 12, 9, 11, 2, 22, 2, 1, 2, NULL, NULL)"
    with db.connect(database_url) as conn:
        for table in ("stream_candles", "batch_candles"):
            for m in range(4):  # minute 4: stream only, with no batch candle
                conn.execute(
                    f"INSERT INTO {table} ({CANDLE_ROW}) VALUES {values}",
                    ("binance", "BTCUSDT", "1m", w[m], w[m].replace(minute=m + 1)),
                )
        conn.execute(
            f"INSERT INTO stream_candles ({CANDLE_ROW}) VALUES {values}",
            ("binance", "BTCUSDT", "1m", w[4], w[4].replace(minute=5)),
        )
        conn.execute(
            "UPDATE stream_candles SET volume = 3 WHERE window_start = %s", (w[1],)
        )  # differs
        for m, kind in ((1, "unexplained"), (4, "missing_in_batch")):
            conn.execute(
                "INSERT INTO candle_mismatches (exchange, symbol, interval, window_start, kind,"
                " differences) VALUES ('binance', 'BTCUSDT', '1m', %s, %s, '{}')",
                (w[m], kind),
            )
        for m, verdict in ((0, "verified"), (2, "exchange_mismatch"), (3, "gap")):
            conn.execute(
                "INSERT INTO candle_verifications (exchange, symbol, interval, window_start,"
                " verdict) VALUES ('binance', 'BTCUSDT', '1m', %s, %s)",
                (w[m], verdict),
            )
        conn.commit()
    got = {
        r[0].minute: (r[1], r[2])
        for r in rows(database_url, "SELECT window_start, status, volume FROM candles ORDER BY 1")
    }
    assert got == {
        0: ("verified", 2),
        1: ("disputed", 2),  # the batch candle is served, the difference is not explained
        2: ("disputed", 2),
        3: ("certified", 2),  # a gap's verdict does not change the status
        4: ("disputed", 2),  # a stream candle with no stored trade behind it
    }


def test_reading_a_symbols_day_uses_the_primary_keys(database_url):
    """One symbol's 1m candles of a day among 20 symbols: index scans on both candle tables'
    primary keys, no scan of either (the day is bench/candles_view.py's, analysed)."""
    reset_tables(database_url)
    try:
        with db.connect(database_url) as conn:
            fill_day(conn)
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + READ_DAY).fetchall())
            rows_read = conn.execute(READ_DAY).fetchall()
    finally:
        reset_tables(database_url)
    assert len(rows_read) == 1440
    assert "Seq Scan on stream_candles" not in plan and "Seq Scan on batch_candles" not in plan
    assert "stream_candles_pkey" in plan and "batch_candles_pkey" in plan, plan
