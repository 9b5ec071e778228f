"""The Airflow DAG end to end: synthetic feed → worker → ``dag.test()``, with Airflow's metadata
and the market data in a real PostgreSQL (SPEC §6)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest

from candlekeep.airflow_runner import airflow_env
from shared.batch.batch_run import PeriodError, run_period_of
from shared.core.intervals import IntervalSet
from shared.core.trades import datetime_to_ts
from shared.store import db
from stream.feeds.synthetic import MarketDials, synthetic_messages
from stream.worker import StreamWorker

from .conftest import REPO
from .services import _admin, with_database
from .streaming import produce_all, reset_tables, stream_settings

pytestmark = pytest.mark.integration

START, END = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"
INTERVALS = IntervalSet.parse("1m,5m,15m,1h")


@pytest.fixture(scope="module")
def airflow_db(database_url):
    name = f"airflow_{uuid.uuid4().hex[:10]}"
    server = with_database(database_url, "postgres")
    _admin(server, "CREATE DATABASE {}", name)
    yield with_database(database_url, name)
    _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def run_dag(env: dict, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "candlekeep.airflow_runner", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1])


def kinds(url: str) -> dict:
    with db.connect(url) as conn:
        return {
            (r[0], r[1], datetime_to_ts(r[2])): r[3]
            for r in conn.execute(
                "SELECT symbol, interval, window_start, kind FROM candle_mismatches"
            ).fetchall()
        }


def windows_of(symbol: str, ts: datetime) -> set:
    ts_us = datetime_to_ts(ts)
    return {(symbol, i.name, i.window_start(ts_us)) for i in INTERVALS.intervals}


def snapshot(url: str) -> dict:
    with db.connect(url) as conn:
        return {
            "batch": conn.execute(
                "SELECT exchange, symbol, interval, window_start, open, high, low, close,"
                " volume, quote_volume, trade_count, first_trade_id, last_trade_id,"
                " taker_buy_volume, taker_buy_quote_volume FROM batch_candles ORDER BY 1, 2, 3, 4"
            ).fetchall(),
            "mismatches": conn.execute(
                "SELECT exchange, symbol, interval, window_start, kind, differences, late_trades"
                " FROM candle_mismatches ORDER BY 1, 2, 3, 4"
            ).fetchall(),
            "reports": conn.execute(
                "SELECT interval_start, interval_end, status, summary, html FROM dq_reports"
                " ORDER BY interval_start, interval_end"
            ).fetchall(),
        }


def test_stream_then_dag_explains_every_difference(
    database_url, kafka_bootstrap, airflow_db, tmp_path
):
    reset_tables(database_url)
    settings = stream_settings()
    dials = MarketDials(
        count=20_000,
        rate=5,
        symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPEUR"),
        weights=(1, 1, 1, 0.003),
        late=0.01,
        disorder=0.05,
        duplicates=0.01,
        invalid=0.005,
        seed=21,
    )  # ~67 minutes of event time: the hour 00:00-01:00 is covered and closed
    produce_all(kafka_bootstrap, settings.topic_trades, synthetic_messages(dials))
    asyncio.run(StreamWorker(settings, database_url, kafka_bootstrap, exit_when_idle_s=3).run())
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    env = airflow_env(base, tmp_path / "airflow", airflow_db)
    env.update(
        DATABASE_URL=database_url,
        CANDLEKEEP_REPORT_DIR=str(tmp_path / "reports"),
        CANDLEKEEP_DQ_WAIT_TIMEOUT="20",
        CANDLEKEEP_TOPIC_TRADES=settings.topic_trades,
        CANDLEKEEP_CONSUMER_GROUP=settings.consumer_group,
    )

    # 1. Every window touched by a late trade is `late`; every other window matches.
    first = run_dag(env, "test", START, END)
    assert first["state"] == "success", first
    with db.connect(database_url) as conn:
        late = conn.execute(
            "SELECT symbol, ts FROM late_trades WHERE ts >= %s AND ts < %s", (START, END)
        ).fetchall()
        compared = conn.execute(
            "SELECT count(*) FROM batch_candles WHERE window_start >= %s AND window_end <= %s",
            (START, END),
        ).fetchone()[0]
    assert len(late) > 20
    touched = set().union(*(windows_of(symbol, ts) for symbol, ts in late))
    assert kinds(database_url) == dict.fromkeys(touched, "late")
    assert compared > len(touched) > 20
    before = snapshot(database_url)
    summary = before["reports"][0][3]
    assert summary["counts"]["match"] == compared - len(touched)
    assert summary["status"] in ("pass", "warn") and summary["stream"]["passed"]
    with db.connect(airflow_db) as conn:  # Airflow's metadata: the report's asset event
        extra = conn.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
            " WHERE a.name = 'candlekeep_dq_reports' ORDER BY e.id DESC LIMIT 1"
        ).fetchone()[0]
    assert extra["counts"] == summary["counts"] and extra["status"] == summary["status"]
    assert extra["interval"]["start"].startswith("2026-01-01T00:00:00")

    # 2. Running the same interval twice gives identical tables.
    assert run_dag(env, "test", START, END)["state"] == "success"
    assert snapshot(database_url) == before

    # 3. A changed stream candle and a lost trade: unexplained and missing_in_batch, and the
    #    run fails its check.
    with db.connect(database_url) as conn:
        lone = conn.execute(
            "SELECT symbol, window_start, first_trade_id FROM stream_candles"
            " WHERE interval = '1m' AND trade_count = 1 AND symbol = 'XRPEUR'"
            " AND window_start >= %s AND window_end <= %s ORDER BY window_start LIMIT 1",
            (START, END),
        ).fetchone()
        assert lone, "the illiquid symbol has single-trade minutes"
        changed = conn.execute(
            "SELECT symbol, window_start FROM stream_candles WHERE interval = '1m'"
            " AND symbol = 'BTCUSDT' AND window_start >= %s AND window_end <= %s"
            " ORDER BY window_start",
            (START, END),
        ).fetchall()
        changed = next(r for r in changed if ("BTCUSDT", "1m", datetime_to_ts(r[1])) not in touched)
        conn.execute("DELETE FROM trades WHERE symbol = %s AND trade_id = %s", (lone[0], lone[2]))
        conn.execute(
            "UPDATE stream_candles SET volume = volume + 1 WHERE interval = '1m'"
            " AND symbol = %s AND window_start = %s",
            changed,
        )
        stream_counts = dict(
            conn.execute(
                "SELECT interval, trade_count FROM stream_candles WHERE symbol = %s"
                " AND window_start = date_bin(CASE interval WHEN '1m' THEN interval '1 minute'"
                " WHEN '5m' THEN interval '5 minutes' WHEN '15m' THEN interval '15 minutes'"
                " ELSE interval '1 hour' END, %s::timestamptz, timestamptz 'epoch')",
                (lone[0], lone[1]),
            ).fetchall()
        )
        conn.commit()
    third = run_dag(env, "test", START, END)
    assert third["state"] == "failed"
    assert third["tasks"]["verdict"] == "failed"
    assert third["tasks"]["publish"] == "success"
    expected = dict.fromkeys(touched, "late")
    expected[("BTCUSDT", "1m", datetime_to_ts(changed[1]))] = "unexplained"
    for key in windows_of(lone[0], lone[1]):
        # The lost trade's own windows: no stored trade left behind a single-trade candle.
        alone = stream_counts[key[1]] == 1
        expected[key] = "missing_in_batch" if alone else "unexplained"
    assert kinds(database_url) == expected
    assert expected[("XRPEUR", "1m", datetime_to_ts(lone[1]))] == "missing_in_batch"
    report = snapshot(database_url)["reports"][0]
    assert report[2] == "fail" and report[3]["counts"]["unexplained"] >= 1


def test_a_run_with_no_interval_fails_with_a_clear_message():
    with pytest.raises(PeriodError, match="trigger it with params start and end"):
        run_period_of({}, None, None)
    start, end = run_period_of({"start": START, "end": END}, None, None)
    assert (start, end) == (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 1, tzinfo=UTC))
    scheduled = run_period_of({"start": None, "end": None}, start, end)
    assert scheduled == (start, end)


def test_dagbag_imports_without_errors(airflow_db, tmp_path):
    env = airflow_env(dict(os.environ), tmp_path / "airflow", airflow_db)
    result = run_dag(env, "dagbag")
    assert result["errors"] == {}
    assert "candle_reconciliation" in result["dags"]


def test_airflow_backfill_creates_one_run_per_hour(airflow_db, tmp_path):
    env = airflow_env(dict(os.environ), tmp_path / "airflow", airflow_db)
    airflow = str(REPO / ".venv" / "bin" / "airflow")
    airflow = airflow if os.path.exists(airflow) else "airflow"
    for command in (
        ["db", "migrate"],
        ["dags", "reserialize"],
        [
            "backfill",
            "create",
            "--dag-id",
            "candle_reconciliation",
            "--from-date",
            "2026-02-01T00:00:00+00:00",
            "--to-date",
            "2026-02-01T02:00:00+00:00",
        ],
    ):
        proc = subprocess.run(
            [airflow, *command], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with db.connect(airflow_db) as conn:
        runs = conn.execute(
            "SELECT data_interval_start, data_interval_end, conf FROM dag_run"
            " WHERE dag_id = 'candle_reconciliation' AND run_type = 'backfill'"
            " ORDER BY data_interval_start"
        ).fetchall()
    assert [(s.hour, (e - s).total_seconds()) for s, e, _ in runs] == [
        (0, 3600.0),
        (1, 3600.0),
        (2, 3600.0),
    ]
    for start, end, conf in runs:  # each backfill run reconciles its own data interval
        assert run_period_of(conf, start, end) == (start, end)
