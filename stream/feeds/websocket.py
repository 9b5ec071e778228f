"""The one reconnecting WebSocket loop of the venue feeds (``feed binance``, ``feed kraken``).

A venue's WebSocket drops (Binance also closes every connection after 24 hours); the trades sent
while it was down are lost, so the loop reconnects at once with exponential backoff and jitter,
never gives up while it is wanted, and says where the hole may be: the last trade id before and
the first after, per symbol (:class:`~stream.feeds.reconnects.ReconnectLog`, and
``feed_reconnects`` where the feed has a database). What differs between venues is only how a
connection is opened (a URL that names the streams, or a subscribe message) and how a frame
reads: ``read_frame`` turns one frame into trade messages and :class:`Skipped` frames.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from stream.feeds.produce import FeedError, FeedMessage
from stream.feeds.reconnects import ReconnectLog, Record


@dataclass(frozen=True)
class Skipped:
    """A frame that is not a trade: ``ignored`` (another event, a control reply) or
    ``malformed`` (not what the venue documents), with the reason."""

    kind: str
    reason: str


@dataclass
class FeedStats:
    frames: int = 0
    trades: int = 0
    ignored: int = 0
    malformed: int = 0
    connects: int = 0
    reconnects: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)


def backoff_delay(attempt: int, initial_s: float, max_s: float, rnd: random.Random) -> float:
    """Exponential backoff with jitter: half the capped exponential step, plus a random part
    of the other half (so reconnecting clients spread out, and no delay is ever zero)."""
    step = min(max_s, initial_s * 2 ** max(0, attempt - 1))
    return step / 2 + rnd.uniform(0, step / 2)


async def websocket_trades(
    url: str,
    read_frame: Callable[[str | bytes], Iterable[FeedMessage | Skipped]],
    *,
    log: structlog.typing.FilteringBoundLogger,
    subscribe: str | None = None,
    symbols: Sequence[str] | None = None,
    stats: FeedStats | None = None,
    max_trades: int | None = None,
    initial_backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    open_timeout_s: float = 10.0,
    max_size: int = 1 << 20,
    seed: int | None = None,
    record_reconnect: Record | None = None,
) -> AsyncIterator[FeedMessage]:
    """Trade messages from the WebSocket at ``url`` (``subscribe`` sent on each connect),
    reconnecting for ever (or until ``max_trades`` trades). Malformed frames are logged and
    skipped. ``symbols``: whose last ids a disconnect logs (None: every symbol seen)."""
    stats = stats if stats is not None else FeedStats()
    reconnects = ReconnectLog(log, record_reconnect)
    rnd = random.Random(seed)
    attempt = 0  # failed connections in a row
    where = redacted(url)
    while True:
        error: str
        try:
            async with connect(
                url, open_timeout=open_timeout_s, max_size=max_size, ping_interval=20
            ) as ws:
                stats.connects += 1
                if subscribe is not None:
                    await ws.send(subscribe)
                log.info("websocket connected", url=where, connects=stats.connects)
                async for frame in ws:
                    stats.frames += 1
                    for result in read_frame(frame):
                        if isinstance(result, Skipped):
                            _skipped(log, stats, result, frame)
                            continue
                        attempt = 0  # a trade came through: the connection is healthy
                        stats.trades += 1
                        reconnects.trade(result.key.decode(), result.trade_id)
                        yield result
                        if max_trades is not None and stats.trades >= max_trades:
                            return
                error = "closed by the server"
        except InvalidURI as exc:
            raise FeedError(f"{where} is not a WebSocket URL: {exc}") from None
        except ConnectionClosed as exc:
            error = f"connection lost: {exc}"
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempt += 1
        stats.reconnects += 1
        delay = backoff_delay(attempt, initial_backoff_s, max_backoff_s, rnd)
        log.warning(
            "websocket disconnected: reconnecting",
            url=where,
            error=error,
            last_trade_ids=reconnects.reconnecting(
                reconnects.last_ids if symbols is None else symbols
            ),
            attempt=attempt,
            delay_s=round(delay, 3),
            reconnects=stats.reconnects,
        )
        await asyncio.sleep(delay)


def _skipped(log, stats: FeedStats, skipped: Skipped, frame: str | bytes) -> None:
    if skipped.kind == "ignored":
        stats.ignored += 1
        log.debug("frame ignored", reason=skipped.reason)
        return
    stats.malformed += 1
    stats.skipped_reasons[skipped.reason] = stats.skipped_reasons.get(skipped.reason, 0) + 1
    text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
    log.warning("malformed frame skipped", reason=skipped.reason, frame=text[:200])


def redacted(url: str) -> str:
    """The URL without its query (where a key could be) for the logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else url
