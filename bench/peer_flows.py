"""The peers of bench/peers.py: the candle pipelines a user would write with bytewax 0.21 and
Quix Streams 3.28 instead of running candlekeep's worker, on the same topic and PostgreSQL.

Each is what such a user would write to get the same 1m candles: parse the canonical message
(JSON, exact ``Decimal`` prices), skip what is malformed, drop repeated trade ids (the topic
carries ~1% duplicates; without this no candle would be equal), fold trades into event-time
tumbling windows with the same 5 s delay as candlekeep's ``max_delay``, and upsert every closed
candle into a PostgreSQL table keyed like ``stream_candles``. Neither stores the trades, the late
or invalid messages, or its consumer offsets in PostgreSQL: candles only (the guarantees column of
the benchmark says what each promises).

The fold itself is the bytewax benchmark's (``aggregate_vs_bytewax.Ohlcv``/``fold_trade``): exact
additions in a context that traps rounding, open and close by (time, trade id).

Run by bench/peers.py as subprocesses:
``python -m bytewax.run -w 1 'bench/peer_flows.py:bytewax_flow(...)'`` and
``python bench/peer_flows.py quix BOOTSTRAP TOPIC DATABASE_URL INTERVALS STATE_DIR``.
"""

from __future__ import annotations

import decimal
import json
import pickle
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_fold import Ohlcv, fold_trade, merge_candles

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: candlekeep's default ``max_delay``: the windows' grace in both peers.
DELAY = timedelta(seconds=5)
EXCHANGE = "binance"
#: The interval names the peers know, with their lengths.
LENGTHS = {"1m": timedelta(minutes=1), "5m": timedelta(minutes=5), "15m": timedelta(minutes=15)}
LENGTHS["1h"] = timedelta(hours=1)
#: Trade times outside these are impossible (ns instead of ms, negative): malformed.
_MIN_US, _MAX_US = 946_684_800_000_000, 4_102_444_800_000_000  # 2000-01-01, 2100-01-01
#: The bench's own candle table, keyed like ``stream_candles``.
CANDLE_TABLE = """
CREATE TABLE peer_candles (
    exchange text NOT NULL, symbol text NOT NULL, interval text NOT NULL,
    window_start timestamptz NOT NULL, open numeric NOT NULL, high numeric NOT NULL,
    low numeric NOT NULL, close numeric NOT NULL, volume numeric NOT NULL,
    quote_volume numeric NOT NULL, trade_count bigint NOT NULL, first_trade_id bigint,
    last_trade_id bigint, taker_buy_volume numeric, taker_buy_quote_volume numeric,
    PRIMARY KEY (exchange, symbol, interval, window_start)
)"""
COLUMNS = (
    "exchange",
    "symbol",
    "interval",
    "window_start",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trade_count",
    "first_trade_id",
    "last_trade_id",
    "taker_buy_volume",
    "taker_buy_quote_volume",
)
UPSERT = (
    f"INSERT INTO peer_candles ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    " ON CONFLICT (exchange, symbol, interval, window_start) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[4:])
)


def parse(key: bytes | str | None, value: bytes) -> tuple[str, tuple] | None:
    """A canonical trade message → (symbol, (trade_id, ts_us, price, quantity, is_buyer_maker,
    event time)), the layout ``fold_trade`` takes; None for anything malformed or keyed by
    another symbol (candlekeep's rules, written as a user of a framework would)."""
    if key is None:
        return None
    try:
        message = json.loads(value)
        symbol = message["symbol"].upper()
        trade_id = message["trade_id"]
        price = Decimal(message["price"])
        quantity = Decimal(message["quantity"])
        stamp = message["timestamp"]
        if type(stamp) is int:
            ts_us = stamp * 1000
        else:
            ts_us = (datetime.fromisoformat(stamp) - EPOCH) // timedelta(microseconds=1)
    except (ValueError, KeyError, TypeError, AttributeError, decimal.InvalidOperation):
        return None
    if (
        type(trade_id) is not int
        or trade_id < 0
        or not (price.is_finite() and price > 0 and quantity.is_finite() and quantity > 0)
        or not _MIN_US <= ts_us < _MAX_US
        or (key.decode() if isinstance(key, bytes) else key).upper() != symbol
    ):
        return None
    event_time = EPOCH + timedelta(microseconds=ts_us)  # exact, unlike fromtimestamp(float)
    return symbol, (trade_id, ts_us, price, quantity, message.get("is_buyer_maker"), event_time)


