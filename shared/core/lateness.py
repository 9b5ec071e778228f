"""Lateness advice (SPEC §6.2): how late a symbol's late trades were, and the ``max_delay`` and
``allowed_lateness`` that would have kept them under the configured late-trade rate.

A trade is late when the watermark had reached its base window's end plus ``allowed_lateness``
when it arrived (``shared.core.windows``): its *lateness* ``L`` (watermark − window end) was at
least ``allowed_lateness``. Its *excess* ``x = L − allowed_lateness`` is how much more it needed:

- ``max_delay`` longer by ``e`` holds every watermark back by ``e``, so the trade would have
  been on time iff ``L − e < allowed_lateness``, i.e. ``x < e``;
- ``allowed_lateness`` longer by ``e`` keeps the window open until ``L < allowed_lateness + e``:
  the same condition.

So one number, the extra time ``e``, answers both: the least ``e`` such that at most ``k`` trades
have ``x ≥ e``, where ``k`` is the most late trades the rate allows (``k / trades ≤ rate``, the
verdict's own test). With the excesses sorted from the largest, that is ``0`` if there are at
most ``k``, else the ``(k+1)``-th largest plus one microsecond (the unit of every time here).
Longer ``max_delay`` delays every candle by ``e``; longer ``allowed_lateness`` publishes on time
and revises the candle when a late trade comes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LatenessAdvice:
    """One symbol's late trades of a period, and the settings that would have kept them under
    the rate (times in microseconds)."""

    trades: int
    late: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    extra_us: int  # the least extra time that meets the rate (0: the settings did)
    max_delay_us: int  # max_delay + extra, allowed_lateness unchanged
    allowed_lateness_us: int  # allowed_lateness + extra, max_delay unchanged


def allowed_late(trades: int, max_rate: float) -> int:
    """The most late trades out of ``trades`` whose rate is not above ``max_rate`` (the
    verdict's test, ``late / trades > max_rate``, in the same floating point)."""
    if trades <= 0:
        return 0
    k = max(0, min(trades, int(max_rate * trades)))
    while k < trades and (k + 1) / trades <= max_rate:
        k += 1
    while k > 0 and k / trades > max_rate:
        k -= 1
    return k


def least_extra(excess_us: Sequence[int], trades: int, max_rate: float) -> int:
    """The least extra time ``e`` (µs) with at most :func:`allowed_late` of the excesses ``≥ e``."""
    k = allowed_late(trades, max_rate)
    if len(excess_us) <= k:
        return 0
    ranked = sorted(excess_us, reverse=True)
    return ranked[k] + 1


def _percentile(ranked: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not ranked:
        return 0
    rank = max(1, -(-len(ranked) * q // 1))  # ceil(n * q), at least 1
    return ranked[int(rank) - 1]


def advise(
    lateness_us: Sequence[int],
    trades: int,
    max_rate: float,
    max_delay_us: int,
    allowed_lateness_us: int,
) -> LatenessAdvice:
    """The advice for one symbol: ``lateness_us`` of its late trades (watermark − window end on
    arrival), ``trades`` its trades in the period, the rate and the current settings."""
    ranked = sorted(lateness_us)
    excess = [max(0, value - allowed_lateness_us) for value in ranked]
    extra = least_extra(excess, max(trades, len(ranked)), max_rate)
    return LatenessAdvice(
        trades=trades,
        late=len(ranked),
        p50_us=_percentile(ranked, 0.5),
        p90_us=_percentile(ranked, 0.9),
        p99_us=_percentile(ranked, 0.99),
        max_us=ranked[-1] if ranked else 0,
        extra_us=extra,
        max_delay_us=max_delay_us + extra,
        allowed_lateness_us=allowed_lateness_us + extra,
    )
