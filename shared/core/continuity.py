"""Trade-id continuity (SPEC §4): the holes in a symbol's trade ids, at venues whose ids are
consecutive.

At such a venue (Binance spot and USD-M, Kraken) each trade of a symbol gets the next id, and ids
grow with time. A hole in the ids a partition has seen is a trade the feed never delivered (a
WebSocket reconnect, a lost message), or one still on its way: the stream takes disorder up to
``max_delay``. So a hole becomes a :class:`Gap` only once the trade just above it, its *upper
neighbour*, is strictly older than the partition's watermark: the missing trades, older still,
would by now be late. (Strictly: a trade delayed by exactly ``max_delay`` is on time for the
windows, and makes no gap either.)

Per (exchange, symbol), of the exchanges given as consecutive only:

- the first trade seen starts the symbol: nothing before it is a gap (a feed joins the venue's
  sequence anywhere, and a disordered trade below that first one is simply old);
- the *contiguous point* is the greatest id up to which every id since the start has been seen
  (or given up on as a gap): an id at or below it is a duplicate or a late filler, never a gap;
- an id above it waits, with its timestamp, until the hole below it is filled or emitted. Only
  those are held, the trades of the last ``max_delay`` or so of event time: memory is bounded
  by the disorder, not by the stream.

Trades of every kind count (SPEC §2: a venue's non-market trades share its id sequence). The
watermark is passed in; nothing here reads a clock. The state snapshots to JSON-able data and is
restored exactly, so that it travels with its partition's window state (stream_progress).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared.core.trades import Trade

SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Gap:
    """Trade ids ``first_missing_id`` … ``last_missing_id`` of a symbol, never seen; the trades on
    either side were stamped ``before_ts_us`` and ``after_ts_us``, so the missing ones were too
    (ids grow with time), in between."""

    exchange: str
    symbol: str
    first_missing_id: int
    last_missing_id: int
    before_ts_us: int
    after_ts_us: int

    @property
    def missing(self) -> int:
        return self.last_missing_id - self.first_missing_id + 1


class _SymbolIds:
    """One symbol's contiguous point (``last``, stamped ``last_ts``) and the ids seen above it."""

    __slots__ = ("above", "last", "last_ts")

    def __init__(self, last: int, last_ts: int, above: dict[int, int] | None = None):
        self.last = last
        self.last_ts = last_ts
        self.above: dict[int, int] = above or {}  # id -> ts, every id > last + 1

    def absorb(self) -> None:
        """Move the contiguous point up over the ids that now follow it."""
        above = self.above
        following = self.last + 1
        while following in above:
            self.last_ts = above.pop(following)
            self.last = following
            following += 1


class IdContinuity:
    """The trade-id continuity of one partition's symbols (see the module docstring).

    :meth:`observe` the trades of each batch, in any order, then ask :meth:`gaps` with the
    watermark. ``exchanges``: the exchanges whose ids are consecutive per symbol; every other
    exchange's trades are ignored, never a gap.
    """

    def __init__(self, exchanges: Iterable[str]):
        self.exchanges = frozenset(exchanges)
        self._symbols: dict[tuple[str, str], _SymbolIds] = {}
        self._waiting: set[tuple[str, str]] = set()  # symbols with ids above a hole

    @property
    def held(self) -> int:
        """Ids held above a hole, waiting for it to be filled or to become a gap."""
        return sum(len(self._symbols[key].above) for key in self._waiting)

    def observe(self, trades: Iterable[Trade]) -> None:
        """Note the trades' ids (duplicates and ids at or below the contiguous point change
        nothing). A dict lookup per trade: the cost of continuity on the stream's path."""
        symbols = self._symbols
        exchanges = self.exchanges
        for trade in trades:
            key = (trade.exchange, trade.symbol)
            ids = symbols.get(key)
            trade_id = trade.trade_id
            if ids is None:
                if trade.exchange in exchanges:
                    symbols[key] = _SymbolIds(trade_id, trade.ts_us)
                continue
            if trade_id == ids.last + 1:
                ids.last = trade_id
                ids.last_ts = trade.ts_us
                if ids.above:
                    ids.absorb()
                    if not ids.above:
                        self._waiting.discard(key)
            elif trade_id > ids.last:
                ids.above.setdefault(trade_id, trade.ts_us)
                self._waiting.add(key)

    def next_due_us(self) -> int | None:
        """The least timestamp of an upper neighbour of a hole (None: no hole): :meth:`gaps`
        returns something once the watermark is above it."""
        due = None
        for key in self._waiting:
            above = self._symbols[key].above
            ts = above[min(above)]
            if due is None or ts < due:
                due = ts
        return due

    def gaps(self, watermark_us: int | None) -> list[Gap]:
        """The holes whose upper neighbour is strictly older than ``watermark_us``, as gaps
        (each once: the contiguous point moves past it), by symbol and id."""
        if watermark_us is None or not self._waiting:
            return []
        out: list[Gap] = []
        for key in sorted(self._waiting):
            ids = self._symbols[key]
            above = ids.above
            while above:
                upper = min(above)
                ts = above[upper]
                if ts >= watermark_us:
                    break
                out.append(Gap(key[0], key[1], ids.last + 1, upper - 1, ids.last_ts, ts))
                del above[upper]
                ids.last, ids.last_ts = upper, ts
                ids.absorb()
            if not above:
                self._waiting.discard(key)
        return out

    # -- snapshot / restore -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """All state as JSON-able data: per symbol its contiguous point and the ids above it."""
        return {
            "version": SNAPSHOT_VERSION,
            "symbols": [
                [exchange, symbol, ids.last, ids.last_ts, sorted(ids.above.items())]
                for (exchange, symbol), ids in sorted(self._symbols.items())
            ],
        }

    @classmethod
    def restore(cls, exchanges: Iterable[str], state: dict[str, Any] | None) -> IdContinuity:
        """Rebuild what :meth:`snapshot` described (``None``: a fresh start). Symbols of an
        exchange no longer given as consecutive are dropped; one added starts afresh."""
        continuity = cls(exchanges)
        if not state:
            return continuity
        if state.get("version") != SNAPSHOT_VERSION:
            raise ValueError(
                f"trade-id continuity state has version {state.get('version')!r}, "
                f"this candlekeep reads version {SNAPSHOT_VERSION}"
            )
        for exchange, symbol, last, last_ts, above in state["symbols"]:
            if exchange in continuity.exchanges:
                ids = _SymbolIds(last, last_ts, {i: ts for i, ts in above})
                continuity._symbols[(exchange, symbol)] = ids
                if ids.above:
                    continuity._waiting.add((exchange, symbol))
        return continuity

    def reset(self, state: dict[str, Any] | None) -> None:
        """Go back, in place, to the state a :meth:`snapshot` of this object returned."""
        other = IdContinuity.restore(self.exchanges, state)
        self._symbols, self._waiting = other._symbols, other._waiting