def candle_row(symbol: str, interval: str, start: datetime, candle: Ohlcv) -> tuple:
    return (
        EXCHANGE,
        symbol,
        interval,
        start,
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.volume,
        candle.quote_volume,
        candle.trade_count,
        candle.open_key[1],
        candle.close_key[1],
        candle.taker_buy_volume,
        candle.taker_buy_quote_volume,
    )


# --- bytewax 0.21: KafkaSource → dedupe → fold_window per interval → PostgreSQL upsert -----------


def bytewax_flow(bootstrap: str, topic: str, database_url: str, intervals: str = "1m"):
    """The dataflow ``python -m bytewax.run`` runs; it ends at the end of the topic
    (``tail=False``), closing the windows still open."""
    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSource
    from bytewax.dataflow import Dataflow
    from bytewax.operators.windowing import EventClock, TumblingWindower, fold_window

    flow = Dataflow("peer_candles")
    source = KafkaSource([bootstrap], [topic], tail=False, batch_size=5000)
    messages = op.input("kafka", flow, source)
    trades = op.filter_map("parse", messages, lambda m: parse(m.key, m.value))
    firsts = op.filter_map_value("new", op.stateful_map("dedupe", trades, _first_copy), _present)
    for name in intervals.split(","):
        windows = fold_window(
            f"candles_{name}",
            firsts,
            # A fixed now: the watermark is the greatest trade time - 5 s, as in candlekeep
            # reading a backlog (bytewax would otherwise add the wall time since that trade).
            EventClock(_event_time, wait_for_system_duration=DELAY, now_getter=_fixed_now),
            TumblingWindower(length=LENGTHS[name], align_to=EPOCH),
            builder=lambda: None,
            folder=fold_trade,
            merger=merge_candles,
            ordered=False,  # the accumulator orders open/close itself: bytewax's faster setting
        )
        length = LENGTHS[name]
        rows = op.map(
            f"rows_{name}",
            windows.down,
            lambda kv, name=name, length=length: candle_row(
                kv[0], name, EPOCH + kv[1][0] * length, kv[1][1]
            ),
        )
        op.output(f"postgres_{name}", rows, PostgresUpsert(database_url))
    return flow


def _first_copy(seen: set | None, trade: tuple) -> tuple[set, tuple | None]:
    """stateful_map, keyed by symbol: the trade ids seen so far; a repeated id maps to None."""
    seen = set() if seen is None else seen
    if trade[0] in seen:
        return seen, None
    seen.add(trade[0])
    return seen, trade


def _present(trade):
    return trade


def _event_time(trade: tuple) -> datetime:
    return trade[5]


def _fixed_now() -> datetime:
    return EPOCH


def _bytewax_sink_classes():
    from bytewax.outputs import DynamicSink, StatelessSinkPartition

    class _Partition(StatelessSinkPartition):
        def __init__(self, database_url: str):
            import psycopg

            self._conn = psycopg.connect(database_url)

        def write_batch(self, items: list[tuple]) -> None:
            with self._conn.cursor() as cursor:
                cursor.executemany(UPSERT, items)
            self._conn.commit()

        def close(self) -> None:
            self._conn.close()

    class Sink(DynamicSink):
        """Each batch of closed candles upserted and committed (psycopg 3, pipelined)."""

        def __init__(self, database_url: str):
            self._url = database_url

        def build(self, step_id, worker_index, worker_count):
            return _Partition(self._url)

    return Sink


