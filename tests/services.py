"""Session fixtures for the real services integration tests need: PostgreSQL and a Kafka broker.

``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS`` select real servers (CI); without them the
embedded ones run, with their data under ``<repo>/.candlekeep/test`` so that tests never touch
the developer's own ``.candlekeep``. Each session works in a database of its own, created for it
and dropped at the end, so sessions (and xdist workers) never see each other's rows.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from candlekeep.embedded import resolve_bootstrap_servers, resolve_database_url
from shared.config import Settings
from shared.store.db import redact

TEST_DATA_DIR = Path(__file__).resolve().parent.parent / ".candlekeep" / "test"


def service_settings() -> Settings:
    """The environment's settings, with embedded services kept under ``TEST_DATA_DIR``."""
    return Settings(data_dir=str(TEST_DATA_DIR))


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The ``postgresql://`` URL (libpq spelling, even if ``DATABASE_URL`` names a SQLAlchemy
    driver) of a fresh, empty database, dropped when the session ends."""
    server_url, server = resolve_database_url(service_settings())
    server_url = re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", server_url)
    try:
        name = f"candlekeep_test_{uuid.uuid4().hex[:12]}"
        _admin(server_url, "CREATE DATABASE {}", name)
        try:
            yield with_database(server_url, name)
        finally:
            _admin(server_url, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)
    finally:
        if server is not None:
            server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a Kafka-protocol broker; the embedded one lives as long as the session.

    Topics are never deleted (the embedded broker forgets them when it stops): tests use
    unique topic and consumer group names.
    """
    servers, broker = resolve_bootstrap_servers(service_settings())
    try:
        yield servers
    finally:
        if broker is not None:
            broker.stop()


def _admin(url: str, statement: str, database: str) -> None:
    import psycopg
    from psycopg import sql

    query = sql.SQL(statement).format(sql.Identifier(database))
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(query)
    except psycopg.Error as exc:
        raise RuntimeError(f"{query.as_string()} on {redact(url)} failed: {exc}") from exc
