"""``candlekeep demo --keep-running``: after the demo, a live pipeline until Ctrl-C.

The streaming worker, a synthetic feed at real pace (timestamps "now") and Airflow 3 (api-server
on localhost, scheduler, dag-processor, triggerer) with the DAG unpaused and scheduled, all on
the demo's embedded services. Everything is a child process, stopped on Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console

AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def live_env(settings, airflow_url: str, port: int) -> dict:
    from candlekeep.airflow_runner import airflow_env

    env = airflow_env(dict(os.environ), Path(settings.data_dir).resolve() / "airflow", airflow_url)
    secret = secrets.token_urlsafe(32)
    env.update(
        DATABASE_URL=settings.database_url,
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        CANDLEKEEP_REPORT_DIR=settings.report_dir,
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        # One secret for every component: they sign and check each other's tokens with it.
        AIRFLOW__API_AUTH__JWT_SECRET=secret,
        AIRFLOW__API__SECRET_KEY=secret,
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://localhost:{port}",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://localhost:{port}/execution/",
        # A local demo: everyone who opens the UI is an admin, no login page.
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
    )
    return env


def keep_running(console: Console, settings, airflow_url: str, broker, port: int = 8080) -> None:
    env = live_env(settings, airflow_url, port)
    logs = Path(settings.data_dir).resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    candlekeep = [sys.executable, "-m", "candlekeep"]
    commands = {
        "stream": [*candlekeep, "stream"],
        "feed": [
            *candlekeep,
            "feed",
            "synthetic",
            "--start",
            "now",
            "--speed",
            "1",
            "--count",
            "100000000",
            "--rate",
            "5",
        ],
        **{name: [airflow, name] for name in AIRFLOW_COMPONENTS},
    }
    # The demo's dag.test() runs registered the DAG already, paused as Airflow creates DAGs:
    # live, it is to be scheduled.
    subprocess.run(
        [airflow, "dags", "unpause", "candle_reconciliation"],
        env=env,
        capture_output=True,
        check=False,
    )
    children: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            with open(logs / f"{name}.log", "ab") as log:
                children[name] = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        with console.status(f"starting Airflow on http://localhost:{port}"):
            _wait_for_http(f"http://localhost:{port}/api/v2/monitor/health", children, 120)
        console.print(
            f"[bold green]running[/]: Airflow UI http://localhost:{port} (DAG "
            f"candle_reconciliation, scheduled hourly), worker metrics http://localhost:"
            f"{settings.metrics_port}/metrics, logs in {logs}. Ctrl-C stops everything.",
            highlight=False,
        )
        while True:
            for name, child in children.items():
                if child.poll() is not None:
                    raise SystemExit(
                        f"{name} exited with status {child.returncode}: "
                        f"see {logs / (name + '.log')}"
                    )
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        for child in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def _wait_for_http(url: str, children: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, child in children.items():
            if child.poll() is not None:
                raise SystemExit(f"{name} exited with status {child.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"Airflow did not answer on {url} within {timeout_s:.0f}s")
