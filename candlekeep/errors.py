"""Errors meant for a person: what was wrong and what to do, never a traceback."""

from __future__ import annotations

import click
from pydantic import ValidationError

from shared.store.redaction import redact


class UserError(click.ClickException):
    """A problem the user can fix; printed as ``Error: …`` with exit status 1."""

    def format_message(self) -> str:
        return redact(self.message)  # a message may quote a setting: never its password


def settings_error(exc: ValidationError) -> UserError:
    """A readable message for a bad ``CANDLEKEEP_*`` setting."""
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        env = name if name.isupper() else "CANDLEKEEP_" + name.upper()  # aliases: as set
        message = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{env}={redact(repr(err.get('input')))}: {message}")
    return UserError("invalid setting: " + "; ".join(lines) + " (see docs/configuration.md)")
