"""Order the primary key of trades by time: ``(exchange, symbol, ts, trade_id)``.

The same columns, so the same uniqueness (first copy wins, loading twice adds nothing), in the
order in which the recomputation looks trades up: the open and the close of a window are the
first and the last entry of the key at or after ``(exchange, symbol, window_start)``, one index
probe each instead of a comparison of ``(ts, trade_id, price)`` arrays on every row
(docs/storage.md). Writers still append at a symbol's rightmost leaf, since ``ts`` grows.

Rebuilding the key rewrites each partition's index: on a large table, run it in a quiet hour.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE trades DROP CONSTRAINT trades_pkey")
    op.execute(
        "ALTER TABLE trades ADD CONSTRAINT trades_pkey PRIMARY KEY (exchange, symbol, ts, trade_id)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE trades DROP CONSTRAINT trades_pkey")
    op.execute(
        "ALTER TABLE trades ADD CONSTRAINT trades_pkey PRIMARY KEY (exchange, symbol, trade_id, ts)"
    )
