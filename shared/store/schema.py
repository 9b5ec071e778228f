"""The PostgreSQL schema (SPEC §7): the tables' definitions (columns, types, keys, indexes).

The SQL modules name tables and columns in their SQL text: those names are the contract of
SPEC §7 and change only with a migration, so the SQL reads as it runs. What must agree is
checked by tests instead: the migrated database against these definitions (tests/test_store.py)
and the candle tables' columns against ``CANDLE_FIELDS`` (tests/test_candle_sql.py).

The tables are created and upgraded by the Alembic migrations in ``shared/store/migrations``
(applied by ``candlekeep db upgrade``). Money and sizes are ``NUMERIC`` (exact), times
``timestamptz``.

``trades`` is keyed by a trade's identity, ``(exchange, symbol, trade_id)`` (SPEC §2: a copy with
another timestamp or price is the same trade), so PostgreSQL itself keeps one row per trade
whichever path writes it. A unique key of a partitioned table must contain the partition key, so
the table is not partitioned (migration 0003; the choice, measured, is in docs/storage.md). The
key also finds a window's first and last trade (its open and close), with one probe each where
ids grow with time (``shared.batch.candle_sql``); BRIN on ``ts`` serves the hour-range scans.
"""

from __future__ import annotations

import re

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    Identity,
    Index,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()


MISMATCH_KINDS = ("late", "repaired", "missing_in_stream", "missing_in_batch", "unexplained")


def _ts(name: str, nullable: bool = False, **kw) -> Column:
    return Column(name, DateTime(timezone=True), nullable=nullable, **kw)


trades = Table(
    "trades",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("trade_id", BigInteger, nullable=False),
    _ts("ts"),
    Column("price", Numeric, nullable=False),
    Column("quantity", Numeric, nullable=False),
    Column("is_buyer_maker", Boolean),
    # Exchange trades this row stands for: 1, or last_id - first_id + 1 for a Binance aggTrade.
    Column("raw_trades", Integer, nullable=False, server_default=text("1")),
    # SPEC §2: ``market`` (folded into candles) or a venue's other kind (stored, not folded).
    Column("kind", Text, nullable=False, server_default=text("'market'")),
    _ts("ingested_at", server_default=func.now()),
    PrimaryKeyConstraint("exchange", "symbol", "trade_id", name="trades_pkey"),
    Index("trades_ts_brin", "ts", postgresql_using="brin"),
)

#: Later copies of a stored trade that differ from it (SPEC §2: still duplicates, counted as
#: conflicting and kept with what differs). One row per distinct conflicting copy: a copy
#: delivered again (a replayed offset, a file loaded twice) adds nothing.
trade_conflicts = Table(
    "trade_conflicts",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("trade_id", BigInteger, nullable=False),
    # The stored first copy's values, when the copy was seen.
    _ts("first_ts"),
    Column("first_price", Numeric, nullable=False),
    Column("first_quantity", Numeric, nullable=False),
    Column("first_is_buyer_maker", Boolean),
    Column("first_kind", Text),
    # The conflicting copy's values.
    _ts("ts"),
    Column("price", Numeric, nullable=False),
    Column("quantity", Numeric, nullable=False),
    Column("is_buyer_maker", Boolean),
    Column("kind", Text),
    # Where the copy came from, where known: "kafka:<topic>" with partition and offset.
    Column("source", Text),
    Column("source_partition", Integer),
    Column("source_offset", BigInteger),
    _ts("seen_at", server_default=func.now()),
    UniqueConstraint(
        "exchange",
        "symbol",
        "trade_id",
        "ts",
        "price",
        "quantity",
        "is_buyer_maker",
        "kind",
        name="trade_conflicts_copy_key",
        postgresql_nulls_not_distinct=True,
    ),
    Index("trade_conflicts_seen_at_idx", "seen_at"),
)


def _candle_table(
    name: str, *extra: Column, key: tuple[str, ...] = (), index: bool = True
) -> Table:
    """A table of candles keyed by (exchange, symbol, interval, window_start) and ``key``."""
    return Table(
        name,
        metadata,
        Column("exchange", Text, nullable=False),
        Column("symbol", Text, nullable=False),
        Column("interval", Text, nullable=False),
        _ts("window_start"),
        _ts("window_end"),
        Column("open", Numeric, nullable=False),
        Column("high", Numeric, nullable=False),
        Column("low", Numeric, nullable=False),
        Column("close", Numeric, nullable=False),
        Column("volume", Numeric, nullable=False),
        Column("quote_volume", Numeric, nullable=False),
        Column("trade_count", BigInteger, nullable=False),
        Column("first_trade_id", BigInteger, nullable=False),
        Column("last_trade_id", BigInteger, nullable=False),
        Column("taker_buy_volume", Numeric),
        Column("taker_buy_quote_volume", Numeric),
        *extra,
        PrimaryKeyConstraint(
            "exchange", "symbol", "interval", "window_start", *key, name=f"{name}_pkey"
        ),
        *([Index(f"{name}_window_start_idx", "window_start")] if index else []),
    )


