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
from shared.store import db

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_live_demo(tmp_path, port: int) -> tuple[subprocess.Popen, list[str]]:
    """``candlekeep demo --keep-running`` in ``tmp_path``; returns once it says "running:"."""
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
    demo.reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
    demo.reader.start()
    try:
        deadline = time.monotonic() + 400
        while not any(line.startswith("running:") for line in lines):
            assert demo.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(1)
    except BaseException:
        demo.kill()
        raise
    return demo, lines


def test_keep_running_serves_airflow_with_the_dag_scheduled_until_ctrl_c(tmp_path):
    port = free_port()
    demo, lines = start_live_demo(tmp_path, port)
    try:
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
    demo.reader.join(5)
    assert code == 0, "".join(lines)[-3000:]
    assert any("stopping" in line for line in lines)
    with socket.socket() as sock:  # Airflow's API server is gone
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_second_ctrl_c_stops_every_child_at_once_and_nothing_outlives_the_demo(tmp_path):
    import psutil

    port = free_port()
    demo, lines = start_live_demo(tmp_path, port)
    try:
        # The scheduler's LocalExecutor workers, the DAG processor's children, and any task
        # process (which leaves its parent's process group) are in the tree by now.
        time.sleep(5)
        tree = psutil.Process(demo.pid).children(recursive=True)
        assert any("scheduler" in " ".join(p.cmdline()) for p in tree), tree
        pids = {p.pid: p for p in tree}
        demo.send_signal(signal.SIGINT)
        time.sleep(1.5)  # shutting down: the worker drains, Airflow stops its executors
        sent_second = time.monotonic()
        demo.send_signal(signal.SIGINT)
        code = demo.wait(60)
        took = time.monotonic() - sent_second
    finally:
        if demo.poll() is None:
            demo.kill()
    demo.reader.join(5)
    output = "".join(lines)
    assert "Aborted!" not in output, output[-3000:]
    assert code == 130, output[-3000:]
    assert "stopped at once" in output
    # The embedded services stop after the children; the children themselves went at once.
    assert took < 30, took
    survivors = [
        f"{pid} {' '.join(p.cmdline())}"
        for pid, p in pids.items()
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert survivors == [], survivors
    with socket.socket() as sock:  # nothing listens on Airflow's port, which is free again
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a restarted server does
        sock.bind(("127.0.0.1", port))
