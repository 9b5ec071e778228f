"""Connecting to PostgreSQL and migrating the schema, with errors a person can act on."""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from shared.errors import CandlekeepError
from shared.store.redaction import redact, remember, url_password

__all__ = ["redact"]  # re-exported: callers import it from here

#: PostgreSQL's notices (``RAISE WARNING``, server warnings), which psycopg drops unless a
#: connection has a handler: logged, so the worker's JSON log shows them like any event.
notices = logging.getLogger("candlekeep.postgresql")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class DatabaseError(CandlekeepError):
    """PostgreSQL is missing, unreachable or not migrated; the message says what to do."""


def sqlalchemy_url(url: str) -> str:
    """The same database as a SQLAlchemy URL using psycopg 3."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise DatabaseError(f"DATABASE_URL {redact(url)!r} is not a postgresql:// URL")


def libpq_url(url: str) -> str:
    """The same database as a libpq URL (what psycopg takes), checked the way libpq reads it."""
    if url.startswith("postgresql+psycopg://"):
        url = "postgresql://" + url[len("postgresql+psycopg://") :]
    if not url.startswith(("postgresql://", "postgres://")):
        raise DatabaseError(f"DATABASE_URL {redact(url)!r} is not a postgresql:// URL")
    remember(url)
    written = url_password(url)
    try:
        parsed = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        if written is None:
            raise DatabaseError(
                f"DATABASE_URL {redact(url)!r} is not a URL libpq can read: {redact(str(exc))}"
            ) from None
        parsed = {}  # libpq's message quotes the URL from where it got lost: not shown
    if written is not None and "password=" not in url and parsed.get("password") != written:
        # libpq ends the password at a raw "/" (and the user name at the first "@"): it would
        # connect as someone else, or to a "host" made of the password's pieces.
        raise DatabaseError(
            "DATABASE_URL's password holds characters a URL must percent-encode (libpq reads "
            f"{redact(url)!r} differently from how it is written): encode them, e.g. / as "
            "%2F, @ as %40, : as %3A, % as %25"
        )
    return url


def connect(url: str, *, autocommit: bool = False, connect_timeout: int = 10) -> psycopg.Connection:
    """A psycopg connection, or a :class:`DatabaseError` naming the URL and what to do."""
    try:
        conn = psycopg.connect(
            libpq_url(url), autocommit=autocommit, connect_timeout=connect_timeout
        )
    except psycopg.OperationalError as exc:
        reason = redact(" ".join(str(exc).split())) or type(exc).__name__
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {redact(url)}: {reason}. Check that the server is "
            "running and that DATABASE_URL is right, or unset DATABASE_URL to use the embedded "
            "PostgreSQL"
        ) from None
    conn.add_notice_handler(_log_notice)
    return conn


def _log_notice(diagnostic: psycopg.errors.Diagnostic) -> None:
    severity = (diagnostic.severity_nonlocalized or diagnostic.severity or "NOTICE").upper()
    level = logging.WARNING if severity == "WARNING" else logging.INFO
    notices.log(
        level, "postgresql %s: %s", severity.lower(), redact(diagnostic.message_primary or "")
    )


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
