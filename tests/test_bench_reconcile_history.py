"""bench/reconcile_history.py: a smoke run on the tests' PostgreSQL prints the table only after
both databases gave the same report (the hole of 7 ids found, the silent symbol named)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.store import db

from .conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.bench]

TRADES, HOURS = 20_000, 2


def test_a_small_run_compares_the_same_report_in_both_histories(database_url):
    server = database_url.rsplit("/", 1)[0] + "/postgres"
    names = [
        f"candlekeep_bench_history_{label}_{TRADES}_{hours}"
        for label, hours in (("short", 1), ("long", HOURS))
    ]
    try:
        run = subprocess.run(
            [
                *(sys.executable, str(REPO / "bench" / "reconcile_history.py")),
                *("--trades", str(TRADES), "--hours-before", str(HOURS), "--rounds", "1"),
                "--no-write-docs",
            ],
            env={**os.environ, "DATABASE_URL": database_url},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        out = run.stdout
        assert "| checks |" in out and "| total |" in out
        assert "Both reports alike" in out and "7 trades missing in open gaps" in out
        assert "silent QUIET" in out
        assert "reads within 10% (+100 blocks)" in out
    finally:
        with db.connect(server, autocommit=True) as conn:
            for name in names:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
