"""``candlekeep demo --keep-running``: after the demo, a live pipeline until Ctrl-C.

The streaming worker, a synthetic feed at real pace (timestamps "now") and Airflow 3 (api-server
on localhost, scheduler, dag-processor, triggerer) with the DAG unpaused and scheduled, all on
the demo's embedded services. Everything is a child process, stopped on Ctrl-C.
"""

from __future__ import annotations

import contextlib
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
        # The synthetic market's trades are named ``binance`` but are not Binance's: the real
        # venue would only contradict them (until the demo brings a venue of its own).
        CANDLEKEEP_VENUE_CHECKS=os.environ.get("CANDLEKEEP_VENUE_CHECKS", "false"),
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
    with CtrlC() as ctrl_c:  # Ctrl-C is a request here, never an exception mid-step
        try:
            for name, command in commands.items():
                with open(logs / f"{name}.log", "ab") as log:
                    children[name] = subprocess.Popen(
                        command,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            with console.status(f"starting Airflow on http://localhost:{port}"):
                _wait_for_http(
                    f"http://localhost:{port}/api/v2/monitor/health", children, 120, ctrl_c
                )
            if not ctrl_c.presses:
                console.print(
                    f"[bold green]running[/]: Airflow UI http://localhost:{port} (DAG "
                    f"candle_reconciliation, scheduled hourly), worker metrics http://localhost:"
                    f"{settings.metrics_port}/metrics, logs in {logs}. Ctrl-C stops everything.",
                    highlight=False,
                )
            while not ctrl_c.wait(1):
                for name, child in children.items():
                    if child.poll() is not None:
                        raise SystemExit(
                            f"{name} exited with status {child.returncode}: "
                            f"see {logs / (name + '.log')}"
                        )
            console.print("stopping… (Ctrl-C again stops everything at once)")
        finally:
            at_once = stop_processes(list(children.values()), GRACE_S, ctrl_c)
    if at_once:
        console.print("stopped at once: the worker's last batch was not drained")
        raise SystemExit(130)


#: How long the children have to stop gracefully (the worker drains and commits) before they
#: are killed.
GRACE_S = 20.0


class CtrlC:
    """While active, Ctrl-C is counted instead of raising ``KeyboardInterrupt``.

    A ``KeyboardInterrupt`` raised in the middle of stopping children (the old behaviour)
    abandoned the rest of the stop: "Aborted!", and the Airflow scheduler and its task
    processes kept running, holding the port. The handler only bumps a counter (taking a lock
    in a signal handler can deadlock), and the loops poll it.
    """

    def __init__(self) -> None:
        self.presses = 0
        self._previous = None

    def __enter__(self) -> CtrlC:
        self._previous = signal.signal(signal.SIGINT, self._pressed)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _pressed(self, *_: object) -> None:
        self.presses += 1

    def wait(self, timeout_s: float, presses: int = 1) -> bool:
        """Sleep until Ctrl-C was pressed ``presses`` times in all or ``timeout_s`` passed;
        returns whether it was."""
        deadline = time.monotonic() + timeout_s
        while self.presses < presses and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.presses >= presses


def stop_processes(children: list[subprocess.Popen], grace_s: float, ctrl_c: CtrlC) -> bool:
    """Stop every child and everything it started; returns whether a second Ctrl-C hurried it.

    SIGTERM goes to each child's process group (the worker drains and commits, Airflow stops
    its workers). Airflow's task processes put themselves in process groups of their own, so
    every descendant is tracked by pid as well. When the grace runs out, or Ctrl-C is pressed
    again, whatever is left of all of them is sent SIGKILL. Nothing outlives the command.
    """
    import psutil

    tree = _descendants(children)
    for child in children:
        _signal_group(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    hurry = ctrl_c.presses + 1  # the press after the one that asked for the stop, if any
    while time.monotonic() < deadline and ctrl_c.presses < hurry:
        tree.update(_descendants(children))  # what they start while stopping, too
        if not any(_alive(p) for p in tree):
            break
        ctrl_c.wait(0.2, hurry)
    tree.update(_descendants(children))
    for child in children:
        _signal_group(child.pid, signal.SIGKILL)
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(tree), timeout=5)
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(1)  # reap: no zombie left behind
    return ctrl_c.presses >= hurry


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(children: list[subprocess.Popen]) -> set:
    """The children and all their descendants, as psutil processes."""
    import psutil

    found = set()
    for child in children:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(child.pid)
            found.add(process)
            found.update(process.children(recursive=True))
    return found


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(
            pid, sig
        )  # each child leads a session (start_new_session): its group id is its pid


def _wait_for_http(url: str, children: dict, timeout_s: float, ctrl_c: CtrlC) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not ctrl_c.presses:
        for name, child in children.items():
            if child.poll() is not None:
                raise SystemExit(f"{name} exited with status {child.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        ctrl_c.wait(1)
    if not ctrl_c.presses:
        raise SystemExit(f"Airflow did not answer on {url} within {timeout_s:.0f}s")
