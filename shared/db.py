"""Connecting to PostgreSQL and migrating the schema, with errors a person can act on."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from shared.errors import CandlekeepError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class DatabaseError(CandlekeepError):
    """PostgreSQL is missing, unreachable or not migrated; the message says what to do."""


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe to put in an error message or a log.

    Handles ``scheme://user:password@host``, ``password=`` in a query string and libpq
    ``key=value`` strings.
    """
    text = re.sub(r"(password=)[^&\s]*", r"\1***", url, flags=re.IGNORECASE)
    parts = urlsplit(text)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not (parts.scheme and at and colon):
        return text
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def sqlalchemy_url(url: str) -> str:
    """The same database as a SQLAlchemy URL using psycopg 3."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise DatabaseError(f"DATABASE_URL {redact(url)!r} is not a postgresql:// URL")


def libpq_url(url: str) -> str:
    """The same database as a libpq URL (what psycopg takes)."""
    if url.startswith("postgresql+psycopg://"):
        return "postgresql://" + url[len("postgresql+psycopg://") :]
    if not url.startswith(("postgresql://", "postgres://")):
        raise DatabaseError(f"DATABASE_URL {redact(url)!r} is not a postgresql:// URL")
    return url


def connect(url: str, *, autocommit: bool = False, connect_timeout: int = 10) -> psycopg.Connection:
    """A psycopg connection, or a :class:`DatabaseError` naming the URL and what to do."""
    try:
        return psycopg.connect(
            libpq_url(url), autocommit=autocommit, connect_timeout=connect_timeout
        )
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {redact(url)}: {reason}. Check that the server is "
            "running and that DATABASE_URL is right, or unset DATABASE_URL to use the embedded "
            "PostgreSQL"
        ) from None


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> str | None:
    """Create or migrate the schema; returns the revision the database is at afterwards."""
    from alembic import command

    connect(url).close()  # fail early with the clear message
    command.upgrade(alembic_config(url), revision)
    return current_revision(url)


def current_revision(url: str) -> str | None:
    with connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]
        if not exists:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql://x/y")).get_current_head()


def require_schema(conn: psycopg.Connection, url: str) -> None:
    """Fail clearly when the schema is missing or behind the code."""
    exists = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone() if exists else None
    if not conn.autocommit:
        conn.rollback()  # leave the connection idle, as we found it
    head = head_revision()
    if row is None:
        raise DatabaseError(
            f"the database at {redact(url)} has no candlekeep schema: run `candlekeep db upgrade`"
        )
    if row[0] != head:
        raise DatabaseError(
            f"the database at {redact(url)} is at schema revision {row[0]}, this candlekeep "
            f"needs {head}: run `candlekeep db upgrade`"
        )
