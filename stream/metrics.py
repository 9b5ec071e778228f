"""Prometheus metrics of the stream worker (served on ``CANDLEKEEP_METRICS_PORT``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:  # (for the signatures only: the writers import this module)
    from shared.core.continuity import Gap
    from stream.parse import PartitionBatch
    from stream.state import PartitionState, RunSummary
    from stream.writers import BatchResult

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
    # (0.15 and 0.2: a live batch gathers for CANDLEKEEP_STREAM_LINGER, 100 ms, before it is
    # written, so most closes land between 100 and 250 ms.)
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1, 2.5, 5, 10),
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

TRADE_GAPS = Counter(
    "candlekeep_trade_gaps_total",
    "Trade-id gaps recorded in trade_gaps: runs of ids a venue with consecutive ids sent and the"
    " feed never delivered (SPEC §4)",
    ["exchange"],
)
TRADES_MISSING = Counter(
    "candlekeep_trades_missing_total", "Trades missing in the trade-id gaps recorded", ["exchange"]
)
TRADE_GAPS_FILLED = Counter(
    "candlekeep_trade_gaps_filled_total",
    "Open trade-id gaps whose every trade got stored later (a late arrival, load)",
    ["exchange"],
)


def account_gaps(summary: RunSummary, recorded: list[Gap], filled: list[Gap]) -> None:
    """Count gaps recorded and filled in the run's summary and in the metrics."""
    for gap in recorded:
        TRADE_GAPS.labels(gap.exchange).inc()
        TRADES_MISSING.labels(gap.exchange).inc(gap.missing)
        summary.gaps += 1
        summary.missing += gap.missing
    for gap in filled:
        TRADE_GAPS_FILLED.labels(gap.exchange).inc()
        summary.gaps_filled += 1


def account(
    summary: RunSummary, batch: PartitionBatch, result: BatchResult, close_delay_s: float
) -> None:
    """Count a committed batch in the run's summary and in the metrics."""
    emission = result.emission
    s = summary
    s.consumed += batch.consumed
    s.stored += result.stored
    s.duplicates += result.duplicates
    s.conflicting += result.conflicting
    s.invalid += len(batch.invalid)
    s.late += len(emission.late)
    s.candles += len(emission.candles)
    s.partitions.add(batch.partition)
    MESSAGES_CONSUMED.labels(str(batch.partition)).inc(batch.consumed)
    TRADES_STORED.inc(result.stored)
    DUPLICATES.inc(result.duplicates)
    CONFLICTING.inc(result.conflicting)
    LATE.inc(len(emission.late))
    for invalid in batch.invalid:
        INVALID.labels(invalid.code).inc()
    for candle in emission.candles:
        CANDLES.labels(candle.interval).inc()
        CLOSE_TO_COMMIT.observe(close_delay_s)


def set_gauges(partition: int, state: PartitionState, now: float) -> None:
    label = str(partition)
    wm = state.windows.watermark_us
    if wm is not None:
        WATERMARK_LAG.labels(label).set(now - wm / 1_000_000)
    OPEN_WINDOWS.labels(label).set(state.windows.open_window_count)
