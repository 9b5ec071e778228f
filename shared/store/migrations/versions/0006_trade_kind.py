"""Trade kinds (SPEC §2): ``trades.kind`` and the kinds of both copies in ``trade_conflicts``.

A venue's trades that are not order-book trades (Binance USD-M's insurance-fund and ADL trades)
are stored like any other, with their kind, and left out of every candle, as the venue's own
klines leave them out. Existing rows are market trades. A copy whose kind differs from the
stored first copy's is a conflicting duplicate, so the kinds join ``trade_conflicts``' key.

Adding a column with a constant default is quick on any size of table (no rewrite).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE trades ADD COLUMN kind text NOT NULL DEFAULT 'market'")
    op.execute("ALTER TABLE trade_conflicts ADD COLUMN first_kind text")
    op.execute("ALTER TABLE trade_conflicts ADD COLUMN kind text")
    op.execute("ALTER TABLE trade_conflicts DROP CONSTRAINT trade_conflicts_copy_key")
    op.execute("""
        ALTER TABLE trade_conflicts ADD CONSTRAINT trade_conflicts_copy_key
        UNIQUE NULLS NOT DISTINCT
            (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker, kind)
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE trade_conflicts DROP CONSTRAINT trade_conflicts_copy_key")
    op.execute("DELETE FROM trade_conflicts WHERE kind IS DISTINCT FROM first_kind")
    op.execute("""
        DELETE FROM trade_conflicts c USING trade_conflicts d
        WHERE c.id > d.id AND (c.exchange, c.symbol, c.trade_id, c.ts, c.price, c.quantity)
              = (d.exchange, d.symbol, d.trade_id, d.ts, d.price, d.quantity)
          AND c.is_buyer_maker IS NOT DISTINCT FROM d.is_buyer_maker
    """)
    op.execute("""
        ALTER TABLE trade_conflicts ADD CONSTRAINT trade_conflicts_copy_key
        UNIQUE NULLS NOT DISTINCT
            (exchange, symbol, trade_id, ts, price, quantity, is_buyer_maker)
    """)
    op.execute("ALTER TABLE trade_conflicts DROP COLUMN kind")
    op.execute("ALTER TABLE trade_conflicts DROP COLUMN first_kind")
    op.execute("ALTER TABLE trades DROP COLUMN kind")
