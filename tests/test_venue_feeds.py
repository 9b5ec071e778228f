"""`feed binance --market spot|usdm` and `feed kraken` against the venue replay server: recorded
trades in the venues' frame formats, a dropped connection that loses K frames, a real broker."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from candlekeep.venue_replay import Faults, Recording, VenueReplay, load_recordings
from shared.core.trade_messages import parse_trade_message
from shared.store import db
from stream.feeds.binance import normalise_frame
from stream.feeds.kraken import normalise_message, parse_pairs
from stream.feeds.websocket import Skipped

from .streaming import reset_tables
from .test_feeds import by_key, feed, read_topic
from .test_feeds import restore_logging as restore_logging  # the fixture, used by name

DATA = Path(__file__).resolve().parent / "data" / "venues"


def usdm_trade_frames(symbol: str) -> list[str]:
    """The recorded USD-M aggTrades of ``symbol`` that are one trade each (f == l), as that
    trade's ``@trade`` frame (tests/data/venues/binance-usdm-ws/PROVENANCE.md)."""
    frames = []
    for line in (DATA / "binance-usdm-ws" / "aggtrade_frames.jsonl").read_text().splitlines():
        agg = json.loads(line)["data"]
        if agg["s"] != symbol or agg["f"] != agg["l"]:
            continue
        data = {"e": "trade", "E": agg["E"], "T": agg["T"], "s": agg["s"], "t": agg["f"]}
        data.update(p=agg["p"], q=agg["q"], X="MARKET", m=agg["m"])
        frames.append(json.dumps({"stream": f"{symbol.lower()}@trade", "data": data}))
    return frames


def expected(frames: list[str], skipped: range, exchange: str) -> list[dict]:
    """The canonical messages of the frames the feed was sent, straight from the frames."""
    out = []
    for n, frame in enumerate(frames):
        if n in skipped:
            continue
        data = json.loads(frame)["data"]
        out.append(
            {
                "exchange": exchange,
                "symbol": data["s"],
                "trade_id": data["t"],
                "price": data["p"],
                "quantity": data["q"],
                "timestamp": data["T"],
                "is_buyer_maker": data["m"],
                "kind": data.get("X", "MARKET").lower(),
            }
        )
    return out


def logged(output: str, event: str) -> list[dict]:
    """The feed's JSON log lines of ``event``."""
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def run_binance(
    kafka_bootstrap, venue: str, market: str, symbol: str, frames, drop, skip, database_url=None
):
    topic = f"t{uuid.uuid4().hex[:8]}.trades"
    with VenueReplay(
        {venue: Recording(frames=frames)}, Faults(drop_after=drop, skip=skip)
    ) as server:
        result = feed(
            kafka_bootstrap,
            topic,
            "binance",
            "--market",
            market,
            "--symbols",
            symbol,
            "--url",
            server.ws_url(venue),
            "--max-trades",
            str(len(frames) - skip),
            database_url=database_url,
        )
    assert result.exit_code == 0, result.output
    assert server.ws_paths == [f"/{venue}/stream?streams={symbol.lower()}@trade"] * 2
    received = read_topic(kafka_bootstrap, topic, len(frames) - skip, settle_s=0.5)
    # A market trade's message may leave its kind out (SPEC §2: the default).
    got = [{"kind": "market", **json.loads(v)} for v in by_key(received)[symbol.encode()]]
    return result, got


@pytest.mark.integration
@pytest.mark.parametrize(
    ("venue", "market", "symbol", "exchange"),
    [
        ("binance-usdm", "usdm", "CTKUSDT", "binance-usdm"),
        ("binance", "spot", "BTCUSDT", "binance"),
    ],
)
def test_binance_markets_through_a_dropped_connection(
    kafka_bootstrap, database_url, restore_logging, venue, market, symbol, exchange
):
    if market == "usdm":
        frames = usdm_trade_frames(symbol)
    else:
        frames = load_recordings()["binance"].frames[:60]
    drop, skip = 10, 3
    reset_tables(database_url)
    result, got = run_binance(
        kafka_bootstrap, venue, market, symbol, frames, drop, skip, database_url
    )
    assert got == expected(frames, range(drop, drop + skip), exchange)
    for message in got:
        trade = parse_trade_message(json.dumps(message))
        assert trade.kind == "market" and trade.price == Decimal(message["price"])
    before = json.loads(frames[drop - 1])["data"]["t"]
    after = json.loads(frames[drop + skip])["data"]["t"]
    [lost] = logged(result.output, "websocket disconnected: reconnecting")
    assert lost["last_trade_ids"] == {symbol: before}
    [back] = logged(result.output, "first trade after reconnect")
    assert (back["symbol"], back["last_trade_id_before"]) == (symbol, before)
    assert back["first_trade_id_after"] == after
    # ... and recorded for the report of its period (DATABASE_URL set).
    with db.connect(database_url) as conn:
        recorded = conn.execute(
            "SELECT exchange, symbol, last_id_before, first_id_after,"
            " reconnected_at >= disconnected_at FROM feed_reconnects"
        ).fetchall()
    assert recorded == [(exchange, symbol, before, after, True)]


