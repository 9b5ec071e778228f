"""Settings, read from the environment in one place (documented in docs/configuration.md).

``DATABASE_URL`` and ``KAFKA_BOOTSTRAP_SERVERS`` name the real services; everything else has a
``CANDLEKEEP_`` prefix. Durations accept seconds (``5``, ``0.5``) or ISO-8601 (``PT5S``).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.core.intervals import DEFAULT_INTERVALS, IntervalSet
from shared.core.trade_rules import normalise_exchange
from shared.core.windows import WindowSettings
from shared.store.redaction import remember, remember_secret

_DURATION_RE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> timedelta | str:
    """``5``, ``2.5s``, ``500ms``, ``2m``, ``1h`` as a timedelta; anything else is left to
    pydantic (ISO-8601 ``PT5S``, ``HH:MM:SS``)."""
    match = _DURATION_RE.fullmatch(text)
    if not match:
        return text
    number, unit = match.groups()
    return timedelta(seconds=float(number) * _UNIT_SECONDS[unit])


def _us(delta: timedelta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


class Settings(BaseSettings):
    """Every setting of candlekeep, with its default."""

    model_config = SettingsConfigDict(env_prefix="CANDLEKEEP_", extra="ignore", frozen=True)

    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "CANDLEKEEP_DATABASE_URL")
    )
    kafka_bootstrap_servers: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "KAFKA_BOOTSTRAP_SERVERS", "CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS"
        ),
    )
    intervals: str = ",".join(DEFAULT_INTERVALS)
    max_delay: timedelta = timedelta(seconds=5)
    allowed_lateness: timedelta = timedelta(0)
    idle_timeout: timedelta = timedelta(seconds=5)
    max_future_skew: timedelta = timedelta(minutes=5)
    topic_trades: str = "trades"
    topic_candles: str = "candles"
    topic_late: str = "trades.late"
    topic_invalid: str = "trades.invalid"
    consumer_group: str = "candlekeep-stream"
    batch_size: int = Field(10_000, ge=1)
    #: PostgreSQL connections that write batches side by side (a partition always uses the same
    #: one, so each partition's batches still commit one at a time, in order).
    stream_writers: int = Field(2, ge=1, le=64)
    #: How long the worker gathers a batch that is not full (a live stream: what arrived since
    #: the last fetch), from its first message: each batch carries fixed costs (a transaction,
    #: its statements, the outputs' acknowledgements), which small batches pay per message.
    stream_linger: timedelta = timedelta(milliseconds=100)
    #: What the worker does when a partition's stored position is no longer in its log (SPEC §4
    #: "Offset resets"): ``earliest`` goes on from the log's start, ``fail`` stops. Either way
    #: the reset is recorded in ``offset_resets`` first.
    offset_reset: Literal["earliest", "fail"] = "earliest"
    #: Exchanges whose trade ids are consecutive per symbol (SPEC §4 "Trade-id continuity"): a
    #: hole in their ids is a gap, recorded in ``trade_gaps``. Never a gap for any other.
    consecutive_id_exchanges: str = "binance,binance-usdm,kraken"
    session_timeout: timedelta = timedelta(seconds=10)
    heartbeat_interval: timedelta = timedelta(seconds=3)
    data_dir: str = ".candlekeep"
    metrics_port: int = 9108
    dq_max_late_rate: float = 0.01
    dq_max_invalid_rate: float = 0.01
    dq_max_missing_in_stream: int = 0
    dq_max_gap_rate: float = 0.5
    dq_wait_timeout: timedelta = timedelta(minutes=10)
    #: How often the DAG's sensor looks at the watermark; between looks it frees its slot.
    dq_wait_poke_interval: timedelta = timedelta(seconds=30)
    #: Stale periods the DAG reconciles again in each run (the oldest marks first).
    dq_stale_per_run: int = Field(24, ge=0)
    report_dir: str = "reports"
    log_level: str = "INFO"
    #: The venues' REST base URLs (SPEC §9): tests and the demo point them at a replay server.
    binance_rest_url: str = "https://api.binance.com"
    binance_usdm_rest_url: str = "https://fapi.binance.com"
    kraken_rest_url: str = "https://api.kraken.com"
    #: Optional: Binance serves ``historicalTrades`` with or without it (a key raises the limits).
    binance_api_key: SecretStr | None = None
    #: One request to a venue: connecting and reading each give up after this long.
    venue_timeout: timedelta = timedelta(seconds=10)
    #: The longest a venue's ``Retry-After`` is waited out; beyond it the venue is unavailable.
    venue_max_retry_after: timedelta = timedelta(seconds=60)
    #: Check each period's candles against the venue (SPEC §6.1); off: ``unverified``, no warn.
    venue_checks: bool = True
    #: The DAG's repair task: fetch the period's open gaps from the venue (SPEC §6.1).
    repair: bool = True
    #: ``exchange:SYMBOL,…`` expected to trade in every period, besides the symbols seen in the
    #: ``expected_lookback`` before it: a period in which one has no trade is not ``pass``.
    expected_symbols: str = ""
    expected_lookback: timedelta = timedelta(hours=24)

    @field_validator("database_url", "kafka_bootstrap_servers")
    @classmethod
    def _not_empty(cls, value: str | None, info: ValidationInfo) -> str | None:
        """An empty value is a mistake (a compose file's ``${VAR}`` with VAR unset, say), not
        a wish for the embedded servers: those are what an *unset* variable gives."""
        if value is not None and not value.strip():
            what = "a postgresql:// URL" if info.field_name == "database_url" else "host:port,…"
            raise ValueError(f"is empty: unset it to use the embedded server, or set {what}")
        remember(value)  # its password is masked in everything printed or logged from now on
        return value

    @field_validator("binance_api_key")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        """Masked in everything printed or logged from now on, like the database password."""
        if value is not None:
            if not value.get_secret_value().strip():
                return None
            remember_secret(value.get_secret_value())
        return value

    @field_validator("consecutive_id_exchanges")
    @classmethod
    def _check_exchanges(cls, value: str) -> str:
        names = [name for name in value.split(",") if name.strip()]
        bad = [name for name in names if normalise_exchange(name) is None]
        if bad:
            raise ValueError(
                f"not exchange names (1-32 of a-z 0-9 . _ -): {', '.join(map(repr, bad))}; give"
                " a comma-separated list such as binance,binance-usdm,kraken, or nothing"
            )
        return ",".join(normalise_exchange(name) for name in names)  # type: ignore[misc]

    @field_validator("intervals")
    @classmethod
    def _check_intervals(cls, value: str) -> str:
        IntervalSet.parse(value)
        return value

    @field_validator(
        "max_delay",
        "allowed_lateness",
        "idle_timeout",
        "max_future_skew",
        "session_timeout",
        "heartbeat_interval",
        "dq_wait_timeout",
        "venue_timeout",
        "venue_max_retry_after",
        "expected_lookback",
        "dq_wait_poke_interval",
        "stream_linger",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("venue_timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be greater than 0")
        return value

    @field_validator(
        "max_delay",
        "allowed_lateness",
        "idle_timeout",
        "max_future_skew",
        "venue_max_retry_after",
        "stream_linger",
    )
    @classmethod
    def _non_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    @field_validator("expected_symbols")
    @classmethod
    def _check_expected(cls, value: str) -> str:
        for item in filter(None, (v.strip() for v in value.split(","))):
            exchange, _, symbol = item.partition(":")
            if not exchange.strip() or not symbol.strip():
                raise ValueError(f"{item!r} is not exchange:SYMBOL (e.g. binance:BTCUSDT)")
        return value

    @property
    def expected(self) -> frozenset[tuple[str, str]]:
        """The configured expected symbols as ``(exchange, SYMBOL)``."""
        pairs = (v.strip().partition(":") for v in self.expected_symbols.split(",") if v.strip())
        return frozenset((e.strip().lower(), s.strip().upper()) for e, _, s in pairs)

    @property
    def interval_set(self) -> IntervalSet:
        return IntervalSet.parse(self.intervals)

    @property
    def consecutive_exchanges(self) -> frozenset[str]:
        """The exchanges of ``CANDLEKEEP_CONSECUTIVE_ID_EXCHANGES``, as trades name them."""
        return frozenset(filter(None, self.consecutive_id_exchanges.split(",")))

    def window_settings(self) -> WindowSettings:
        return WindowSettings(
            self.interval_set,
            max_delay_us=_us(self.max_delay),
            allowed_lateness_us=_us(self.allowed_lateness),
            idle_timeout_us=_us(self.idle_timeout),
        )
