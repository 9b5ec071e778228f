"""Candle intervals: epoch-aligned, half-open windows, one base interval and its multiples.

Every window is ``[start, start + length)`` with ``start`` a multiple of ``length`` counted from
the Unix epoch in UTC. The smallest configured interval is the *base*; every other interval must
be a whole multiple of it, so that a larger candle is always the merge of whole base candles.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

US_PER_SECOND = 1_000_000
US_PER_MS = 1_000

#: Every interval candlekeep supports, by name, in microseconds.
SUPPORTED: dict[str, int] = {
    "1m": 60 * US_PER_SECOND,
    "5m": 5 * 60 * US_PER_SECOND,
    "15m": 15 * 60 * US_PER_SECOND,
    "1h": 3600 * US_PER_SECOND,
    "4h": 4 * 3600 * US_PER_SECOND,
    "1d": 86400 * US_PER_SECOND,
}
DEFAULT_INTERVALS = ("1m", "5m", "15m", "1h")


class IntervalError(ValueError):
    """A configured interval name or combination is not usable."""


def window_start(ts_us: int, length_us: int) -> int:
    """Start of the epoch-aligned window of ``length_us`` holding ``ts_us``: the one place that
    says where windows begin (:meth:`Interval.window_start` and the stream's windows call it;
    ``CandleBook.add_rows`` writes it out, measured, and a test holds it to this). Floor
    division keeps pre-epoch times in the window below them."""
    return ts_us - ts_us % length_us


@dataclass(frozen=True, order=True)
class Interval:
    """One candle interval: its length (for ordering) and its name (``1m`` …)."""

    length_us: int
    name: str

    def window_start(self, ts_us: int) -> int:
        """Start of this interval's window holding ``ts_us`` (see :func:`window_start`)."""
        return window_start(ts_us, self.length_us)

    def __str__(self) -> str:
        return self.name


def interval(name: str) -> Interval:
    """The interval called ``name``; raises :class:`IntervalError` naming the supported ones."""
    if "M" in name:
        # Binance's vocabulary (which the klines output follows) has 1m for a minute and 1M
        # for a month: lower-casing would silently turn a month into a minute.
        raise IntervalError(
            f"unknown interval {name!r}: in Binance's vocabulary 1M is a month, which "
            f"candlekeep does not make; use one of {' '.join(SUPPORTED)} (minutes are a "
            "lower-case m)"
        )
    key = name.strip().lower()
    if key not in SUPPORTED:
        raise IntervalError(f"unknown interval {name!r}: use one of {', '.join(SUPPORTED)}")
    return Interval(SUPPORTED[key], key)


@dataclass(frozen=True)
class IntervalSet:
    """The configured intervals, smallest (the base) first."""

    intervals: tuple[Interval, ...]

    @classmethod
    def parse(cls, names: str | Iterable[str]) -> IntervalSet:
        """Parse ``"1m,5m"`` or ``["1m", "5m"]``; checks that each is a multiple of the base."""
        if isinstance(names, str):
            names = [n for n in names.split(",") if n.strip()]
        chosen = sorted({interval(n) for n in names})
        if not chosen:
            raise IntervalError("no interval given: use one or more of " + ", ".join(SUPPORTED))
        base = chosen[0]
        for other in chosen[1:]:
            if other.length_us % base.length_us:
                raise IntervalError(
                    f"interval {other.name} is not a whole multiple of the base interval "
                    f"{base.name}"
                )
        return cls(tuple(chosen))

    @property
    def base(self) -> Interval:
        return self.intervals[0]

    @property
    def larger(self) -> tuple[Interval, ...]:
        """Every interval but the base: these are merged from base candles."""
        return self.intervals[1:]

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.intervals]

    def by_name(self, name: str) -> Interval:
        for i in self.intervals:
            if i.name == name:
                return i
        raise IntervalError(f"interval {name!r} is not configured ({', '.join(self.names)})")