stream_candles = _candle_table(
    "stream_candles",
    Column("revision", Integer, nullable=False, server_default=text("0")),
    _ts("updated_at", server_default=func.now()),
)

#: Each partition's part of a stream candle (a symbol's trades may arrive on several partitions,
#: SPEC §4): ``stream_candles`` holds the merge of a key's parts (``shared.store.stream_candles``).
#: The first and last trade's timestamps make the merge exact; ``revision`` is the part's own (its
#: partition's windows count their emissions). Partition -1 (empty topic): a candle written before
#: migration 0004, partition unknown.
stream_candle_parts = _candle_table(
    "stream_candle_parts",
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    _ts("open_ts"),
    _ts("close_ts"),
    Column("revision", Integer, nullable=False, server_default=text("0")),
    _ts("updated_at", server_default=func.now()),
    key=("topic", "partition"),
    index=False,
)

batch_candles = _candle_table(
    "batch_candles",
    _ts("computed_at", server_default=func.now()),
)

late_trades = Table(
    "late_trades",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("trade_id", BigInteger, nullable=False),
    _ts("ts"),
    Column("price", Numeric, nullable=False),
    Column("quantity", Numeric, nullable=False),
    _ts("window_start"),
    _ts("watermark"),
    # How far past its base window's end the watermark already was when the trade arrived.
    Column("lateness", Interval, nullable=False),
    Column("source_partition", Integer),
    Column("source_offset", BigInteger),
    _ts("arrived_at", server_default=func.now()),
    PrimaryKeyConstraint("exchange", "symbol", "trade_id", name="late_trades_pkey"),
    Index("late_trades_ts_idx", "ts"),
)

