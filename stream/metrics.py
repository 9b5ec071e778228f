"""Prometheus metrics of the stream worker (served on ``CANDLEKEEP_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_CONSUMED = Counter(
    "candlekeep_messages_consumed_total", "Kafka messages consumed", ["partition"]
)
TRADES_STORED = Counter("candlekeep_trades_stored_total", "New trades stored in PostgreSQL")
DUPLICATES = Counter("candlekeep_trades_duplicate_total", "Messages repeating a stored trade")
CONFLICTING = Counter(
    "candlekeep_trades_conflicting_total",
    "Duplicates that differ from the stored first copy (time, price, quantity or side);"
    " each distinct one is kept in trade_conflicts",
)
LATE = Counter("candlekeep_trades_late_total", "Trades that arrived after their window closed")
INVALID = Counter("candlekeep_messages_invalid_total", "Invalid messages", ["reason"])
CANDLES = Counter("candlekeep_candles_written_total", "Candle rows written", ["interval"])
WATERMARK_LAG = Gauge(
    "candlekeep_watermark_lag_seconds",
    "Wall clock minus the partition's watermark",
    ["partition"],
)
OPEN_WINDOWS = Gauge("candlekeep_open_windows", "Windows held in memory", ["partition"])
BATCH_COMMIT = Histogram(
    "candlekeep_batch_commit_seconds",
    "Time to write and commit one batch to PostgreSQL (and produce its outputs)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CLOSE_TO_COMMIT = Histogram(
    "candlekeep_window_close_to_commit_seconds",
    "From the moment the message that closed a window was received to its candle's commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter("candlekeep_retries_total", "Batches retried after a failure", ["cause"])
OFFSET_RESETS = Counter(
    "candlekeep_offset_resets_total",
    "Partitions whose stored position was no longer in the log (see offset_resets)",
    ["partition", "kind"],
)
MESSAGES_SKIPPED = Counter(
    "candlekeep_messages_skipped_total",
    "Messages passed over by offset resets, as far as the offsets tell",
    ["partition"],
)
