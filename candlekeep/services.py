"""The services a command talks to: the real ones when configured, embedded ones otherwise.

An embedded server started here lives as long as the command (``start()`` registers its stop
at exit); its data directory persists, so the next command finds the same data.
"""

from __future__ import annotations

import click

from shared.config import Settings


def _settings(ctx: click.Context) -> Settings:
    return ctx.find_root().obj()


def database_url(ctx: click.Context) -> str:
    """``DATABASE_URL``, or the URL of the embedded PostgreSQL (started if needed)."""
    from candlekeep.embedded import resolve_database_url

    return resolve_database_url(_settings(ctx))[0]


def bootstrap_servers(ctx: click.Context) -> str:
    """``KAFKA_BOOTSTRAP_SERVERS``, or the address of an embedded broker started for this run."""
    from candlekeep.embedded import resolve_bootstrap_servers

    return resolve_bootstrap_servers(_settings(ctx))[0]
