"""Trade feeds: Binance's WebSocket (recorded frames, a dropped connection) and file replay."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from click.testing import CliRunner
from websockets.asyncio.server import serve

from candlekeep.cli import cli
from candlekeep.feed_cmd import BINANCE_URL
from shared.core.trade_messages import canonical_timestamp, encode_trade, parse_trade_message
from shared.core.trades import Rejection, Trade
from stream.feeds.binance import DEFAULT_URL, normalise_frame, parse_symbols, stream_url
from stream.feeds.replay import replay_messages
from stream.feeds.websocket import Skipped, backoff_delay

RECORDED = Path(__file__).resolve().parent / "data" / "binance_trade_ws.jsonl"


# -- normalisation (pure) -----------------------------------------------------------------------


def recorded_frames() -> list[str]:
    return RECORDED.read_text(encoding="utf-8").splitlines()


def expected_from_recording() -> list[tuple[bytes, dict]]:
    """The canonical messages the recorded trade frames stand for, built field by field from the
    frames (independently of the feed's code)."""
    out = []
    for line in recorded_frames():
        try:
            frame = json.loads(line)
        except ValueError:
            continue
        data = frame["data"]
        if data.get("e") != "trade" or "p" not in data:
            continue
        out.append(
            (
                data["s"].encode(),
                {
                    "exchange": "binance",
                    "symbol": data["s"],
                    "trade_id": data["t"],
                    "price": data["p"],
                    "quantity": data["q"],
                    "timestamp": data["T"],
                    "is_buyer_maker": data["m"],
                },
            )
        )
    return out


def test_trade_frame_becomes_the_canonical_message():
    frame = (
        '{"stream":"btcusdt@trade","data":{"e":"trade","E":123456789,"s":"BTCUSDT","t":12345,'
        '"p":"0.001","q":"100","T":123456785,"m":true,"M":true}}'
    )
    message = normalise_frame(frame)
    assert not isinstance(message, Skipped)
    assert message.key == b"BTCUSDT"
    assert json.loads(message.value) == {
        "exchange": "binance",
        "symbol": "BTCUSDT",
        "trade_id": 12345,
        "price": "0.001",
        "quantity": "100",
        "timestamp": 123456785,
        "is_buyer_maker": True,
    }
    trade = parse_trade_message(message.value)
    assert trade == Trade(
        "binance", "BTCUSDT", 12345, 123456785000, Decimal("0.001"), Decimal(100), True
    )


def test_frames_are_taken_bare_or_combined_and_stay_exact():
    bare = (
        b'{"e":"trade","E":1735689600012,"s":"ETHUSDT","t":7,"p":"3337.78000000",'
        b'"q":"0.00000001","T":1735689600011,"m":false,"M":true}'
    )
    message = normalise_frame(bare)
    assert not isinstance(message, Skipped)
    assert json.loads(message.value)["price"] == "3337.78000000"
    assert json.loads(message.value)["quantity"] == "0.00000001"
    # Numbers instead of strings are read exactly too (never through a float).
    numeric = normalise_frame(
        '{"e":"trade","s":"ETHUSDT","t":8,"p":0.10000000000000000555,"q":1e-8,"T":1,"m":true}'
    )
    assert not isinstance(numeric, Skipped)
    trade = parse_trade_message(numeric.value)
    assert trade.price == Decimal("0.10000000000000000555")
    assert trade.quantity == Decimal("1e-8")


def test_microsecond_trade_times_keep_their_microseconds():
    frame = '{"e":"trade","s":"BTCUSDT","t":1,"p":"1","q":"1","T":1735689600011123,"m":true}'
    message = normalise_frame(frame)
    assert json.loads(message.value)["timestamp"] == "2025-01-01T00:00:00.011123Z"
    assert parse_trade_message(message.value).ts_us == 1735689600011123
    whole = normalise_frame(frame.replace("1735689600011123", "1735689600011000"))
    assert json.loads(whole.value)["timestamp"] == 1735689600011


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        ('{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT","a":1}}', "ignored"),
        ('{"result":null,"id":1}', "ignored"),
        ('{"e":"24hrTicker","s":"BTCUSDT"}', "ignored"),
        ('{"stream":"btcusdt@trade","data":{"e":"trade","E":17356', "malformed"),
        ("", "malformed"),
        (b"\xff\xfe", "malformed"),
        ("[1,2]", "malformed"),
        ('{"stream":"x","data":[1]}', "malformed"),
        ('{"s":"BTCUSDT","t":1}', "malformed"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"q":"1","T":1,"m":true}', "malformed"),
        ('{"e":"trade","s":"BTCUSDT","t":"1","p":"1","q":"1","T":1,"m":true}', "malformed"),
        ('{"e":"trade","s":"BTCUSDT","t":true,"p":"1","q":"1","T":1,"m":true}', "malformed"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"0","q":"1","T":1,"m":true}', "malformed"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"NaN","q":"1","T":1,"m":true}', "malformed"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"1","q":"1","T":-5,"m":true}', "malformed"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"1","q":"1","T":1,"m":"yes"}', "malformed"),
        ('{"e":"trade","s":"BTC USDT","t":1,"p":"1","q":"1","T":1,"m":true}', "malformed"),
    ],
)
def test_other_events_are_ignored_and_malformed_frames_skipped(frame, kind):
    result = normalise_frame(frame)
    assert isinstance(result, Skipped)
    assert result.kind == kind
    assert result.reason


