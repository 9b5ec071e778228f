"""The ``candlekeep`` command: one subcommand per job (SPEC §8)."""

from __future__ import annotations

import os
import sys

import click
from pydantic import ValidationError

from candlekeep import __version__
from candlekeep.aggregate import aggregate
from candlekeep.db_cmd import db_group
from candlekeep.demo import demo
from candlekeep.errors import UserError, settings_error
from candlekeep.feed_cmd import feed_group
from candlekeep.load import load
from candlekeep.reconcile_cmd import reconcile, repair, report
from candlekeep.stream_cmd import stream
from shared.config import Settings
from shared.errors import CandlekeepError
from shared.store.redaction import redact


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise settings_error(exc) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="candlekeep")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """candlekeep: honest OHLCV candles from a stream of trades."""
    ctx.obj = load_settings


cli.add_command(aggregate)
cli.add_command(db_group)
cli.add_command(load)
cli.add_command(stream)
cli.add_command(feed_group)
cli.add_command(reconcile)
cli.add_command(repair)
cli.add_command(report)
cli.add_command(demo)


def main() -> None:
    """Entry point: user errors print one line; anything else is a bug, said plainly."""
    try:
        cli.main(prog_name="candlekeep")
    except (UserError, click.ClickException) as exc:  # raised outside click's own handling
        exc.show()
        sys.exit(exc.exit_code)
    except CandlekeepError as exc:
        if os.environ.get("CANDLEKEEP_DEBUG"):
            raise
        click.echo(f"Error: {redact(str(exc))}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("CANDLEKEEP_DEBUG"):
            raise
        click.echo(
            f"Error: unexpected {type(exc).__name__}: {redact(str(exc))}. This is a bug in "
            "candlekeep: rerun with CANDLEKEEP_DEBUG=1 for the traceback and report it.",
            err=True,
        )
        sys.exit(2)
