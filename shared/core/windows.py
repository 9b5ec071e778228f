"""Event-time windows of one Kafka partition: the watermark clock and the open candles (SPEC §4).

The watermark of a partition is the greatest trade timestamp seen in it minus ``max_delay``.
While the partition is caught up (its consumer is at the end of the log) and nothing has arrived
for ``idle_timeout``, the watermark also moves with the wall clock: greatest timestamp seen +
wall time elapsed since it was seen − ``max_delay``. It never moves backwards.

A base window ``[s, e)`` closes when the watermark reaches ``e``: its candle is emitted with
revision 0, and it is merged into the larger windows that contain it; a larger window closes
(and is emitted) when the watermark reaches its end, i.e. when all its base windows are closed.
With ``allowed_lateness`` a closed window still takes trades until the watermark reaches
``e + allowed_lateness``; each update re-emits the candle (and the larger candles containing it)
with the revision bumped. A trade whose base window is past that point when it arrives is *late*:
it changes no candle and is returned as a :class:`LateTrade`.

Time is passed in (``now_us``, wall-clock microseconds); nothing here reads a clock. All state can
be snapshotted to plain JSON-able data and restored exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any

from shared.core.candles import DECIMAL_FIELDS, EXACT, Candle, fold, open_candle, widen
from shared.core.intervals import IntervalSet, window_start
from shared.core.trades import MARKET, Trade

SNAPSHOT_VERSION = 1


class StateMismatch(ValueError):
    """A snapshot was taken with settings that differ from the current ones."""


@dataclass(frozen=True)
class WindowSettings:
    """What the windowing of a partition depends on (all durations in microseconds)."""

    intervals: IntervalSet
    max_delay_us: int = 5_000_000
    allowed_lateness_us: int = 0
    idle_timeout_us: int = 5_000_000

    def fingerprint(self) -> dict[str, Any]:
        """The settings a snapshot must agree with to be restored."""
        return {
            "intervals": self.intervals.names,
            "allowed_lateness_us": self.allowed_lateness_us,
        }


@dataclass(slots=True)
class LateTrade:
    """A trade that arrived after its base window had closed (beyond allowed lateness).

    ``lateness_us`` is how far past the window's end the watermark already was on arrival.
    """

    trade: Trade
    watermark_us: int
    window_start_us: int
    lateness_us: int


@dataclass(slots=True)
class Emission:
    """What one step produced: candles closed for the first time (revision 0) or revised
    (revision > 0), and late trades."""

    candles: list[Candle] = field(default_factory=list)
    late: list[LateTrade] = field(default_factory=list)

    def extend(self, other: Emission) -> None:
        self.candles.extend(other.candles)
        self.late.extend(other.late)


@dataclass(slots=True)
class WatermarkClock:
    """The watermark of one partition, with idle advance (see the module docstring)."""

    max_delay_us: int
    idle_timeout_us: int
    watermark_us: int | None = None
    max_ts_us: int | None = None
    max_ts_seen_at_us: int | None = None
    last_arrival_at_us: int | None = None

    def observe(self, ts_us: int, now_us: int) -> None:
        """A trade stamped ``ts_us`` arrived at wall time ``now_us``."""
        self.last_arrival_at_us = now_us
        if self.max_ts_us is None or ts_us > self.max_ts_us:
            self.max_ts_us = ts_us
            self.max_ts_seen_at_us = now_us
            self._raise_to(ts_us - self.max_delay_us)

    def idle_advance(self, now_us: int, caught_up: bool) -> None:
        """Let event time follow the wall clock while the partition is caught up and quiet."""
        if not caught_up or self.max_ts_us is None:
            return
        assert self.last_arrival_at_us is not None and self.max_ts_seen_at_us is not None
        if now_us - self.last_arrival_at_us < self.idle_timeout_us:
            return
        elapsed = max(0, now_us - self.max_ts_seen_at_us)
        self._raise_to(self.max_ts_us + elapsed - self.max_delay_us)

    def _raise_to(self, candidate: int) -> None:
        if self.watermark_us is None or candidate > self.watermark_us:
            self.watermark_us = candidate

    def snapshot(self) -> dict[str, Any]:
        return {
            "watermark_us": self.watermark_us,
            "max_ts_us": self.max_ts_us,
            "max_ts_seen_at_us": self.max_ts_seen_at_us,
            "last_arrival_at_us": self.last_arrival_at_us,
        }


@dataclass(slots=True)
class _SymbolWindows:
    """Open and not-yet-final windows of one (exchange, symbol)."""

    bases: dict[int, Candle] = field(default_factory=dict)
    larger: dict[tuple[str, int], Candle] = field(default_factory=dict)
    dirty_bases: set[int] = field(default_factory=set)
    dirty_larger: set[tuple[str, int]] = field(default_factory=set)


class PartitionWindows:
    """The watermark and the open candles of one partition.

    Callers pass each trade once: duplicates are removed before (the stream's store is the
    authority on them, since a duplicate may arrive long after its window was dropped).
    """

    def __init__(self, settings: WindowSettings):
        self.settings = settings
        self.clock = WatermarkClock(settings.max_delay_us, settings.idle_timeout_us)
        self._symbols: dict[tuple[str, str], _SymbolWindows] = {}
        self._closed_through_us: int | None = None

    @property
    def watermark_us(self) -> int | None:
        return self.clock.watermark_us

    @property
    def open_window_count(self) -> int:
        return sum(len(s.bases) + len(s.larger) for s in self._symbols.values())

    def has_closable_windows(self) -> bool:
        """True while some window still waits for the watermark to reach its end."""
        return bool(self._symbols)

    def process(self, trades: Iterable[Trade], now_us: int) -> Emission:
        """Apply trades in arrival order; return closed/revised candles and late trades.

        The watermark before each trade decides whether it is late; the clock then observes it.
        The exact context is entered once for the whole batch, as :func:`fold` needs.
        """
        emission = Emission()
        base = self.settings.intervals.base
        base_len = base.length_us
        larger = self.settings.intervals.larger
        lateness = self.settings.allowed_lateness_us
        clock = self.clock
        observe = clock.observe
        symbols = self._symbols
        touched: set[tuple[str, str]] = set()
        with localcontext(EXACT):
            for trade in trades:
                ts = trade.ts_us
                if trade.kind != MARKET:
                    observe(ts, now_us)  # a trade at the venue: event time moved on
                    continue  # stored, never folded nor late (SPEC §2 ``kind``)
                start = window_start(ts, base_len)
                wm = clock.watermark_us
                if wm is not None and start + base_len + lateness <= wm:
                    emission.late.append(LateTrade(trade, wm, start, wm - (start + base_len)))
                else:
                    key = (trade.exchange, trade.symbol)
                    windows = symbols.get(key)
                    if windows is None:
                        windows = symbols[key] = _SymbolWindows()
                    candle = windows.bases.get(start)
                    if candle is None:
                        windows.bases[start] = open_candle(trade, base)
                    else:
                        # Fields passed one by one: a tuple of them and a *call cost more
                        # than the fold.
                        trade_id, price, quantity = trade.trade_id, trade.price, trade.quantity
                        side, raw = trade.is_buyer_maker, trade.raw_trades
                        fold(candle, trade_id, ts, price, quantity, side, raw)
                        if candle.revision >= 0:
                            # Already closed and merged into its larger windows: update those.
                            windows.dirty_bases.add(start)
                            for interval in larger:
                                lkey = (interval.name, interval.window_start(start))
                                fold(windows.larger[lkey], trade_id, ts, price, quantity, side, raw)
                                windows.dirty_larger.add(lkey)
                    touched.add(key)
                observe(ts, now_us)
        emission.candles = self._close(touched, clock.watermark_us)
        return emission

    def advance(self, now_us: int, caught_up: bool) -> Emission:
        """Idle advance (SPEC §4): close what the wall clock lets close while the log is quiet."""
        self.clock.idle_advance(now_us, caught_up)
        return Emission(self._close(set(), self.clock.watermark_us))

    def flush(self) -> Emission:
        """End of input: close every window now, whatever the watermark."""
        candles = self._close(set(self._symbols), None, everything=True)
        self._symbols.clear()
        return Emission(candles)

    # -- closing ------------------------------------------------------------------------------

    def _close(
        self, touched: set[tuple[str, str]], wm: int | None, everything: bool = False
    ) -> list[Candle]:
        if wm is None and not everything:
            return []
        base_len = self.settings.intervals.base.length_us
        if everything:
            keys: Iterable[tuple[str, str]] = list(self._symbols)
        else:
            assert wm is not None
            boundary = window_start(wm, base_len)
            if self._closed_through_us is None or boundary > self._closed_through_us:
                # The watermark crossed a base boundary: any symbol may have windows to close.
                self._closed_through_us = boundary
                keys = list(self._symbols)
            else:
                keys = touched
        out: list[Candle] = []
        for key in sorted(keys):  # deterministic output order, before and after a restore
            windows = self._symbols.get(key)
            if windows is not None:
                self._close_symbol(windows, wm, out)
                if not windows.bases and not windows.larger:
                    del self._symbols[key]
        return out

    def _close_symbol(self, windows: _SymbolWindows, wm: int | None, out: list[Candle]) -> None:
        intervals = self.settings.intervals
        base_len = intervals.base.length_us
        lateness = self.settings.allowed_lateness_us
        final = wm is None  # flush: everything closes and is final
        for start in sorted(windows.bases):
            end = start + base_len
            if not final and end > wm:
                break  # this and every later base window are still open
            candle = windows.bases[start]
            if candle.revision < 0:
                candle.revision = 0
                out.append(candle.copy())
                for interval in intervals.larger:
                    lkey = (interval.name, interval.window_start(start))
                    merged = windows.larger.get(lkey)
                    if merged is None:
                        windows.larger[lkey] = widen(candle, interval)
                    else:
                        merged.absorb(candle)
                        if merged.revision >= 0:  # a base window first filled during lateness
                            windows.dirty_larger.add(lkey)
            elif start in windows.dirty_bases:
                candle.revision += 1
                out.append(candle.copy())
            if final or end + lateness <= wm:
                del windows.bases[start]
        windows.dirty_bases.clear()
        order = sorted(windows.larger, key=lambda k: (k[1], intervals.by_name(k[0]).length_us))
        for lkey in order:
            name, start = lkey
            end = start + intervals.by_name(name).length_us
            if not final and end > wm:
                continue
            candle = windows.larger[lkey]
            if candle.revision < 0:
                candle.revision = 0
                out.append(candle.copy())
            elif lkey in windows.dirty_larger:
                candle.revision += 1
                out.append(candle.copy())
            if final or end + lateness <= wm:
                del windows.larger[lkey]
        windows.dirty_larger.clear()

    # -- snapshot / restore -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """All state as JSON-able data (decimals as strings); see :meth:`restore`."""
        symbols = []
        for (exchange, symbol), windows in sorted(self._symbols.items()):
            symbols.append(
                {
                    "exchange": exchange,
                    "symbol": symbol,
                    "bases": [candle_to_state(c) for _, c in sorted(windows.bases.items())],
                    "larger": [candle_to_state(c) for _, c in sorted(windows.larger.items())],
                }
            )
        return {
            "version": SNAPSHOT_VERSION,
            "settings": self.settings.fingerprint(),
            "clock": self.clock.snapshot(),
            "closed_through_us": self._closed_through_us,
            "symbols": symbols,
        }

    def reset(self, state: dict[str, Any] | None) -> None:
        """Go back, in place, to the state a :meth:`snapshot` of this object returned."""
        other = PartitionWindows.restore(self.settings, state)
        self.clock = other.clock
        self._symbols = other._symbols
        self._closed_through_us = other._closed_through_us

    @classmethod
    def restore(cls, settings: WindowSettings, state: dict[str, Any] | None) -> PartitionWindows:
        """Rebuild exactly the windows a :meth:`snapshot` described (``None``: a fresh start)."""
        windows = cls(settings)
        if not state:
            return windows
        if state.get("version") != SNAPSHOT_VERSION:
            raise StateMismatch(
                f"window state has version {state.get('version')!r}, "
                f"this candlekeep reads version {SNAPSHOT_VERSION}"
            )
        saved = state["settings"]
        if saved != settings.fingerprint():
            raise StateMismatch(
                f"the stored window state was written with intervals "
                f"{','.join(saved['intervals'])} and allowed lateness "
                f"{saved['allowed_lateness_us'] / 1e6:g}s, but the worker is configured with "
                f"{','.join(settings.intervals.names)} and "
                f"{settings.allowed_lateness_us / 1e6:g}s: restore the old settings, or let "
                f"the old worker drain before changing them"
            )
        clock = state["clock"]
        windows.clock.watermark_us = clock["watermark_us"]
        windows.clock.max_ts_us = clock["max_ts_us"]
        windows.clock.max_ts_seen_at_us = clock["max_ts_seen_at_us"]
        windows.clock.last_arrival_at_us = clock["last_arrival_at_us"]
        windows._closed_through_us = state["closed_through_us"]
        for entry in state["symbols"]:
            sw = _SymbolWindows()
            for raw in entry["bases"]:
                candle = candle_from_state(raw)
                sw.bases[candle.window_start_us] = candle
            for raw in entry["larger"]:
                candle = candle_from_state(raw)
                sw.larger[(candle.interval, candle.window_start_us)] = candle
            windows._symbols[(entry["exchange"], entry["symbol"])] = sw
        return windows


def candle_to_state(candle: Candle) -> dict[str, Any]:
    """A candle as JSON-able data, decimals as exact strings."""
    out: dict[str, Any] = {}
    for name in Candle.__slots__:  # type: ignore[attr-defined]
        value = getattr(candle, name)
        out[name] = str(value) if isinstance(value, Decimal) else value
    return out


def candle_from_state(data: dict[str, Any]) -> Candle:
    values = {
        name: (Decimal(v) if name in DECIMAL_FIELDS and v is not None else v)
        for name, v in data.items()
    }
    return Candle(**values)
