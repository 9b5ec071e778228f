"""A user's mistake is said as one line, what was wrong and what to do, never as "a bug", and
before any work is done or committed (issue 11 items 8 and 9).

The commands run for real, in subprocesses, against the real PostgreSQL.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile

import pytest
from psycopg import sql

from shared.store import db
from tests.services import with_database

pytestmark = pytest.mark.integration

TRADE = {"symbol": "ABC", "price": "1.5", "quantity": "2", "timestamp": 1767225600000}


def run(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CANDLEKEEP_", "KAFKA_"))}
    base["CANDLEKEEP_METRICS_PORT"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "candlekeep", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 1, one ``Error:`` line holding ``words``, no traceback, not "a bug"."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in result.stderr and "bug" not in result.stderr, result.stderr
    assert "Aborted!" not in result.stderr
    return errors[0]


def jsonl(count: int) -> bytes:
    lines = (
        json.dumps({**TRADE, "trade_id": i, "timestamp": TRADE["timestamp"] + i * 7})
        for i in range(count)
    )
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def schemaless_database(database_url):
    """A database on the test server without the candlekeep schema."""
    import psycopg

    name = f"candlekeep_bare_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(database_url, name)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# -- outputs are checked before the work --------------------------------------------------------


def test_aggregate_to_a_missing_directory_fails_before_reading(tmp_path):
    trades = tmp_path / "ABC-trades.jsonl"
    trades.write_bytes(jsonl(10))
    out = tmp_path / "no" / "such" / "dir" / "candles.jsonl"
    result = run("aggregate", str(trades), "-o", str(out))
    assert_one_line_error(result, str(out.parent), "does not exist")
    assert "aggregated" not in result.stderr  # refused before the work, not after it


def test_report_to_a_missing_directory_fails_before_the_work(database_url, tmp_path):
    db.upgrade(database_url)
    out = tmp_path / "missing" / "report.html"
    result = run(
        "report",
        "--start",
        "2026-01-01T00:00Z",
        "--end",
        "2026-01-01T01:00Z",
        "-o",
        str(out),
        env={"DATABASE_URL": database_url},
    )
    assert_one_line_error(result, str(out.parent), "does not exist")


def test_reconcile_with_an_unwritable_report_dir_commits_nothing(database_url, tmp_path):
    db.upgrade(database_url)
    start, end = "2031-02-03T04:00:00+00:00", "2031-02-03T05:00:00+00:00"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run(
        "reconcile",
        "--start",
        start,
        "--end",
        end,
        env={"DATABASE_URL": database_url, "CANDLEKEEP_REPORT_DIR": str(blocker / "reports")},
    )
    assert_one_line_error(result, "CANDLEKEEP_REPORT_DIR", str(blocker))
    with db.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM dq_reports WHERE interval_start = %s", (start,)
        ).fetchone()[0]
    assert rows == 0  # the report's row is not committed when its page cannot be written


def test_reconcile_into_a_read_only_report_dir_commits_nothing(database_url):
    """The same as another user meets it: a directory they may not write (as root, the command
    runs as nobody, whom the permissions do bind)."""
    db.upgrade(database_url)
    start, end = "2031-02-03T06:00:00+00:00", "2031-02-03T07:00:00+00:00"
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o755)
        reports = os.path.join(scratch, "reports")
        os.mkdir(reports, 0o555)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        command = ["reconcile", "--start", start, "--end", end]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CANDLEKEEP_", "KAFKA_"))}
        result = subprocess.run(
            [
                *(as_nobody if os.geteuid() == 0 else []),
                sys.executable,
                "-m",
                "candlekeep",
                *command,
            ],
            env={**base, "DATABASE_URL": database_url, "CANDLEKEEP_REPORT_DIR": reports},
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
    assert_one_line_error(result, "CANDLEKEEP_REPORT_DIR", "permission denied")
    with db.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM dq_reports WHERE interval_start = %s", (start,)
        ).fetchone()[0]
    assert rows == 0


# -- a database without the schema -------------------------------------------------------------


@pytest.mark.parametrize("command", ["reconcile", "report"])
def test_reconcile_and_report_on_a_database_without_the_schema_say_to_upgrade(
    command, schemaless_database, tmp_path
):
    args = [command, "--start", "2026-01-01T00:00Z", "--end", "2026-01-01T01:00Z"]
    if command == "report":
        args += ["-o", str(tmp_path / "r.html")]
    result = run(
        *args, env={"DATABASE_URL": schemaless_database, "CANDLEKEEP_REPORT_DIR": str(tmp_path)}
    )
    assert_one_line_error(result, "no candlekeep schema", "candlekeep db upgrade")


# -- damaged compressed files ------------------------------------------------------------------


def damaged_files(tmp_path) -> dict[str, object]:
    data = gzip.compress(jsonl(50_000))
    truncated = tmp_path / "ABC-truncated.jsonl.gz"
    truncated.write_bytes(data[: len(data) // 2])
    not_gzip = tmp_path / "ABC-garbage.jsonl.gz"
    not_gzip.write_bytes(b"this was never gzip\n" * 10)
    not_zip = tmp_path / "ABC-trades-2026-01-01.zip"
    not_zip.write_bytes(b"PK\x03\x04 a zip cut short")
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("ABC-trades.jsonl", jsonl(2000))
    raw = bytearray(inner.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = b"\xff" * 16  # a corrupt member: its CRC check fails
    corrupt_zip = tmp_path / "ABC-corrupt.zip"
    corrupt_zip.write_bytes(bytes(raw))
    return {
        "truncated gzip": (truncated, "truncated"),
        "not gzip": (not_gzip, "damaged"),
        "not a zip": (not_zip, "damaged"),
        "corrupt zip member": (corrupt_zip, "damaged"),
    }


@pytest.mark.parametrize("workers", ["1", "2"])
def test_aggregate_names_a_damaged_compressed_file(tmp_path, workers):
    for name, (path, word) in damaged_files(tmp_path).items():
        result = run(
            "aggregate", str(path), "--workers", workers, "-o", str(tmp_path / "out.jsonl")
        )
        line = assert_one_line_error(result, str(path), word)
        assert "download" in line, (name, line)


def test_load_names_a_truncated_gzip(database_url, tmp_path):
    db.upgrade(database_url)
    path, word = damaged_files(tmp_path)["truncated gzip"]
    result = run("load", str(path), env={"DATABASE_URL": database_url})
    assert_one_line_error(result, str(path), word)


# -- times and empty settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("1767225600", "a number, not a time"),
        ("1767225600000", "a number, not a time"),
        ("2026-01-01T00:00+25:00", "UTC offset is not between"),
        ("2026-01-01T00:00", "without a UTC offset"),
        ("next tuesday", "not a valid ISO-8601 time"),
    ],
)
def test_a_time_that_is_not_iso_8601_is_said_with_the_accepted_forms(database_url, value, said):
    result = run(
        "reconcile",
        "--start",
        value,
        "--end",
        "2026-01-01T01:00Z",
        env={"DATABASE_URL": database_url},
    )
    line = assert_one_line_error(result, said, "2026-01-01T00:00Z")
    assert "isoformat" not in line and "timedelta" not in line  # not Python's own words


def test_feed_start_that_is_not_a_time_is_said_with_the_accepted_forms():
    result = run("feed", "synthetic", "--start", "2026-01-01T00:00+25:00", "--count", "1")
    line = assert_one_line_error(result, "UTC offset", "2026-01-01T00:00Z")
    assert "timedelta" not in line


@pytest.mark.parametrize("variable", ["DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"])
def test_an_empty_service_setting_is_a_mistake_not_the_embedded_server(variable, tmp_path):
    result = run(
        "db", "upgrade", env={variable: "", "CANDLEKEEP_DATA_DIR": str(tmp_path)}, cwd=tmp_path
    )
    assert_one_line_error(result, variable, "is empty", "unset it")
    assert not (tmp_path / "postgres").exists()  # no embedded server was started


# -- the worker's log is JSON, every line ------------------------------------------------------


@pytest.fixture
def scratch_database(schemaless_database):
    db.upgrade(schemaless_database)
    return schemaless_database


def json_lines(text: str) -> list[dict]:
    """Every non-empty line as a JSON object (fails on the first plain-text line)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_postgresql_warnings_reach_the_worker_log_as_json(scratch_database, kafka_bootstrap):
    """A server warning (here a trigger's ``RAISE WARNING``) is neither dropped nor a plain
    line among the JSON ones."""
    import psycopg

    from stream.feeds.synthetic import MarketDials, synthetic_messages
    from tests.streaming import produce_all, settings_env, stream_settings

    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION warn_disk() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE WARNING 'disk almost full'; RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE TRIGGER warn_disk AFTER INSERT OR UPDATE ON stream_progress"
            " FOR EACH STATEMENT EXECUTE FUNCTION warn_disk()"
        )
    settings = stream_settings()
    produce_all(kafka_bootstrap, settings.topic_trades, synthetic_messages(MarketDials(count=200)))
    result = subprocess.run(
        [sys.executable, "-m", "candlekeep", "stream", "--exit-when-idle", "1"],
        env=settings_env(settings, scratch_database, kafka_bootstrap),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = json_lines(result.stderr)
    warnings = [e for e in events if "disk almost full" in e["event"]]
    assert warnings and all(e["level"] == "warning" for e in warnings), result.stderr[-3000:]


def test_library_warnings_in_the_worker_log_are_json(scratch_database):
    """psycopg's own warnings (here: a server time zone Python does not know) are rendered
    like every other event, by the logging set-up ``candlekeep stream`` uses."""
    import psycopg

    name = scratch_database.rsplit("/", 1)[1]
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET timezone = 'XYZ-3'").format(sql.Identifier(name))
        )
    script = (
        "from candlekeep.logs import configure_logging; from shared.store import db;"
        f"configure_logging('INFO'); conn = db.connect({scratch_database!r});"
        "conn.execute('SELECT now()').fetchone()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    events = json_lines(result.stderr)
    assert [
        e["logger"] for e in events if "time zone" in e["event"] or "timezone" in e["event"]
    ] == ["psycopg"], result.stderr
