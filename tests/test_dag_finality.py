"""The DAG's Airflow conventions (SPEC §6, §6.2) in real Airflow (``dag.test()`` with its
metadata in PostgreSQL): the wait is a sensor that leaves its slot between looks and goes on
after the bound, each run emits an asset event naming the periods it certified, and a failed
run calls the notifier configured in Airflow."""

from __future__ import annotations

import json
import os
import uuid
from decimal import Decimal

import pytest

from candlekeep.airflow_runner import airflow_env
from shared.core.trades import Trade, parse_timestamp
from shared.store import db
from shared.store.trade_store import store_trades

from .services import _admin, with_database
from .streaming import reset_tables, stream_settings
from .test_dag import run_dag

pytestmark = pytest.mark.integration

START, END = "2026-03-01T00:00:00Z", "2026-03-01T01:00:00Z"


@pytest.fixture(scope="module")
def airflow_db(database_url):
    name = f"airflow_{uuid.uuid4().hex[:10]}"
    server = with_database(database_url, "postgres")
    _admin(server, "CREATE DATABASE {}", name)
    yield with_database(database_url, name)
    _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def test_sensor_asset_event_and_failure_notifier(
    database_url, kafka_bootstrap, airflow_db, tmp_path
):
    reset_tables(database_url)
    settings = stream_settings()
    t0 = parse_timestamp(START)
    trades = [
        Trade("binance", "BTCUSDT", i, t0 + i * 7_000_000, Decimal(100 + i % 7), Decimal("0.1"))
        for i in range(500)
    ]
    with db.connect(database_url) as conn:
        store_trades(conn, trades)
        conn.commit()
    notified = tmp_path / "notified.jsonl"
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    env = airflow_env(base, tmp_path / "airflow", airflow_db)
    env.update(
        DATABASE_URL=database_url,
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        CANDLEKEEP_REPORT_DIR=str(tmp_path / "reports"),
        CANDLEKEEP_DQ_WAIT_TIMEOUT="4",
        CANDLEKEEP_DQ_WAIT_POKE_INTERVAL="1",
        CANDLEKEEP_TOPIC_TRADES=settings.topic_trades,
        CANDLEKEEP_TOPIC_CANDLES=settings.topic_candles,
        CANDLEKEEP_CONSUMER_GROUP=settings.consumer_group,
        AIRFLOW_VAR_CANDLEKEEP_FAILURE_NOTIFIER=json.dumps(
            {"class": "tests.airflow_notifier.FileNotifier", "kwargs": {"path": str(notified)}}
        ),
    )

    # 1. No stream at all: the sensor looks, leaves its slot (up_for_reschedule) between looks,
    #    goes on after CANDLEKEEP_DQ_WAIT_TIMEOUT, and the report says the stream lagged.
    result = run_dag(env, "test", START, END)
    assert result["state"] == "success", result
    assert result["tasks"]["wait_for_stream"] == "success"
    with db.connect(airflow_db) as conn:
        reschedules = conn.execute(
            "SELECT count(*) FROM task_reschedule r JOIN task_instance t ON t.id = r.ti_id"
            " WHERE t.task_id = 'wait_for_stream'"
        ).fetchone()[0]
        extra = conn.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
            " WHERE a.name = 'candlekeep_certified_periods' ORDER BY e.id DESC LIMIT 1"
        ).fetchone()[0]
    assert reschedules >= 2  # looked at least three times, the slot freed in between
    with db.connect(database_url) as conn:
        summary = conn.execute("SELECT summary FROM dq_reports").fetchone()[0]
        pending = conn.execute(
            "SELECT count(*) FROM candle_corrections WHERE published_at IS NULL"
        ).fetchone()[0]
        corrections = conn.execute("SELECT count(*) FROM candle_corrections").fetchone()[0]
    assert summary["stream"]["passed"] is False and summary["status"] == "warn"
    assert any("stream" in reason for reason in summary["reasons"])

    # 2. The asset event names the period it certified; the batch candles the stream never
    #    made went out as corrections.
    assert [(p["start"][:19], p["end"][:19], p["status"]) for p in extra["periods"]] == [
        ("2026-03-01T00:00:00", "2026-03-01T01:00:00", "warn")
    ]
    assert corrections > 60 and pending == 0 and extra["corrections_sent"] == corrections
    assert not notified.exists()

    # 3. A failed run calls the configured notifier.
    failed = run_dag(env, "test", END, START)  # end before start: the period task fails
    assert failed["state"] == "failed", failed
    lines = notified.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["dag_id"] == "candle_reconciliation"
