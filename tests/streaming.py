"""Helpers for the stream tests: settings per test, producing, running workers, reading tables,
and an independent reference model of what the worker must write."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.config import Settings
from shared.core.aggregation import aggregate
from shared.core.candles import Candle, merge
from shared.core.trade_messages import check_key, parse_trade_message
from shared.core.trades import Rejection, datetime_to_ts
from shared.store import db
from stream.feeds.produce import Delivery, FeedMessage, ensure_topic, produce

STREAM_TABLES = (
    "trades",
    "stream_candles",
    "stream_candle_parts",
    "late_trades",
    "invalid_trades",
    "stream_progress",
    "trade_conflicts",
    "batch_candles",
    "candle_mismatches",
    "dq_reports",
    "offset_resets",
    "trade_gaps",
    "reconciled_periods",
    "stale_periods",
    "candle_corrections",
    "candle_verifications",
    "exchange_candles",
    "feed_reconnects",
)


def stream_settings(**overrides) -> Settings:
    """Settings with fresh topic and group names, and short group timeouts (the embedded broker
    completes a join after about half the session timeout)."""
    name = uuid.uuid4().hex[:8]
    values = dict(
        topic_trades=f"t{name}.trades",
        topic_candles=f"t{name}.candles",
        topic_late=f"t{name}.late",
        topic_invalid=f"t{name}.invalid",
        consumer_group=f"g{name}",
        session_timeout="3",
        heartbeat_interval="0.3",
        idle_timeout="1",
        metrics_port=0,
    )
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings, database_url: str, bootstrap: str) -> dict[str, str]:
    """The environment that gives a worker subprocess the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_")}
    env.update(
        DATABASE_URL=database_url,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        CANDLEKEEP_TOPIC_TRADES=settings.topic_trades,
        CANDLEKEEP_TOPIC_CANDLES=settings.topic_candles,
        CANDLEKEEP_TOPIC_LATE=settings.topic_late,
        CANDLEKEEP_TOPIC_INVALID=settings.topic_invalid,
        CANDLEKEEP_CONSUMER_GROUP=settings.consumer_group,
        CANDLEKEEP_SESSION_TIMEOUT=str(settings.session_timeout.total_seconds()),
        CANDLEKEEP_HEARTBEAT_INTERVAL=str(settings.heartbeat_interval.total_seconds()),
        CANDLEKEEP_IDLE_TIMEOUT=str(settings.idle_timeout.total_seconds()),
        CANDLEKEEP_BATCH_SIZE=str(settings.batch_size),
        CANDLEKEEP_STREAM_WRITERS=str(settings.stream_writers),
        CANDLEKEEP_STREAM_LINGER=str(settings.stream_linger.total_seconds()),
        CANDLEKEEP_INTERVALS=settings.intervals,
        CANDLEKEEP_MAX_DELAY=str(settings.max_delay.total_seconds()),
        CANDLEKEEP_ALLOWED_LATENESS=str(settings.allowed_lateness.total_seconds()),
        CANDLEKEEP_METRICS_PORT="0",
    )
    return env


def reset_tables(url: str) -> None:
    db.upgrade(url)
    with db.connect(url) as conn:
        conn.execute("TRUNCATE " + ", ".join(STREAM_TABLES))
        conn.commit()


def produce_all(bootstrap: str, topic: str, messages, partitions: int = 4) -> list[Delivery]:
    async def run():
        await ensure_topic(bootstrap, topic, partitions)
        return await produce(bootstrap, topic, messages)

    return asyncio.run(run())


@dataclass
class Expected:
    """What the worker must end up with, from a model written independently of it."""

    stored: set = field(default_factory=set)  # (exchange, symbol, trade_id, ts_us) of firsts
    duplicates: int = 0
    conflicting: int = 0  # duplicates whose ts, price, quantity, side or kind differ from the first
    firsts: dict = field(default_factory=dict)  # (exchange, symbol, trade_id) -> first copy
    invalid: dict = field(default_factory=dict)  # (partition, offset) -> code
    late: set = field(default_factory=set)  # (exchange, symbol, trade_id)
    on_time: list = field(default_factory=list)
    on_time_by_partition: dict = field(default_factory=dict)  # partition -> [trade]


def reference_model(deliveries: list[Delivery], settings: Settings) -> Expected:
    """Per partition in offset order: parse, dedupe by (exchange, symbol, trade_id) (the first
    copy wins, whatever the copies' timestamps: SPEC §2; partitions are taken in order, so
    copies of an id on two partitions must be consumed in that order), and call a trade late
    when its base window's end + allowed lateness <= greatest timestamp so far - max_delay."""
    out = Expected()
    ws = settings.window_settings()
    base = ws.intervals.base.length_us
    by_partition: dict[int, list[Delivery]] = {}
    for d in deliveries:
        by_partition.setdefault(d.partition, []).append(d)
    for partition, items in by_partition.items():
        greatest = None
        for d in sorted(items, key=lambda d: d.offset):
            trade = parse_trade_message(d.message.value)
            if not isinstance(trade, Rejection):
                trade = check_key(d.message.key, trade) or trade
            if isinstance(trade, Rejection):
                out.invalid[(partition, d.offset)] = trade.code
                continue
            first = out.firsts.get(trade.key)
            if first is not None:
                out.duplicates += 1
                mine = (trade.ts_us, trade.price, trade.quantity, trade.is_buyer_maker, trade.kind)
                if mine != (
                    first.ts_us,
                    first.price,
                    first.quantity,
                    first.is_buyer_maker,
                    first.kind,
                ):
                    out.conflicting += 1
                continue
            out.firsts[trade.key] = trade
            out.stored.add((trade.exchange, trade.symbol, trade.trade_id, trade.ts_us))
            if trade.kind != "market":  # stored, never folded nor late (SPEC §2 ``kind``)
                greatest = trade.ts_us if greatest is None else max(greatest, trade.ts_us)
                continue
            watermark = None if greatest is None else greatest - ws.max_delay_us
            end = trade.ts_us - trade.ts_us % base + base
            if watermark is not None and end + ws.allowed_lateness_us <= watermark:
                out.late.add(trade.key)
            else:
                out.on_time.append(trade)
                out.on_time_by_partition.setdefault(partition, []).append(trade)
            greatest = trade.ts_us if greatest is None else max(greatest, trade.ts_us)
    return out