def PostgresUpsert(database_url: str):  # (a class, built lazily: bytewax is optional)
    return _bytewax_sink_classes()(database_url)


# --- Quix Streams 3.28: tumbling_window(...).reduce(...).final() → PostgreSQLSink ---------------


def quix_main(bootstrap: str, topic: str, database_url: str, intervals: str, state_dir: str):
    """Run the Quix application until SIGTERM (bench/peers.py sends it once every candle it
    compares is in the table)."""
    from quixstreams import Application
    from quixstreams.sinks.community.postgresql import PostgreSQLSink
    from quixstreams.state.rocksdb import RocksDBOptions

    app = Application(
        broker_address=bootstrap,
        consumer_group=f"quix-{Path(state_dir).name}",
        auto_offset_reset="earliest",
        state_dir=state_dir,
        # Flush the sink every second, not every 5 s (Quix's default), so the last candles do
        # not wait behind the checkpoint; outputs are at least once either way.
        commit_interval=1.0,
        # Tansu completes a group join after about half the session timeout: 45 s by default.
        consumer_extra_config={"session.timeout.ms": 3000, "heartbeat.interval.ms": 300},
        # pickle keeps the Decimals in the window state; Quix's default (orjson) cannot.
        rocksdb_options=RocksDBOptions(dumps=pickle.dumps, loads=pickle.loads),
    )
    source = app.topic(topic, key_deserializer="str", value_deserializer="bytes")
    sdf = app.dataframe(source)
    sdf = sdf.apply(lambda value, key, _ts, _headers: parse(key, value), metadata=True)
    sdf = sdf.filter(lambda trade: trade is not None)
    sdf = sdf.filter(_quix_first_copy, stateful=True)
    sdf = sdf.set_timestamp(lambda trade, _key, _ts, _headers: trade[1][1] // 1000)
    url = urlsplit(database_url)
    sink = PostgreSQLSink(
        host=url.hostname,
        port=url.port or 5432,
        dbname=url.path.lstrip("/"),
        user=url.username or "postgres",
        password=url.password or "",
        table_name="peer_candles",
        schema_auto_update=False,
        include_metadata=False,
        primary_key_columns=["exchange", "symbol", "interval", "window_start"],
        upsert_on_primary_key=True,
    )
    for name in intervals.split(","):
        length_ms = int(LENGTHS[name] / timedelta(milliseconds=1))
        windows = (
            sdf.tumbling_window(length_ms, grace_ms=int(DELAY / timedelta(milliseconds=1)))
            .reduce(_quix_fold, _quix_first)
            # "partition": closed by the partition's greatest time, as candlekeep's watermark.
            .final(closing_strategy="partition")
        )
        windows = windows.apply(lambda w, name=name: _quix_row(w, name))
        windows.sink(sink)
    app.run()


def _quix_first_copy(trade: tuple, state) -> bool:
    """Per symbol (the message key): keep a trade id once (a state key per trade id)."""
    trade_id = trade[1][0]
    if state.exists(trade_id):
        return False
    state.set(trade_id, True)
    return True


def _quix_first(trade: tuple) -> tuple:
    return trade[0], Ohlcv(trade[1])


def _quix_fold(accumulated: tuple, trade: tuple) -> tuple:
    return accumulated[0], fold_trade(accumulated[1], trade[1])


def _quix_row(window: dict, interval: str) -> dict:
    symbol, candle = window["value"]
    start = EPOCH + timedelta(milliseconds=window["start"])
    return dict(zip(COLUMNS, candle_row(symbol, interval, start, candle), strict=True))


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "quix":
        raise SystemExit(
            "usage: peer_flows.py quix BOOTSTRAP TOPIC DATABASE_URL INTERVALS STATE_DIR"
        )
    quix_main(*sys.argv[2:])
