"""Finality (SPEC §6.2): the view ``candles``, ``stale_periods``, ``reconciled_periods`` and the
corrections' outbox ``candle_corrections``.

- ``reconciled_periods``: every period a batch run has recomputed, written when its
  recomputation starts (before it reads ``trades``), so that a trade stored from then on for the
  period marks it stale.
- ``stale_periods``: a reconciled period that trades were stored for afterwards (the stream's
  late trades, ``load``, a repair): when it was marked, how many trades; the DAG reconciles it
  again and clears the row.
- ``candle_corrections``: the batch candles that differ from the stream's, to be (or already)
  published on the ``candles`` topic with a higher revision; ``published_at`` is NULL until the
  broker has acknowledged it (a transactional outbox: at least once, once per change).
- ``candles``: one row per candle key, the best candle known and its ``status``. A view over
  the candle tables' primary keys (docs/storage.md has the choice and its EXPLAIN).

The view reads ``candle_verifications`` (the check against the venue, migration 0008).

New tables and a view: quick on any size of database.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


#: SPEC §3's candle fields, as of this migration (a view's columns are fixed when it is made).
_FIELDS = (
    "open", "high", "low", "close", "volume", "quote_volume", "trade_count", "first_trade_id",
    "last_trade_id", "taker_buy_volume", "taker_buy_quote_volume",
)  # fmt: skip
_KEY = ("exchange", "symbol", "interval", "window_start")


def _on(a: str, b: str) -> str:
    return " AND ".join(f"{a}.{k} = {b}.{k}" for k in _KEY)


#: One branch per candle table that can hold a key's best candle, so that a query's conditions
#: on the key reach each table's primary key (a FULL JOIN or a UNION of keys would hide them):
#: every stream candle, with the batch candle if there is one; then the batch candles that have
#: no stream candle. ``disputed`` comes first: a difference that means a bug or lost data
#: (``unexplained``; ``missing_in_batch``, a stream candle with no stored trade behind it;
#: ``exchange_mismatch``) is never hidden behind a verdict of the venue or a match.
_BEST = "CASE WHEN b.exchange IS NULL THEN s.{0} ELSE b.{0} END AS {0}"
CANDLES_VIEW = f"""
CREATE VIEW candles AS
SELECT s.exchange, s.symbol, s.interval, s.window_start, s.window_end,
       {", ".join(_BEST.format(f) for f in _FIELDS)},
       CASE
           WHEN m.kind IN ('unexplained', 'missing_in_batch')
                OR v.verdict = 'exchange_mismatch' THEN 'disputed'
           WHEN b.exchange IS NULL THEN 'provisional'
           WHEN v.verdict = 'verified' THEN 'verified'
           WHEN {" AND ".join(f"b.{f} IS NOT DISTINCT FROM s.{f}" for f in _FIELDS)}
               THEN 'certified'
           ELSE 'corrected'
       END AS status,
       CASE WHEN b.exchange IS NULL THEN 'stream' ELSE 'batch' END AS source,
       EXISTS (SELECT 1 FROM stale_periods p
               WHERE s.window_start >= p."start" AND s.window_start < p."end") AS stale
FROM stream_candles s
LEFT JOIN batch_candles b ON {_on("b", "s")}
LEFT JOIN candle_mismatches m ON {_on("m", "s")}
LEFT JOIN candle_verifications v ON {_on("v", "s")}
UNION ALL
SELECT b.exchange, b.symbol, b.interval, b.window_start, b.window_end,
       {", ".join(f"b.{f}" for f in _FIELDS)},
       CASE
           WHEN m.kind = 'unexplained' OR v.verdict = 'exchange_mismatch' THEN 'disputed'
           WHEN v.verdict = 'verified' THEN 'verified'
           ELSE 'corrected'
       END,
       'batch',
       EXISTS (SELECT 1 FROM stale_periods p
               WHERE b.window_start >= p."start" AND b.window_start < p."end")
FROM batch_candles b
LEFT JOIN candle_mismatches m ON {_on("m", "b")}
LEFT JOIN candle_verifications v ON {_on("v", "b")}
WHERE NOT EXISTS (SELECT 1 FROM stream_candles s WHERE {_on("s", "b")})
"""


def upgrade() -> None:
    op.execute("""
        CREATE TABLE reconciled_periods (
            period_start timestamptz NOT NULL,
            period_end timestamptz NOT NULL,
            recomputed_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT reconciled_periods_pkey PRIMARY KEY (period_start, period_end)
        )
    """)
    op.execute("CREATE INDEX reconciled_periods_end_idx ON reconciled_periods (period_end)")
    op.execute("""
        CREATE TABLE stale_periods (
            "start" timestamptz NOT NULL,
            "end" timestamptz NOT NULL,
            marked_at timestamptz NOT NULL DEFAULT now(),
            trades bigint NOT NULL,
            CONSTRAINT stale_periods_pkey PRIMARY KEY ("start", "end")
        )
    """)
    op.execute("""
        CREATE TABLE candle_corrections (
            exchange text NOT NULL,
            symbol text NOT NULL,
            interval text NOT NULL,
            window_start timestamptz NOT NULL,
            revision integer NOT NULL,
            digest text NOT NULL,
            corrected_at timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz,
            CONSTRAINT candle_corrections_pkey
                PRIMARY KEY (exchange, symbol, interval, window_start)
        )
    """)
    op.execute(
        "CREATE INDEX candle_corrections_pending_idx ON candle_corrections (corrected_at)"
        " WHERE published_at IS NULL"
    )
    op.execute(CANDLES_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW candles")
    op.execute("DROP TABLE candle_corrections")
    op.execute("DROP TABLE stale_periods")
    op.execute("DROP TABLE reconciled_periods")