def tables(url: str) -> dict:
    """Every stream table's content, comparable across runs."""
    with db.connect(url) as conn:
        q = conn.execute
        return {
            "trades": set(
                q(
                    "SELECT exchange, symbol, trade_id, ts, price, quantity,"
                    " is_buyer_maker FROM trades"
                ).fetchall()
            ),
            "candles": {
                tuple(r[:4]): tuple(r[4:])
                for r in q(
                    "SELECT exchange, symbol, interval, window_start, open, high, low,"
                    " close, volume, quote_volume, trade_count, first_trade_id,"
                    " last_trade_id, taker_buy_volume, taker_buy_quote_volume, revision"
                    " FROM stream_candles"
                ).fetchall()
            },
            "late": set(
                q(
                    "SELECT exchange, symbol, trade_id, watermark, lateness FROM late_trades"
                ).fetchall()
            ),
            "invalid": {
                (r[0], r[1]): (r[2], r[3])
                for r in q(
                    "SELECT source_partition, source_offset, reason_code, reason"
                    " FROM invalid_trades"
                ).fetchall()
            },
            "progress": {
                r[0]: tuple(r[1:])
                for r in q(
                    "SELECT partition, next_offset, watermark, consumed, stored,"
                    " duplicates, invalid, late FROM stream_progress"
                ).fetchall()
            },
        }


def expected_candles(expected: Expected, settings: Settings, progress: dict) -> dict:
    """The core's candles over the on-time trades: each partition's, for the windows its final
    watermark has passed (the rest are still open, in its stored window state), merged per key
    across the partitions (a symbol's trades may arrive on several, SPEC §4)."""
    watermarks = {p: datetime_to_ts(row[1]) for p, row in progress.items() if row[1]}
    intervals = settings.interval_set
    parts: dict = {}
    for partition, trades in expected.on_time_by_partition.items():
        wm = watermarks.get(partition)
        for candle in aggregate(trades, intervals):
            if wm is not None and candle.window_end_us <= wm:
                parts.setdefault(candle.key, []).append(candle)
    return {key: merge(c, intervals.by_name(key[2])).values() for key, c in parts.items()}


def rekey(messages, every: int = 40) -> list[FeedMessage]:
    """The feed's messages with the key of every other block of ``every`` trade ids of a symbol
    in lower case (a producer that keys with ``btcusdt``, SPEC §4): the partitioner sends them
    to the partition of that key. A copy of a trade goes with it (same id, same key)."""
    out = []
    for m in messages:
        trade = parse_trade_message(m.value) if m.kind != "invalid" else None
        if isinstance(trade, Rejection) or trade is None or m.key is None:
            out.append(m)
            continue
        key = m.key.lower() if (trade.trade_id // every) % 2 else m.key
        out.append(dataclasses.replace(m, key=key))
    return out


async def _latest_candles(bootstrap: str, topic: str) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while not consumer.partitions_for_topic(topic):
                await consumer.topics()
                await asyncio.sleep(0.1)
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            latest: dict = {}
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        value = json.loads(r.value)
                        kept = latest.get(r.key)
                        if kept is None or value["revision"] >= kept["revision"]:
                            latest[r.key] = value  # (on a tie, the later message)
        return latest
    finally:
        await consumer.stop()


def latest_candles(bootstrap: str, topic: str) -> dict:
    """What a consumer of the ``candles`` topic ends with, keeping the highest revision of each
    key (SPEC §5): {key: the message's JSON object}."""
    return asyncio.run(_latest_candles(bootstrap, topic))


def stream_candle_messages(url: str) -> dict:
    """``stream_candles`` as the ``candles`` topic's messages would carry them: {key: JSON}."""
    from stream.messages import candle_message

    out = {}
    with db.connect(url) as conn:
        for row in conn.execute(
            "SELECT exchange, symbol, interval, window_start, window_end, open, high, low,"
            " close, volume, quote_volume, trade_count, first_trade_id, last_trade_id,"
            " taker_buy_volume, taker_buy_quote_volume, revision FROM stream_candles"
        ).fetchall():
            candle = Candle(
                *row[:3], datetime_to_ts(row[3]), datetime_to_ts(row[4]), *row[5:16], 0, 0, row[16]
            )
            key, value = candle_message(candle)
            out[key] = json.loads(value)
    return out


def reconcile_counts(url: str, settings: Settings, start, end) -> dict:
    """Recompute and reconcile ``[start, end)`` (the DAG's steps 2 and 3); the counts of each
    kind."""
    from shared.batch.batch_run import recompute_step, reconcile_step

    recompute_step(url, settings, start, end)
    return reconcile_step(url, settings, start, end)["counts"]