def test_recorded_frames_normalise_to_the_recorded_trades():
    results = [normalise_frame(line) for line in recorded_frames()]
    messages = [r for r in results if not isinstance(r, Skipped)]
    assert [(m.key, json.loads(m.value)) for m in messages] == expected_from_recording()
    assert sorted(r.kind for r in results if isinstance(r, Skipped)) == [
        "ignored",
        "malformed",
        "malformed",
    ]


def test_stream_url_symbols_and_backoff():
    assert BINANCE_URL == DEFAULT_URL
    assert parse_symbols("btcusdt, ETHUSDT,btcusdt") == ["BTCUSDT", "ETHUSDT"]
    with pytest.raises(ValueError, match="not a Binance symbol"):
        parse_symbols("btc/usdt")
    with pytest.raises(ValueError, match="no symbols"):
        parse_symbols(" , ")
    assert stream_url(DEFAULT_URL + "/", ["BTCUSDT", "ETHUSDT"]) == (
        "wss://stream.binance.com:9443/stream?streams=btcusdt@trade/ethusdt@trade"
    )
    assert (
        stream_url("ws://h/stream?streams=x@trade", ["BTCUSDT"]) == "ws://h/stream?streams=x@trade"
    )
    rnd = random.Random(1)
    delays = [[backoff_delay(a, 1.0, 60.0, rnd) for _ in range(200)] for a in range(1, 10)]
    for attempt, sample in enumerate(delays, 1):
        step = min(60.0, 2.0 ** (attempt - 1))
        assert all(step / 2 <= d <= step for d in sample)
        assert len(set(sample)) > 100  # jittered
    assert max(delays[-1]) <= 60.0


# -- the recorded WebSocket, end to end ---------------------------------------------------------


