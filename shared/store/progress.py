"""How far the stream has got (SPEC §4 "progress is visible", §6 step 1)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg


@dataclass
class StreamPosition:
    """The slowest partition's watermark, and whether it has passed a point in time."""

    watermark: datetime | None
    passed: bool
    waited_s: float
    lag_s: float | None  # how far the watermark is behind the point (None: no watermark yet)


def stream_watermark(conn: psycopg.Connection, group: str, topic: str) -> datetime | None:
    """The least watermark over the partitions that have one: every candle before it is final."""
    row = conn.execute(
        "SELECT min(watermark) FROM stream_progress"
        " WHERE consumer_group = %s AND topic = %s AND watermark IS NOT NULL",
        (group, topic),
    ).fetchone()
    if not conn.autocommit:
        conn.rollback()
    return row[0]


def wait_for_watermark(
    conn: psycopg.Connection,
    group: str,
    topic: str,
    point: datetime,
    timeout_s: float,
    *,
    poll_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> StreamPosition:
    """Poll until the stream's watermark reaches ``point``, at most ``timeout_s``."""
    started = monotonic()
    while True:
        watermark = stream_watermark(conn, group, topic)
        waited = monotonic() - started
        if watermark is not None and watermark >= point:
            return StreamPosition(watermark, True, waited, 0.0)
        if waited >= timeout_s:
            lag = None if watermark is None else (point - watermark).total_seconds()
            return StreamPosition(watermark, False, waited, lag)
        sleep(min(poll_s, max(0.0, timeout_s - waited)))
