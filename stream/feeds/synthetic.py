"""A seeded synthetic market with dials for disorder, late, duplicate and invalid messages.

Pure: :func:`synthetic_messages` yields the messages in the order they are to be sent, each with
the wall-clock offset (seconds from the feed's start, at real pace) to send it at. The same seed
and dials give the same messages, byte for byte.

Event time advances by exponential gaps (``rate`` trades a second across all symbols). A
*disordered* trade is sent up to ``disorder_max`` later than its timestamp says (within
``max_delay`` it is still on time); a *late* trade is held back ``late_by`` (well past its
window's close); a *duplicate* repeats an earlier message byte for byte; an *invalid* message is
drawn from a corpus of malformed kinds.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import msgspec

from shared.core.trade_messages import encode_trade
from shared.core.trades import Trade
from stream.feeds.produce import FeedMessage

_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class MarketDials:
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    #: Relative trading activity per symbol (None: equal); a small weight makes an illiquid
    #: symbol, whose windows often hold a single trade.
    weights: tuple[float, ...] | None = None
    start_us: int = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
    count: int = 10_000
    rate: float = 20.0  # trades per second of event time, all symbols together
    disorder: float = 0.05
    disorder_max_s: float = 2.0
    late: float = 0.002
    late_by_s: float = 180.0
    duplicates: float = 0.01
    invalid: float = 0.005
    seed: int = 42
    exchange: str = "binance"
    #: (symbol, first trade id, how many): trades the feed loses on the way, as a WebSocket
    #: reconnect does (with their duplicates). Every other message is the same as without it.
    lost: tuple[str, int, int] | None = None


_START_PRICES = {"BTC": Decimal("65000.00"), "ETH": Decimal("3200.00"), "SOL": Decimal("150.000")}


def synthetic_messages(dials: MarketDials) -> Iterator[FeedMessage]:
    """Every message of the synthetic market, in send order (less the ``lost`` trades)."""
    messages = _market_messages(dials)
    if dials.lost is None:
        return messages
    symbol, first, count = dials.lost
    key = symbol.encode()
    return (
        m
        for m in messages
        if not (m.key == key and m.trade_id is not None and 0 <= m.trade_id - first < count)
    )


def _market_messages(dials: MarketDials) -> Iterator[FeedMessage]:
    """Every message of the market: the RNG's draws never depend on what a feed loses."""
    rnd = random.Random(dials.seed)
    prices = {s: _START_PRICES.get(s[:3], Decimal("10.0000")) for s in dials.symbols}
    next_id = dict.fromkeys(dials.symbols, 1)
    pending: list[tuple[float, int, FeedMessage]] = []  # heap by send time
    seq = 0
    ts_us = dials.start_us
    sent: list[FeedMessage] = []  # recent messages, for duplicates
    for _ in range(dials.count):
        ts_us += max(1, int(rnd.expovariate(dials.rate) * 1_000_000))
        symbol = (
            rnd.choices(dials.symbols, dials.weights)[0]
            if dials.weights
            else rnd.choice(dials.symbols)
        )
        price = _walk(rnd, prices[symbol])
        prices[symbol] = price
        trade_id = next_id[symbol]
        next_id[symbol] += 1
        quantity = Decimal(rnd.randint(1, 50_000)).scaleb(-4)
        # Most trades are stamped in whole milliseconds (the venue truncates), the rest in
        # ISO-8601 with their microseconds: the parser meets both spellings.
        in_ms = rnd.random() < 0.8
        trade = Trade(
            dials.exchange,
            symbol,
            trade_id,
            ts_us - ts_us % 1000 if in_ms else ts_us,
            price,
            quantity,
            rnd.random() < 0.5,
        )
        value = encode_trade(trade, iso_timestamp=not in_ms)
        event_s = (ts_us - dials.start_us) / 1_000_000
        draw = rnd.random()
        if draw < dials.late:
            send_at, kind = event_s + dials.late_by_s * (1 + rnd.random()), "late"
        elif draw < dials.late + dials.disorder:
            send_at, kind = event_s + rnd.uniform(0, dials.disorder_max_s), "disordered"
        else:
            send_at, kind = event_s, "trade"
        message = FeedMessage(send_at, symbol.encode(), value, kind, trade_id)
        heapq.heappush(pending, (send_at, seq, message))
        seq += 1
        if rnd.random() < dials.invalid:
            bad_key, bad_value = _malformed(rnd, symbol, ts_us)
            heapq.heappush(
                pending, (event_s, seq, FeedMessage(event_s, bad_key, bad_value, "invalid"))
            )
            seq += 1
        while pending and pending[0][0] <= event_s:
            message = heapq.heappop(pending)[2]
            yield message
            sent.append(message)
            if len(sent) > 1000:
                del sent[:500]
            if message.kind != "invalid" and rnd.random() < dials.duplicates:
                copy = rnd.choice(sent)
                if copy.kind != "invalid":
                    again = event_s + rnd.uniform(0, 5)
                    heapq.heappush(
                        pending,
                        (
                            again,
                            seq,
                            FeedMessage(again, copy.key, copy.value, "duplicate", copy.trade_id),
                        ),
                    )
                    seq += 1
    while pending:
        yield heapq.heappop(pending)[2]


def _walk(rnd: random.Random, price: Decimal) -> Decimal:
    """One tick of a random walk, kept on the price's own tick size and above zero."""
    tick = Decimal(1).scaleb(price.as_tuple().exponent)
    step = rnd.choice((-3, -2, -1, -1, 0, 0, 1, 1, 2, 3)) * tick * max(1, int(price / 5000))
    return max(price + step, tick)


def _malformed(rnd: random.Random, symbol: str, ts_us: int) -> tuple[bytes | None, bytes]:
    """One malformed message, of a kind drawn at random (see docs/trades.md for the reasons)."""
    key = symbol.encode()
    good = {
        "symbol": symbol,
        "trade_id": 1,
        "price": "1.5",
        "quantity": "2",
        "timestamp": ts_us // 1000,
    }
    kinds = [
        lambda: (key, b"\xff\xfe not utf-8"),
        lambda: (key, b"{not json"),
        lambda: (key, b"[1, 2, 3]"),
        lambda: (key, _json.encode({**good, "price": "NaN"})),
        lambda: (key, _json.encode({**good, "quantity": "-1"})),
        lambda: (key, _json.encode({**good, "price": 0})),
        lambda: (key, _json.encode({k: v for k, v in good.items() if k != "trade_id"})),
        lambda: (key, _json.encode({**good, "trade_id": "seven"})),
        lambda: (key, _json.encode({**good, "timestamp": -5})),
        lambda: (key, _json.encode({**good, "timestamp": ts_us * 1000})),  # ns, not ms
        lambda: (None, _json.encode(good)),  # null key
        lambda: (key, b'{"a":' * 600 + b"1" + b"}" * 600),
    ]
    return rnd.choice(kinds)()
