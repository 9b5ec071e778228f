"""Passwords never reach output (issue 11 item 5): every spelling libpq accepts is masked, in
the commands' messages, the worker's logs at every level and psycopg's errors.

The real commands run against the real PostgreSQL (its trust authentication takes any password,
so a URL with an awkward one still connects) and the real broker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import quote

import pytest

from shared.store import db
from shared.store.redaction import remember
from stream.feeds.synthetic import MarketDials, synthetic_messages
from tests.streaming import produce_all, settings_env, stream_settings

pytestmark = pytest.mark.integration

#: Distinct pieces, so that a password cut at a special character is still caught.
PIECES = ("Sw0rd", "Fi5h", "Ke7", "Pl4in")
PASSWORD = "Sw0rd#Fi5h?Ke7/Pl4in"


def with_password(url: str, password: str, *, encode_slash: bool = True) -> str:
    """``url`` (``postgresql://user@host…``) with ``password`` written raw, as users do; only
    ``/`` is percent-encoded (libpq ends the password at a raw one)."""
    written = password.replace("/", "%2F") if encode_slash else password
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{written}@{host}"


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "candlekeep", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CANDLEKEEP_", "KAFKA_"))}
    env["CANDLEKEEP_METRICS_PORT"] = "0"
    return env


def assert_hidden(text: str) -> None:
    for piece in PIECES:
        assert piece not in text, text
    assert quote(PASSWORD, safe="") not in text


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@db:5432/x",  # raw # ? / (urlsplit stops at the first)
        f"postgres://app:{PASSWORD}@db/x",
        f"postgresql+psycopg://app:{PASSWORD}@db/x?sslmode=require",
        "host=db user=app password='Sw0rd Fi5h\\' Ke7' dbname=x",  # quoted key=value
        'connection to "postgresql://app:Sw0rd#Fi5h?Ke7@db/x" failed',  # inside a message
    ],
)
def test_every_spelling_of_a_password_is_masked(url):
    """(Percent-encoded passwords, raw ``@`` and ``?password=`` are in test_embedded_services.)"""
    shown = db.redact(url)
    assert_hidden(shown)
    assert "***" in shown


def test_a_configured_password_is_masked_wherever_it_appears():
    """psycopg's errors can echo a piece of the conninfo in their own words."""
    remember("host=db user=app password=Pl4inFi5h dbname=x")
    shown = db.redact('FATAL: password authentication failed ("Pl4inFi5h")')
    assert "Pl4inFi5h" not in shown


def test_commands_never_print_the_password(database_url, kafka_bootstrap, tmp_path):
    env = base_env()
    url = with_password(database_url, PASSWORD)

    upgraded = run("db", "upgrade", env={**env, "DATABASE_URL": url})
    assert upgraded.returncode == 0, upgraded.stderr
    assert "postgres:***@" in upgraded.stdout  # says where, without the password
    assert_hidden(upgraded.stdout + upgraded.stderr)

    missing = url.rsplit("/", 1)[0] + "/no_such_database_for_candlekeep"
    failed = run("stream", "--exit-when-idle", "1", env={**env, "DATABASE_URL": missing})
    assert failed.returncode == 1
    assert "no_such_database_for_candlekeep" in failed.stderr and "Traceback" not in failed.stderr
    assert_hidden(failed.stdout + failed.stderr)

    settings = stream_settings()
    produce_all(kafka_bootstrap, settings.topic_trades, synthetic_messages(MarketDials(count=50)))
    worker_env = settings_env(settings, url, kafka_bootstrap)
    worker_env["CANDLEKEEP_LOG_LEVEL"] = "DEBUG"
    worker = run("stream", "--exit-when-idle", "1", env=worker_env)
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert '"event": "worker started"' in worker.stderr
    assert_hidden(worker.stdout + worker.stderr)

    reconciled = run(
        "reconcile",
        "--start",
        "2026-01-01T00:00Z",
        "--end",
        "2026-01-01T01:00Z",
        env={**env, "DATABASE_URL": url, "CANDLEKEEP_REPORT_DIR": str(tmp_path)},
    )
    assert reconciled.returncode in (0, 3), reconciled.stderr
    assert_hidden(reconciled.stdout + reconciled.stderr)


def test_a_password_libpq_would_misread_is_refused_without_showing_it(database_url):
    """A raw ``/`` ends the password for libpq, which would take its pieces for a host and
    port (and print them in its error)."""
    url = with_password(database_url, PASSWORD, encode_slash=False)
    failed = run("db", "upgrade", env={**base_env(), "DATABASE_URL": url})
    assert failed.returncode == 1
    assert "percent-encode" in failed.stderr and "%2F" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert_hidden(failed.stdout + failed.stderr)


def test_a_key_value_conninfo_is_refused_without_showing_its_password():
    env = {**base_env(), "DATABASE_URL": "host=127.0.0.1 user=app password='Sw0rd Fi5h' dbname=x"}
    failed = run("db", "upgrade", env=env)
    assert failed.returncode == 1
    assert "postgresql://" in failed.stderr
    assert_hidden(failed.stdout + failed.stderr)
