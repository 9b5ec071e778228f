"""Alembic environment: runs the migrations on the connection ``candlekeep db upgrade`` passes."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from shared.store.schema import include_in_migrations, metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=metadata, include_name=include_in_migrations
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        context.configure(
            connection=conn, target_metadata=metadata, include_name=include_in_migrations
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
