"""Errors meant for a person: what was wrong and what to do, never a traceback."""

from __future__ import annotations

import click
from pydantic import ValidationError


class UserError(click.ClickException):
    """A problem the user can fix; printed as ``Error: …`` with exit status 1."""


def settings_error(exc: ValidationError) -> UserError:
    """A readable message for a bad ``CANDLEKEEP_*`` setting."""
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        env = (
            name.upper()
            if name in ("database_url", "kafka_bootstrap_servers")
            else ("CANDLEKEEP_" + name.upper())
        )
        lines.append(f"{env}={err.get('input')!r}: {err['msg']}")
    return UserError("invalid setting: " + "; ".join(lines) + " (see docs/configuration.md)")
