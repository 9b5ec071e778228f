"""Benchmark: the wall time and peak memory of ``candlekeep demo`` (the README's main command).

Runs the demo in a fresh directory (so the embedded PostgreSQL is initialised and Airflow's
metadata migrated, as on a newcomer's first run, unless ``--warm``), samples the resident memory
of the whole process tree (the CLI, the worker, Airflow's ``dag.test()`` process, PostgreSQL and
the broker) every 0.2 s, and writes the results to docs/benchmarks.md.

Usage: ``.venv/bin/python bench/demo_run.py [--warm] [--no-write-docs]``
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## The demo: wall time and peak memory"


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(sum, largest) resident set size over ``root`` and its descendants, in bytes."""
    total = largest = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for process in processes:
        try:
            rss = process.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest


def run_demo(workdir: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CANDLEKEEP_", "AIRFLOW", "DATABASE_URL", "KAFKA_"))
    }
    env["CANDLEKEEP_METRICS_PORT"] = "0"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "candlekeep", "demo"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    root = psutil.Process(proc.pid)
    peak_total = peak_single = 0
    while proc.poll() is None:
        total, single = tree_rss(root)
        peak_total, peak_single = max(peak_total, total), max(peak_single, single)
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"the demo failed:\n{output[-3000:]}")
    return {
        "wall_s": time.monotonic() - started,
        "peak_total": peak_total,
        "peak_single": peak_single,
        "output": output,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--warm",
        action="store_true",
        help="Run twice in the same directory and report the second run.",
    )
    parser.add_argument("--no-write-docs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="candlekeep-demo-") as tmp:
        cold = run_demo(Path(tmp))
        warm = run_demo(Path(tmp)) if args.warm else None
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    mib = 1024 * 1024
    lines = [
        SECTION,
        "",
        "`.venv/bin/python bench/demo_run.py --warm` — `candlekeep demo` (2 hours of synthetic "
        "market, ~60k messages, two DAG runs) in a fresh directory: the first run initialises "
        "the embedded PostgreSQL and migrates Airflow's metadata; the second reuses them. Memory "
        "is the resident set of the whole process tree (CLI, worker, Airflow's `dag.test()` "
        "process, PostgreSQL, broker), sampled every 0.2 s. Target: under 3 minutes.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}; "
        f"{datetime.now(UTC):%Y-%m-%d}.",
        "",
        "| run | wall time | peak memory, whole tree | largest process |",
        "|---|---:|---:|---:|",
        f"| first (cold) | {cold['wall_s']:.0f} s | {cold['peak_total'] / mib:.0f} MiB | "
        f"{cold['peak_single'] / mib:.0f} MiB |",
    ]
    if warm:
        lines.append(
            f"| second (warm) | {warm['wall_s']:.0f} s | "
            f"{warm['peak_total'] / mib:.0f} MiB | {warm['peak_single'] / mib:.0f} MiB |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write_docs:
        current = DOCS.read_text()
        if SECTION in current:
            head, _, rest = current.partition(SECTION)
            tail = rest.split("\n## ", 1)
            current = head.rstrip() + "\n\n" + text + ("\n## " + tail[1] if len(tail) > 1 else "")
        else:
            current = current.rstrip() + "\n\n" + text
        DOCS.write_text(current.rstrip() + "\n")


if __name__ == "__main__":
    main()
