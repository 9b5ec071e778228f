"""Late trades (SPEC §4): trades whose window had closed when they arrived, kept in
``late_trades`` with how late they were and where they came from."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import psycopg

from shared.core.trades import ts_to_datetime
from shared.core.windows import LateTrade


def write_late(
    conn: psycopg.Connection,
    late: Sequence[LateTrade],
    partition: int,
    offsets: Sequence[int | None] | None = None,
) -> None:
    """Insert late trades (idempotent by trade), in the caller's transaction; ``offsets``,
    parallel to ``late``: the offset of the message that carried each (None: unknown)."""
    if not late:
        return
    if offsets is None:
        offsets = [None] * len(late)
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO late_trades (exchange, symbol, trade_id, ts, price, quantity,"
            " window_start, watermark, lateness, source_partition, source_offset)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [
                (
                    lt.trade.exchange,
                    lt.trade.symbol,
                    lt.trade.trade_id,
                    ts_to_datetime(lt.trade.ts_us),
                    lt.trade.price,
                    lt.trade.quantity,
                    ts_to_datetime(lt.window_start_us),
                    ts_to_datetime(lt.watermark_us),
                    timedelta(microseconds=lt.lateness_us),
                    partition,
                    offset,
                )
                for lt, offset in zip(late, offsets, strict=True)
            ],
        )
