"""The services a command talks to: the real ones when configured, embedded ones otherwise.

An embedded server started here lives as long as the command (it is stopped on exit); its data
directory persists, so the next command finds the same data.
"""

from __future__ import annotations

import atexit

import click

from shared.config import Settings


def _settings(ctx: click.Context) -> Settings:
    root = ctx.find_root()
    return root.obj()


def database_url(ctx: click.Context) -> str:
    """``DATABASE_URL``, or the URL of the embedded PostgreSQL (started if needed)."""
    settings = _settings(ctx)
    if settings.database_url:
        return settings.database_url
    from candlekeep.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.data_dir)
    server.start()
    atexit.register(server.stop)
    return server.url


def bootstrap_servers(ctx: click.Context) -> str:
    """``KAFKA_BOOTSTRAP_SERVERS``, or the address of an embedded broker started for this run."""
    settings = _settings(ctx)
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    from candlekeep.embedded import EmbeddedBroker

    broker = EmbeddedBroker(settings.data_dir)
    broker.start()
    atexit.register(broker.stop)
    return broker.bootstrap_servers
