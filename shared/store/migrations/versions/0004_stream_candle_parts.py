"""Per-partition parts of the stream's candles: ``stream_candle_parts`` (SPEC §4).

A symbol's trades may arrive on several partitions (a producer's key casing, partitions added to
the topic); each partition folds its own part of a window under its own watermark. The parts are
kept here, one row per candle key and (topic, partition), with the timestamps of their first and
last trade so that they merge exactly; ``stream_candles`` holds the merge of each key's parts.

Existing ``stream_candles`` rows become parts: a row whose window a partition still holds in its
window state (``stream_progress.window_state``, emitted and still open to late updates under
``allowed_lateness``) becomes that partition's part, so its next update replaces it rather than
adding to it; every other row (final: no partition will write it again) becomes the part of
partition -1 with an empty topic, "written before 0004, partition unknown". The open and close
timestamps come from the stored trades (the window's first and last trade ids); where those
trades are gone, the window's bounds stand in.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-30
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE stream_candle_parts (
            exchange text NOT NULL,
            symbol text NOT NULL,
            interval text NOT NULL,
            window_start timestamptz NOT NULL,
            topic text NOT NULL,
            partition integer NOT NULL,
            window_end timestamptz NOT NULL,
            open numeric NOT NULL,
            high numeric NOT NULL,
            low numeric NOT NULL,
            close numeric NOT NULL,
            volume numeric NOT NULL,
            quote_volume numeric NOT NULL,
            trade_count bigint NOT NULL,
            first_trade_id bigint NOT NULL,
            last_trade_id bigint NOT NULL,
            taker_buy_volume numeric,
            taker_buy_quote_volume numeric,
            open_ts timestamptz NOT NULL,
            close_ts timestamptz NOT NULL,
            revision integer NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT stream_candle_parts_pkey
                PRIMARY KEY (exchange, symbol, interval, window_start, topic, partition)
        )
    """)
    op.execute("""
        INSERT INTO stream_candle_parts (
            exchange, symbol, interval, window_start, topic, partition, window_end, open, high,
            low, close, volume, quote_volume, trade_count, first_trade_id, last_trade_id,
            taker_buy_volume, taker_buy_quote_volume, open_ts, close_ts, revision)
        WITH held AS (
            SELECT DISTINCT ON (1, 2, 3, 4)
                   s->>'exchange' AS exchange, s->>'symbol' AS symbol, w->>'interval' AS interval,
                   timestamptz 'epoch'
                       + (w->>'window_start_us')::bigint * interval '1 microsecond'
                       AS window_start,
                   p.topic, p.partition
            FROM stream_progress AS p
            CROSS JOIN LATERAL jsonb_array_elements(p.window_state->'symbols') AS s
            CROSS JOIN LATERAL jsonb_array_elements((s->'bases') || (s->'larger')) AS w
            WHERE (w->>'revision')::int >= 0
            ORDER BY 1, 2, 3, 4, p.partition
        )
        SELECT c.exchange, c.symbol, c.interval, c.window_start,
               coalesce(h.topic, ''), coalesce(h.partition, -1), c.window_end, c.open, c.high,
               c.low, c.close, c.volume, c.quote_volume, c.trade_count, c.first_trade_id,
               c.last_trade_id, c.taker_buy_volume, c.taker_buy_quote_volume,
               coalesce(
                   (SELECT min(t.ts) FROM trades AS t
                    WHERE t.exchange = c.exchange AND t.symbol = c.symbol
                      AND t.ts >= c.window_start AND t.ts < c.window_end
                      AND t.trade_id = c.first_trade_id),
                   c.window_start),
               coalesce(
                   (SELECT max(t.ts) FROM trades AS t
                    WHERE t.exchange = c.exchange AND t.symbol = c.symbol
                      AND t.ts >= c.window_start AND t.ts < c.window_end
                      AND t.trade_id = c.last_trade_id),
                   c.window_end - interval '1 microsecond'),
               c.revision
        FROM stream_candles AS c
        LEFT JOIN held AS h USING (exchange, symbol, interval, window_start)
    """)


def downgrade() -> None:
    op.execute("DROP TABLE stream_candle_parts")
