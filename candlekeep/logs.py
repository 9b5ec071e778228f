"""Structured logs: readable on a terminal, one JSON object a line everywhere else.

Every line goes through the same processors, whoever wrote it: our structlog events, the
standard ``logging`` records of the libraries (psycopg's warnings, aiokafka, alembic), Python's
``warnings`` and PostgreSQL's notices. So a log collector that parses JSON never meets a plain
``WARNING:psycopg:…`` line, and no password reaches the log at any level (see
:mod:`shared.store.redaction`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import structlog

from shared.store.redaction import redact


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact(str(value))
    return value


def redact_event(_logger, _name, event_dict: dict) -> dict:
    """A processor masking passwords in every value of the event, tracebacks included."""
    return {key: _redact_value(value) for key, value in event_dict.items()}


def _leave_out(events: frozenset[str]):
    def processor(_logger, _name, event_dict: dict) -> dict:
        if event_dict.get("event") in events:
            raise structlog.DropEvent
        return event_dict

    return processor


def configure_logging(level: str = "INFO", quiet: Iterable[str] = ()) -> None:
    """Render every log line the same way (see the module docstring), at ``level`` and above;
    ``quiet``: events left out (the demo says what they count in its own summary)."""
    renderer = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_event,
    ]
    ours = [_leave_out(frozenset(quiet))] if quiet else []
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[*ours, *shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    # The libraries' own records, rendered by the same processors (one JSON object a line).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(threshold, logging.WARNING))
    logging.getLogger("candlekeep").setLevel(threshold)  # PostgreSQL's notices (shared.store.db)
    logging.captureWarnings(True)  # warnings.warn(...) too, instead of a bare stderr line
    # aiokafka logs connection trouble at ERROR on every retry; ours says it once, clearly.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
