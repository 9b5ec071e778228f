"""The tables of finality (SPEC §6.2, migration 0009), in ``schema.metadata``.

- ``reconciled_periods``: each period a batch run recomputed, from the moment its recomputation
  starts: a trade stored for it from then on makes it stale (``shared.store.stale_periods``).
- ``stale_periods``: reconciled periods that trades were stored for afterwards, until the DAG
  reconciles them again.
- ``candle_corrections``: the outbox of corrections, the batch candles that differ from the
  stream's, with the revision they go out with on the ``candles`` topic (``published_at`` NULL
  until the broker acknowledged them).

The view ``candles`` is made by the migration (a view is not a table of the declared schema).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)

from shared.store.schema import _ts, metadata

reconciled_periods = Table(
    "reconciled_periods",
    metadata,
    _ts("period_start"),
    _ts("period_end"),
    # When the period's last recomputation started: marks older than this are cleared by it.
    _ts("recomputed_at", server_default=func.now()),
    PrimaryKeyConstraint("period_start", "period_end", name="reconciled_periods_pkey"),
    Index("reconciled_periods_end_idx", "period_end"),
)

stale_periods = Table(
    "stale_periods",
    metadata,
    _ts("start"),
    _ts("end"),
    # The last time trades were stored for the period after it was reconciled, and how many.
    _ts("marked_at", server_default=func.now()),
    Column("trades", BigInteger, nullable=False),
    PrimaryKeyConstraint("start", "end", name="stale_periods_pkey"),
)

candle_corrections = Table(
    "candle_corrections",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("interval", Text, nullable=False),
    _ts("window_start"),
    # Above every revision the stream sent for the key, and above the last correction's.
    Column("revision", Integer, nullable=False),
    # The corrected candle's fields, hashed: a rerun that computes the same candle adds nothing.
    Column("digest", Text, nullable=False),
    _ts("corrected_at", server_default=func.now()),
    _ts("published_at", nullable=True),
    PrimaryKeyConstraint(
        "exchange", "symbol", "interval", "window_start", name="candle_corrections_pkey"
    ),
    Index(
        "candle_corrections_pending_idx",
        "corrected_at",
        postgresql_where=text("published_at IS NULL"),
    ),
)