@pytest.mark.integration
def test_kraken_feed_through_a_dropped_connection(kafka_bootstrap, restore_logging):
    recording = load_recordings()["kraken"]
    rows = recording.trades["XBTUSDT"][:40]
    frames = recording.frames[:40]
    drop, skip = 12, 4
    topic = f"t{uuid.uuid4().hex[:8]}.trades"
    replayed = {"kraken": Recording(frames=frames)}
    with VenueReplay(replayed, Faults(drop_after=drop, skip=skip)) as server:
        result = feed(
            kafka_bootstrap,
            topic,
            "kraken",
            "--symbols",
            "XBT/USDT",
            "--url",
            server.ws_url("kraken"),
            "--max-trades",
            str(len(frames) - skip),
        )
    assert result.exit_code == 0, result.output
    received = read_topic(kafka_bootstrap, topic, len(frames) - skip, settle_s=0.5)
    got = [parse_trade_message(v) for v in by_key(received)[b"BTC-USDT"]]
    sent = [r for n, r in enumerate(rows) if n not in range(drop, drop + skip)]
    assert [t.trade_id for t in got] == [r[6] for r in sent]
    for trade, row in zip(got, sent, strict=True):
        assert (trade.exchange, trade.symbol, trade.kind) == ("kraken", "BTC-USDT", "market")
        assert trade.price == Decimal(row[0]) and trade.quantity == Decimal(row[1])
        assert trade.ts_us == int(Decimal(str(row[2])) * 1_000_000)
        assert trade.is_buyer_maker is (row[3] == "s")
    [back] = logged(result.output, "first trade after reconnect")
    assert (back["symbol"], back["last_trade_id_before"]) == ("BTC-USDT", rows[drop - 1][6])
    assert back["first_trade_id_after"] == rows[drop + skip][6]
    assert back["missed"] == skip  # Kraken's ids are consecutive: the lost frames, counted


@pytest.mark.parametrize(
    ("x", "kind"),
    [("MARKET", "market"), ("INSURANCE_FUND", "insurance_fund"), ("ADL", "adl"), (None, "market")],
)
def test_usdm_trade_kinds_come_from_x(x, kind):
    # The shape of the recorded CTKUSDT trade above; no recording of a non-MARKET frame exists.
    data = {"e": "trade", "E": 1626992741575, "T": 1626992741421, "s": "CTKUSDT", "t": 23961322}
    data.update(p="1.01100", q="10", m=False)
    if x is not None:
        data["X"] = x
    message = normalise_frame(json.dumps({"data": data, "stream": "ctkusdt@trade"}), "binance-usdm")
    assert not isinstance(message, Skipped)
    trade = parse_trade_message(message.value)
    assert (trade.exchange, trade.kind, trade.price) == ("binance-usdm", kind, Decimal("1.01100"))
    bad = normalise_frame(json.dumps({"stream": "x", "data": {**data, "X": 5}}), "binance-usdm")
    assert isinstance(bad, Skipped) and "'X'" in bad.reason


def test_kraken_messages_and_pairs():
    assert parse_pairs("BTC/USD, xbt/usd,ETH/EUR") == ["BTC-USD", "ETH-EUR"]
    with pytest.raises(ValueError, match="not a Kraken pair"):
        parse_pairs("BTCUSD")
    assert [r.kind for r in normalise_message('{"channel":"heartbeat"}')] == ["ignored"]
    assert normalise_message("{nope")[0].kind == "malformed"
    bad = normalise_message(
        '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"up",'
        '"price":1,"qty":1,"trade_id":1,"timestamp":"2025-01-01T00:00:00Z"}]}'
    )
    assert bad[0].kind == "malformed" and "side" in bad[0].reason
