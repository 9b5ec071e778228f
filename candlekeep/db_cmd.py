"""``candlekeep db``: the schema is created and upgraded by migrations, never by hand."""

from __future__ import annotations

import click


@click.group("db")
def db_group() -> None:
    """Manage the PostgreSQL schema."""


@db_group.command()
@click.pass_context
def upgrade(ctx) -> None:
    """Create or migrate the schema to the latest revision."""
    from candlekeep.services import database_url
    from shared.store import db

    url = database_url(ctx)
    before = db.current_revision(url)
    after = db.upgrade(url)
    if before == after:
        click.echo(f"schema already at revision {after} ({db.redact(url)})")
    else:
        click.echo(f"schema upgraded from {before or 'nothing'} to {after} ({db.redact(url)})")
