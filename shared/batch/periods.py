"""A run's *period* ``[start, end)``: read from a command line, a DAG run's params or its data
interval, checked, in UTC (``interval`` is kept for candle lengths, ``1m``). One place, so that
``candlekeep reconcile``/``repair``/``report`` and the DAG accept and refuse the same periods."""

from __future__ import annotations

import re
from datetime import datetime

from shared.core.trades import parse_timestamp, ts_to_datetime


class PeriodError(ValueError):
    """A run's period ``[start, end)`` that is missing, reversed, or not made of times."""


TIME_EXAMPLES = "e.g. 2026-01-01T00:00Z, 2026-01-01T00:00:00+00:00 or 2026-01-01T02:00+02:00"


def parse_instant(name: str, text: str) -> int:
    """A time given on a command line or in a run's params, in epoch microseconds.

    Python's own words for a bad time ("Invalid isoformat string", "offset must be a timedelta
    strictly between…") are not for a person: the error says what the value is not and shows
    the forms that work.
    """
    value = text.strip()
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        if value.lstrip("-").isdigit():
            why = "a number, not a time (epoch numbers are not taken: say which instant)"
        elif "no UTC offset" in str(exc):
            why = "a time without a UTC offset"
        elif re.search(r"[+-](\d\d):?(\d\d)$", value) and not _offset_ok(value):
            why = "a time whose UTC offset is not between -23:59 and +23:59"
        else:
            why = "not a valid ISO-8601 time"
        raise PeriodError(
            f"{name} {text!r} is {why}: write ISO-8601 with an offset, {TIME_EXAMPLES}"
        ) from None


def _offset_ok(value: str) -> bool:
    hours, minutes = re.search(r"[+-](\d\d):?(\d\d)$", value).groups()
    return int(hours) < 24 and int(minutes) < 60


def parse_period(start: str | datetime | None, end: str | datetime | None) -> tuple:
    """``(start, end)`` as aware datetimes; a clear error when missing or reversed."""
    if start is None or end is None or start == "" or end == "":
        raise PeriodError(
            "no period to reconcile: give both start and end (ISO-8601, e.g. "
            "start=2026-01-01T00:00:00Z end=2026-01-01T01:00:00Z)"
        )
    values = []
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise PeriodError(f"{name} {value.isoformat()} has no UTC offset")
            values.append(value)
            continue
        values.append(ts_to_datetime(parse_instant(name, str(value))))
    if values[1] <= values[0]:
        raise PeriodError(f"end {values[1].isoformat()} is not after start {values[0].isoformat()}")
    return values[0], values[1]


def run_period_of(params: dict | None, data_interval_start=None, data_interval_end=None):
    """The period a DAG run reconciles: ``start``/``end`` params when a manual run names
    them, else the run's data interval. Neither (a manual run with no logical date and no
    params) is an error, never a guess."""
    params = params or {}
    if params.get("start") or params.get("end"):
        return parse_period(params.get("start"), params.get("end"))
    if data_interval_start is None or data_interval_end is None:
        raise PeriodError(
            "this run has no interval: trigger it with params start and end (ISO-8601), e.g. "
            '{"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z"}, '
            "or let the schedule run it"
        )
    return parse_period(data_interval_start, data_interval_end)