class RecordedBinance:
    """A local WebSocket server replaying recorded frames; the first connection is dropped
    (without a close handshake) after ``drop_after`` frames, the next one gets the rest."""

    def __init__(self, frames: list[str], drop_after: int):
        self.frames = frames
        self.drop_after = drop_after
        self.paths: list[str] = []
        self.sent = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    async def _handler(self, ws) -> None:
        self.paths.append(ws.request.path)
        first = len(self.paths) == 1
        for frame in self.frames[self.sent : self.drop_after if first else None]:
            await ws.send(frame)
            self.sent += 1
        if first:
            await asyncio.sleep(0.3)  # let the frames reach the client, then drop
            ws.transport.abort()
            return
        await ws.wait_closed()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> RecordedBinance:
        self._thread.start()
        assert self._ready.wait(10), "the recorded WebSocket server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def restore_logging():
    """The feed commands configure structlog onto the CLI runner's stream: put it back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def read_topic(
    bootstrap: str, topic: str, count: int, settle_s: float = 1.5, partitions: int = 4
) -> list:
    """Every message of ``topic`` (the feeds create it with 4 partitions), from the start: waits
    for ``count`` of them, then ``settle_s`` more to catch any extra."""

    async def run():
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
            received = []
            async with asyncio.timeout(60):
                while len(received) < count:
                    batches = await consumer.getmany(timeout_ms=500)
                    received += [m for ms in batches.values() for m in ms]
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200)
                received += [m for ms in batches.values() for m in ms]
            return received
        finally:
            await consumer.stop()

    return asyncio.run(run())


def feed(bootstrap: str, topic: str, *args: str, database_url: str | None = None):
    env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CANDLEKEEP_TOPIC_TRADES": topic}
    if database_url:
        env["DATABASE_URL"] = database_url  # the feed records its reconnects there
    return CliRunner(env=env).invoke(cli, ["feed", *args], catch_exceptions=False)


def by_key(messages) -> dict[bytes, list[bytes]]:
    """Per key (symbol), the message values in order: the order that a partition keeps."""
    out: dict[bytes, list[bytes]] = {}
    for message in sorted(messages, key=lambda m: (m.partition, m.offset)):
        out.setdefault(message.key, []).append(message.value)
    return out


@pytest.mark.integration
def test_recorded_websocket_with_a_dropped_connection_produces_exactly_the_valid_trades(
    kafka_bootstrap, restore_logging
):
    frames = recorded_frames()
    expected = expected_from_recording()
    topic = f"t{uuid.uuid4().hex[:8]}.trades"
    with RecordedBinance(frames, drop_after=6) as server:
        url = f"ws://127.0.0.1:{server.port}"
        result = feed(
            kafka_bootstrap,
            topic,
            "binance",
            "--symbols",
            "btcusdt,ethusdt",
            "--url",
            url,
            "--max-trades",
            str(len(expected)),
        )
    assert result.exit_code == 0, result.output
    # Two connections (the first was dropped) to the combined trade stream of both symbols.
    assert server.paths == ["/stream?streams=btcusdt@trade/ethusdt@trade"] * 2
    assert server.sent == len(frames)
    assert "websocket disconnected: reconnecting" in result.output
    assert "malformed frame skipped" in result.output
    assert f"produced {len(expected)} trades" in result.output
    assert "2 malformed and 1 other frames skipped, 1 reconnects" in result.output

    received = read_topic(kafka_bootstrap, topic, len(expected))
    assert len(received) == len(expected)
    want: dict[bytes, list[dict]] = {}
    for key, value in expected:
        want.setdefault(key, []).append(value)
    assert {k: [json.loads(v) for v in vs] for k, vs in by_key(received).items()} == want
    for message in received:
        trade = parse_trade_message(message.value)
        assert not isinstance(trade, Rejection)
        assert message.key == trade.symbol.encode()


# -- replaying files ----------------------------------------------------------------------------

# Binance trades (id, price, qty, quote_qty, time, is_buyer_maker, is_best_match): microseconds,
# as in Binance's spot files from 2025, not all of them whole milliseconds.
TRADES_US = """\
4382153601,93576.00000000,0.00017000,15.90792000,1735689600011123,True,True
4382153602,93576.01000000,0.05325000,4982.92253250,1735689600011124,False,True
4382153603,93576.01000000,0.00110000,102.93361100,1735689600100000,False,True
4382153604,93575.99000000,0.00006000,5.61455940,1735689601387999,True,True
"""
# Binance aggTrades (id, price, qty, first, last, time, is_buyer_maker, is_best_match): ms.
AGGTRADES_MS = """\
13519807,0.00141342,23.00000000,15373518,15373518,1570752011620,True,True
13519808,0.00141266,54.00000000,15373519,15373519,1570752011620,True,True
13519809,0.00141266,8.10000000,15373520,15373520,1570752017964,False,True
"""


def file_trades(text: str, symbol: str, aggregated: bool) -> list[tuple]:
    """The trades of a Binance CSV, straight from its columns (independently of the reader)."""
    out = []
    for line in text.splitlines():
        cols = line.split(",")
        ts = int(cols[5] if aggregated else cols[4])
        ts_us = ts if ts >= 10**14 else ts * 1000
        maker = (cols[6] if aggregated else cols[5]) == "True"
        out.append(
            ("binance", symbol, int(cols[0]), ts_us, cols[1], cols[2], Decimal(cols[1]), maker)
        )
    return out


def as_tuple(message_value: bytes) -> tuple:
    obj = json.loads(message_value)
    trade = parse_trade_message(message_value)
    assert not isinstance(trade, Rejection), trade
    # The decimal strings are the file's own text; the parsed values are exact.
    assert Decimal(obj["price"]) == trade.price and Decimal(obj["quantity"]) == trade.quantity
    return (
        trade.exchange,
        trade.symbol,
        trade.trade_id,
        trade.ts_us,
        obj["price"],
        obj["quantity"],
        trade.price,
        trade.is_buyer_maker,
    )


def test_canonical_timestamps_and_encoding_are_exact():
    assert canonical_timestamp(1735689600011000) == 1735689600011
    assert canonical_timestamp(1735689600011123) == "2025-01-01T00:00:00.011123Z"
    assert canonical_timestamp(0) == 0
    trade = Trade("binance", "BTCUSDT", 5, 1735689600000001, Decimal("1E-8"), Decimal("2.50"))
    value = encode_trade(trade)
    assert json.loads(value) == {
        "exchange": "binance",
        "symbol": "BTCUSDT",
        "trade_id": 5,
        "price": "0.00000001",
        "quantity": "2.50",
        "timestamp": "2025-01-01T00:00:00.000001Z",
    }
    assert parse_trade_message(value) == trade
    messages = list(
        replay_messages(
            [trade, Trade("binance", "BTCUSDT", 6, 1735689602500001, Decimal(1), Decimal(1))]
        )
    )
    assert [m.send_at_s for m in messages] == [0.0, 2.5]
    assert {m.key for m in messages} == {b"BTCUSDT"}


@pytest.mark.integration
def test_replay_as_fast_as_possible_keeps_every_value_exact(kafka_bootstrap, tmp_path):
    trades_file = tmp_path / "BTCUSDT-trades-2025-01-01.csv"
    trades_file.write_text(TRADES_US)
    agg_file = tmp_path / "XRPETH-aggTrades-2019-10-11.csv"
    agg_file.write_text(AGGTRADES_MS)
    topic = f"t{uuid.uuid4().hex[:8]}.trades"
    result = feed(
        kafka_bootstrap, topic, "replay", str(trades_file), str(agg_file), "--as-fast-as-possible"
    )
    assert result.exit_code == 0, result.output
    want = file_trades(TRADES_US, "BTCUSDT", False) + file_trades(AGGTRADES_MS, "XRPETH", True)
    received = read_topic(kafka_bootstrap, topic, len(want))
    assert len(received) == len(want)
    got = {key: [as_tuple(v) for v in values] for key, values in by_key(received).items()}
    assert got == {
        b"BTCUSDT": [t for t in want if t[1] == "BTCUSDT"],
        b"XRPETH": [t for t in want if t[1] == "XRPETH"],
    }
    # Microseconds survive: the ones that are not whole milliseconds travel as ISO-8601.
    stamps = [json.loads(v)["timestamp"] for v in by_key(received)[b"BTCUSDT"]]
    assert stamps == [
        "2025-01-01T00:00:00.011123Z",
        "2025-01-01T00:00:00.011124Z",
        1735689600100,
        "2025-01-01T00:00:01.387999Z",
    ]


@pytest.mark.integration
def test_replay_keeps_the_pace_times_the_speed(kafka_bootstrap, tmp_path):
    # Five trades over 2 s of event time: at speed 4 that takes at least 0.5 s.
    lines = [
        f"{100 + i},1.5000,0.2500,0.375,{1735689600000 + i * 500},False,True" for i in range(5)
    ]
    path = tmp_path / "SOLUSDT-trades-2025-01-01.csv"
    path.write_text("\n".join(lines) + "\n")
    topic = f"t{uuid.uuid4().hex[:8]}.trades"
    started = time.monotonic()
    result = feed(kafka_bootstrap, topic, "replay", str(path), "--speed", "4")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert elapsed >= 0.4
    received = read_topic(kafka_bootstrap, topic, 5, settle_s=0.5)
    assert [parse_trade_message(m.value).trade_id for m in received] == [100, 101, 102, 103, 104]


def test_replay_options_are_checked(tmp_path):
    path = tmp_path / "SOLUSDT-trades-2025-01-01.csv"
    path.write_text("1,1.5,1,1.5,1735689600000,False,True\n")
    runner = CliRunner()
    both = runner.invoke(
        cli, ["feed", "replay", str(path), "--speed", "2", "--as-fast-as-possible"]
    )
    assert both.exit_code == 2 and "exclude each other" in both.output
    zero = runner.invoke(cli, ["feed", "replay", str(path), "--speed", "0"])
    assert zero.exit_code == 2 and "greater than 0" in zero.output
    missing = runner.invoke(cli, ["feed", "replay", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 1 and "no such file" in missing.output
    nameless = tmp_path / "trades.csv"
    nameless.write_text("1,1.5,1,1.5,1735689600000,False,True\n")
    no_symbol = runner.invoke(cli, ["feed", "replay", str(nameless)])
    assert no_symbol.exit_code == 1 and "--symbol" in no_symbol.output
