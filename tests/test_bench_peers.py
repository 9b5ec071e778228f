"""bench/peers.py, the side-by-side benchmark: a smoke run prints the table only after every
compared candle was checked against the core, and the check refuses a candle that differs."""

from __future__ import annotations

import re
import subprocess
import sys
from decimal import Decimal

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from peer_model import Reference, compare


def _reference() -> Reference:
    values = (Decimal("10.5"), Decimal("11"), Decimal("10"), Decimal("10.75"), Decimal("3"))
    values += (Decimal("32.25"), 2, 7, 8, Decimal("1"), Decimal("10.5"))
    ref = Reference(messages=2)
    ref.candlekeep[("BTCUSDT", "1m", 60_000_000)] = values
    ref.candlekeep[("BTCUSDT", "5m", 0)] = values
    ref.independent = dict(ref.candlekeep)
    ref.independent[("BTCUSDT", "5m", 0)] = (*values[:6], 3, *values[7:])
    return ref


def test_the_check_takes_equal_decimals_and_refuses_any_other_difference():
    ref = _reference()
    stored = dict(ref.candlekeep)
    # PostgreSQL's NUMERIC comes back with its own scale: 10.50 is 10.5.
    one_minute = ("BTCUSDT", "1m", 60_000_000)
    stored[one_minute] = (Decimal("10.50"), *stored[one_minute][1:])
    assert compare(stored, ref, "1m,5m", "candlekeep") == (1, 1)

    closed_elsewhere = dict(stored)
    closed_elsewhere[one_minute] = (
        *stored[one_minute][:3],
        Decimal("10.76"),
        *stored[one_minute][4:],
    )
    with pytest.raises(AssertionError, match="expected"):
        compare(closed_elsewhere, ref, "1m", "candlekeep")
    with pytest.raises(AssertionError, match="missing"):
        compare({}, ref, "1m", "candlekeep")
    # Quix's 5m window also counts a trade late for 1m: checked against that meaning.
    with pytest.raises(AssertionError, match="5m"):
        compare(stored, ref, "1m,5m", "independent")


@pytest.mark.integration
@pytest.mark.bench
def test_quick_run_prints_the_table_after_checking_the_candles(tmp_path):
    """``--quick`` with the bare loop and candlekeep's worker (no optional dependency needed):
    the embedded broker and PostgreSQL, the topic, the check, the table."""
    run = subprocess.run(
        [
            *(sys.executable, str(REPO / "bench" / "peers.py"), "--quick"),
            *("--only", "stream", "--systems", "bare", "candlekeep-1m"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "every candle equal to the last digit to\ncandlekeep's core" in out
    checked = re.search(r"^- candlekeep stream, 1m: ([\d,]+) 1m candles$", out, re.M)
    assert checked and int(checked.group(1).replace(",", "")) > 100
    row = re.search(r"^\| candlekeep stream, 1m \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)
    assert row, out[-3000:]
    assert int(row.group(1).replace(",", "")) > 1000
    assert float(row.group(3)) > 0  # PostgreSQL did work for it
    assert re.search(r"^\| bare aiokafka loop \| [\d,]+ \| [\d.]+ \| – \|", out, re.M)
    assert "worker + PostgreSQL CPU µs a message" in out
    # --quick writes no docs.
    assert "wrote docs/benchmarks.md" not in out
