"""``candlekeep demo --keep-running``: a live pipeline with Airflow's UI, until Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from candlekeep.embedded import EmbeddedPostgres
from shared import db

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_keep_running_serves_airflow_with_the_dag_scheduled_until_ctrl_c(tmp_path):
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CANDLEKEEP_", "AIRFLOW", "DATABASE_URL", "KAFKA_"))
    }
    env["CANDLEKEEP_METRICS_PORT"] = "0"
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "candlekeep",
            "demo",
            "--hours",
            "1",
            "--keep-running",
            "--airflow-port",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 400
        while not any(line.startswith("running:") for line in lines):
            assert demo.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(1)
        with urllib.request.urlopen(f"http://localhost:{port}/api/v2/monitor/health") as r:
            health = json.load(r)
        assert health["metadatabase"]["status"] == "healthy"
        assert health["scheduler"]["status"] == "healthy"
        # The DAG is parsed, unpaused and scheduled, in Airflow's metadata database.
        server = EmbeddedPostgres(str(tmp_path / ".candlekeep")).start()
        try:
            deadline = time.monotonic() + 120
            row = None
            while time.monotonic() < deadline:
                with db.connect(server.url_for("candlekeep_airflow")) as conn:
                    row = conn.execute(
                        "SELECT is_paused, next_dagrun_data_interval_start,"
                        " next_dagrun_data_interval_end FROM dag"
                        " WHERE dag_id = 'candle_reconciliation'"
                    ).fetchone()
                if row and row[1] is not None:
                    break
                time.sleep(2)
        finally:
            server.stop()
        assert row is not None and row[0] is False
        assert (row[2] - row[1]).total_seconds() == 3600
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(90)
        finally:
            if demo.poll() is None:
                demo.kill()
    reader.join(5)
    assert code == 0, "".join(lines)[-3000:]
    assert any("stopping" in line for line in lines)
    with socket.socket() as sock:  # Airflow's API server is gone
        assert sock.connect_ex(("127.0.0.1", port)) != 0
