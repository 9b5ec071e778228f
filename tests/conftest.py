"""Shared fixtures and hypothesis settings."""

from __future__ import annotations

import os
from pathlib import Path

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
