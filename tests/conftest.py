"""Shared fixtures and hypothesis settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Session fixtures for integration tests: a fresh PostgreSQL database and a Kafka broker.
from .services import database_url, kafka_bootstrap  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "data" / "binance-xrpeth-2019-10"

settings.register_profile(
    "default", deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=1500, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _forget_passwords_remembered_by_the_test():
    """Passwords a test's settings remember are masked for the rest of the process (that is the
    point); between tests that would leak: a compose file's password ``candlekeep`` masks every
    later ``candlekeep_test_…`` database name. Each test starts with what the session had."""
    from shared.store import redaction

    saved = set(redaction._secrets)
    yield
    redaction._secrets.clear()
    redaction._secrets.update(saved)


@pytest.fixture(autouse=True)
def _no_venue_checks_unless_asked(monkeypatch):
    """The check against the venue (SPEC §6.1) is on by default and asks the real venues; a
    test's trades are its own (synthetic ids under the name ``binance``), so the venues would
    only contradict them, or be unreachable. Tests of the check turn it on, with the venues'
    URLs pointing at the replay server of recorded responses (tests/test_verify.py)."""
    monkeypatch.setenv("CANDLEKEEP_VENUE_CHECKS", "false")
