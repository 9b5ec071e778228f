"""The report's summary (SPEC §6 steps 4-5), typed: what the checks find and the verdict says.

``checks_step`` builds it; the verdict, the HTML template, the CLI and the DAG's asset event read
its fields by name, so a misspelt field is an error where it is read, not an empty cell. It is
stored as JSON in ``dq_reports.summary`` and passed between Airflow tasks as JSON: ``to_json``
and ``from_json`` keep the JSON names reports were stored with, so older reports still read.
The one name that differs from the JSON is ``period`` (JSON ``interval``): a run's
``[start, end)`` is a period, an interval is a candle length, but stored reports and the asset
events' consumers know the key ``interval``.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Period(msgspec.Struct):
    """A run's ``[start, end)``, ISO-8601 with offset."""

    start: str
    end: str


class ByTable(msgspec.Struct):
    """A count for each candle table."""

    batch: int
    stream: int


class LatenessBucket(msgspec.Struct):
    bucket: str
    count: int


class LateTrades(msgspec.Struct):
    """Trades of the period, how many arrived late, and how late."""

    trades: int
    late: int
    rate: float
    max_lateness_s: float
    lateness: list[LatenessBucket]


class InvalidMessages(msgspec.Struct):
    """The stream's invalid messages so far (they carry no trade time: not per period)."""

    consumed: int
    invalid: int
    rate: float
    reasons: dict[str, int]


class StreamProgress(msgspec.Struct):
    """The stream's watermark when the run looked, and whether it had passed the period."""

    watermark: str | None
    passed: bool
    lag_s: float | None


class OffsetReset(msgspec.Struct):
    """An ``offset_resets`` row (SPEC §4) that may have touched the period."""

    id: int
    consumer_group: str
    topic: str
    partition: int
    kind: str
    stored_offset: int | None
    log_start_offset: int | None
    log_end_offset: int | None
    skipped: int
    policy: str
    watermark: str | None
    resumed_at: str | None
    detected_at: str


class VenueProblem(msgspec.Struct):
    """Why some candles could not be checked against the venue: the whole exchange
    (``symbol`` None: down, timed out, rate-limited past the bound) or one symbol's interval
    (refused, malformed answer)."""

    exchange: str
    symbol: str | None
    interval: str | None
    reason: str


class VenueCheck(msgspec.Struct):
    """The check against the venue (SPEC §6.1): verdict counts, overall and per interval."""

    counts: dict[str, int]
    by_interval: dict[str, dict[str, int]]
    problems: list[VenueProblem] = []
    fetched: int = 0
    #: Trade-id gaps the batch run found in the stored trades (how many of them were new to
    #: ``trade_gaps`` is the step's log's, not the report's: a rerun must give the same report).
    gaps_found: int = 0


class TradeGap(msgspec.Struct):
    """A ``trade_gaps`` row meeting the period: its ids, how many, who found it, its state."""

    exchange: str
    symbol: str
    first_missing_id: int
    last_missing_id: int
    missing: int
    before_ts: str
    after_ts: str
    detected_by: str | None
    filled_at: str | None
    filled_by: str | None
    note: str | None


class SilentSymbol(msgspec.Struct):
    """An expected symbol with no trade in the period."""

    exchange: str
    symbol: str
    last_seen: str | None


class Reconnect(msgspec.Struct):
    """A feed's reconnect (``feed_reconnects``) in the period."""

    exchange: str
    symbol: str
    last_id_before: int | None
    first_id_after: int | None
    disconnected_at: str
    reconnected_at: str | None


class GapLeftOpen(msgspec.Struct):
    exchange: str
    symbol: str
    first_missing_id: int
    last_missing_id: int
    reason: str


class Repair(msgspec.Struct):
    """What a repair of the period did: gaps asked for, filled, trades fetched and stored."""

    gaps: int
    filled: int
    fetched: int
    stored: int
    left_open: list[GapLeftOpen] = []


class SymbolLateness(msgspec.Struct):
    """One symbol's late trades and the settings that would have kept them under the rate
    (``shared.core.lateness``); times in seconds."""

    exchange: str
    symbol: str
    trades: int
    late: int
    rate: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    extra_s: float  # 0: the settings kept the symbol under the rate
    max_delay_s: float  # with allowed_lateness unchanged
    allowed_lateness_s: float  # with max_delay unchanged


class ReportSummary(msgspec.Struct):
    """Everything a report says, and its verdict (``status``, ``reasons``)."""

    period: Period = msgspec.field(name="interval")
    intervals: list[str]
    counts: dict[str, int]
    by_interval: dict[str, dict[str, int]]
    ohlc_violations: ByTable
    rollup_violations: ByTable
    gaps: dict[str, int]
    gaps_total: int
    base_windows: int
    late_trades: LateTrades
    invalid_messages: InvalidMessages
    stream: StreamProgress
    offset_resets: list[OffsetReset] = []  # reports stored before offset resets were checked
    # The check against the venue (SPEC §6.1); None in reports stored before it existed.
    venue: VenueCheck | None = None
    trade_gaps: list[TradeGap] = []
    silent_symbols: list[SilentSymbol] = []
    reconnects: list[Reconnect] = []
    repair: Repair | None = None
    #: SPEC §6.2: per symbol, how late the late trades were and the settings that would have
    #: kept them under CANDLEKEEP_DQ_MAX_LATE_RATE (symbols with late trades only).
    lateness_advice: list[SymbolLateness] = []
    #: The period's candles in the view ``candles``, by status.
    statuses: dict[str, int] = {}
    #: Trades were stored for the period after this run read them: stale until reconciled again.
    stale: bool = False
    status: str = ""  # the verdict: pass, warn or fail ("" until ``verdict`` has been asked)
    reasons: list[str] = []

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in ``dq_reports.summary`` and passed between tasks."""
        return msgspec.to_builtins(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReportSummary:
        return msgspec.convert(data, cls)

    def headline(self) -> dict[str, Any]:
        """What the DAG's asset event carries: the period, the verdict and the counts."""
        data = self.to_json()
        headline = {key: data[key] for key in ("interval", "status", "counts", "reasons")}
        if self.venue is not None:
            headline["venue_counts"] = data["venue"]["counts"]
        return headline

    @property
    def open_gaps(self) -> list[TradeGap]:
        return [g for g in self.trade_gaps if g.filled_at is None]

    def missing_by_symbol(self) -> dict[str, int]:
        """Trades still missing per ``exchange:symbol`` (the open gaps)."""
        out: dict[str, int] = {}
        for gap in self.open_gaps:
            key = f"{gap.exchange}:{gap.symbol}"
            out[key] = out.get(key, 0) + gap.missing
        return out
