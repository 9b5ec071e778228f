"""``candlekeep demo``: the README's main command, on its own embedded services."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_the_whole_pipeline_and_explains_every_difference(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CANDLEKEEP_", "AIRFLOW", "DATABASE_URL", "KAFKA_"))
    }
    env["CANDLEKEEP_METRICS_PORT"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "candlekeep", "demo", "--hours", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    stream = re.search(r"stream: ([\d,]+) messages consumed of ([\d,]+) produced", proc.stderr)
    assert stream and stream.group(1) == stream.group(2) != "0"
    assert "DAG run 2026-01-01T00:00Z: success" in proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "2026-01-01 00:00" in line)
    cells = [c.strip() for c in row.strip("│ \n").split("│")]
    status, match, late, repaired, _missing_in_stream, missing_batch, unexplained = cells[1:8]
    verified, gap, mismatch, unverified, gaps_repaired = cells[8:13]
    assert status in ("pass", "warn")
    assert int(late) > 0 and int(match) > 0
    assert (missing_batch, unexplained) == ("0", "0")
    # The six trades the feed lost: one gap, repaired from the demo's venue (its 1m, 5m, 15m and
    # 1h candles now differ from the stream's, explained); every candle the venue can vouch for
    # is verified, none left short or contradicted.
    assert gaps_repaired == "1/6" and repaired == "4"
    assert int(verified) > 0 and (gap, mismatch) == ("0", "0")
    report = re.search(r"report: (\S+\.html)", proc.stdout).group(1)
    assert os.path.exists(report)
    assert (tmp_path / ".candlekeep" / "postgres").is_dir()  # the embedded server's data
    # Finality: the view's statuses (every late window corrected, nothing provisional left),
    # and a correction as a consumer of the candles topic received it.
    statuses = dict(
        (name, int(n))
        for name, n in re.findall(
            r"(\w+) (\d+)", re.search(r"candles \(view\): (.*)", proc.stdout).group(1)
        )
    )
    assert statuses["verified"] == int(verified)
    assert statuses["certified"] + statuses["corrected"] == int(unverified)
    assert statuses["provisional"] == 0 == statuses["disputed"]
    correction = re.search(
        r"candles topic: (\S+) revision (\d+) \(stream\) → revision (\d+) \(batch correction\)",
        proc.stdout,
    )
    assert correction and int(correction.group(3)) > int(correction.group(2))