invalid_trades = Table(
    "invalid_trades",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    # Where the message came from: "kafka:<topic>" or a file path; partition -1 for files,
    # offset the line number. Unique, so reprocessing or reloading adds nothing.
    Column("source", Text, nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("source_offset", BigInteger, nullable=False),
    Column("message_key", LargeBinary),
    Column("raw", LargeBinary),
    Column("reason_code", Text, nullable=False),
    Column("reason", Text, nullable=False),
    _ts("received_at", server_default=func.now()),
    UniqueConstraint(
        "source", "source_partition", "source_offset", name="invalid_trades_source_key"
    ),
    Index("invalid_trades_received_at_idx", "received_at"),
)

stream_progress = Table(
    "stream_progress",
    metadata,
    Column("consumer_group", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    # The next offset to consume: committed with the rows of each batch (effectively once).
    Column("next_offset", BigInteger, nullable=False),
    _ts("watermark", nullable=True),
    _ts("max_trade_ts", nullable=True),
    Column("window_state", JSONB, nullable=False),
    Column("consumed", BigInteger, nullable=False, server_default=text("0")),
    Column("stored", BigInteger, nullable=False, server_default=text("0")),
    Column("duplicates", BigInteger, nullable=False, server_default=text("0")),
    # Of the duplicates, those that differ from the stored first copy (SPEC §2).
    Column("conflicting", BigInteger, nullable=False, server_default=text("0")),
    Column("invalid", BigInteger, nullable=False, server_default=text("0")),
    Column("late", BigInteger, nullable=False, server_default=text("0")),
    _ts("updated_at", server_default=func.now()),
    # Messages the worker passed over by offset resets (known from the offsets; see
    # offset_resets): messages in the log = consumed + skipped.
    Column("skipped", BigInteger, nullable=False, server_default=text("0")),
    # CRC-32 of the key and value of the message before next_offset: a log replaced by another
    # (broker storage lost, topic recreated) has another message there.
    Column("last_digest", BigInteger),
    # The partition's trade-id continuity (``shared.core.continuity``), committed with its
    # offsets and window state (migration 0007; NULL before).
    Column("continuity_state", JSONB),
    PrimaryKeyConstraint("consumer_group", "topic", "partition", name="stream_progress_pkey"),
)

#: Runs of trade ids never delivered, at venues whose ids are consecutive (SPEC §4, §6.1):
#: recorded by the stream (with its topic and partition) or the batch side, one row per run
#: (the ids are the key); filled once every id is stored (``filled_by``: stream, load, repair),
#: or left open with a ``note`` saying why. Written by ``shared.store.trade_gaps`` only.
trade_gaps = Table(
    "trade_gaps",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("first_missing_id", BigInteger, nullable=False),
    Column("last_missing_id", BigInteger, nullable=False),
    Column(
        "missing_count",
        BigInteger,
        Computed("last_missing_id - first_missing_id + 1", persisted=True),
    ),
    # The timestamps of the trades on either side: the missing ones lie in between.
    _ts("before_ts"),
    _ts("after_ts"),
    Column("detected_by", Text, nullable=False),
    Column("topic", Text),
    Column("partition", Integer),
    _ts("detected_at", server_default=func.now()),
    _ts("filled_at", nullable=True),
    Column("filled_by", Text),
    Column("note", Text),
    UniqueConstraint(
        "exchange", "symbol", "first_missing_id", "last_missing_id", name="trade_gaps_ids_key"
    ),
    CheckConstraint("first_missing_id <= last_missing_id", name="trade_gaps_ids_check"),
    CheckConstraint("detected_by IN ('stream', 'batch')", name="trade_gaps_detected_by_check"),
    Index(
        "trade_gaps_open_idx",
        "exchange",
        "symbol",
        "first_missing_id",
        postgresql_where=text("filled_at IS NULL"),
    ),
    Index("trade_gaps_after_ts_idx", "after_ts"),
)

offset_resets = Table(
    "offset_resets",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("consumer_group", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    # beyond_end: the log is shorter than the stored position (broker storage lost, topic
    # recreated); replaced: another message than the one consumed lies before the stored
    # position (the same, with a new log already longer); before_start: retention deleted
    # messages before they were consumed.
    Column("kind", Text, nullable=False),
    Column("stored_offset", BigInteger, nullable=False),
    Column("log_start_offset", BigInteger, nullable=False),
    Column("log_end_offset", BigInteger, nullable=False),
    # Messages known to be passed over (before_start: the deleted range; beyond_end: the new
    # log's messages already gone before its start). What the old log held past stored_offset
    # is not known.
    Column("skipped", BigInteger, nullable=False),
    # CANDLEKEEP_OFFSET_RESET when detected: earliest (went on from the log start) or fail.
    Column("policy", Text, nullable=False),
    # The partition's watermark and greatest trade time at the reset, and the time of the first
    # trade read after it: the event times the skipped messages may have had lie between.
    _ts("watermark", nullable=True),
    _ts("max_trade_ts", nullable=True),
    _ts("resumed_at", nullable=True),
    _ts("detected_at", server_default=func.now()),
    CheckConstraint(
        "kind IN ('beyond_end', 'replaced', 'before_start')", name="offset_resets_kind_check"
    ),
    CheckConstraint("policy IN ('earliest', 'fail')", name="offset_resets_policy_check"),
    Index("offset_resets_partition_idx", "consumer_group", "topic", "partition"),
)

candle_mismatches = Table(
    "candle_mismatches",
    metadata,
    Column("exchange", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("interval", Text, nullable=False),
    _ts("window_start"),
    Column("kind", Text, nullable=False),
    # {field: {"stream": value, "batch": value}} for every field that differs.
    Column("differences", JSONB, nullable=False),
    Column("late_trades", Integer, nullable=False, server_default=text("0")),
    _ts("detected_at", server_default=func.now()),
    PrimaryKeyConstraint(
        "exchange", "symbol", "interval", "window_start", name="candle_mismatches_pkey"
    ),
    CheckConstraint(
        "kind IN ('late', 'repaired', 'missing_in_stream', 'missing_in_batch', 'unexplained')",
        name="candle_mismatches_kind_check",
    ),
)

dq_reports = Table(
    "dq_reports",
    metadata,
    _ts("interval_start"),
    _ts("interval_end"),
    Column("status", Text, nullable=False),
    Column("summary", JSONB, nullable=False),
    Column("html", Text),
    _ts("created_at", server_default=func.now()),
    PrimaryKeyConstraint("interval_start", "interval_end", name="dq_reports_pkey"),
    CheckConstraint("status IN ('pass', 'warn', 'fail')", name="dq_reports_status_check"),
)


_PARTITION = re.compile(r"trades_\d{8}(_.*)?")


def include_in_migrations(name: str | None, type_: str, parent_names: dict) -> bool:
    """Alembic's ``include_name`` filter: the daily ``trades_YYYYMMDD`` partitions that
    ``trades`` had before migration 0003 (created at run time, not by migrations) are not part
    of the declared schema; 0003 merges them into one table."""
    if type_ == "table" and name and _PARTITION.fullmatch(name):
        return False
    table = parent_names.get("table_name") or ""
    return not _PARTITION.fullmatch(table)


# The check against the venue's tables (SPEC §6.1) and finality's (§6.2) join ``metadata`` from
# their own modules (finality's view reads the venue's ``candle_verifications``).
from shared.store import schema_venue  # noqa: E402, F401, I001
from shared.store import schema_finality  # noqa: E402, F401
