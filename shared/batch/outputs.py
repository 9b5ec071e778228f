"""Checking where output will go *before* the work that produces it.

An hour of aggregation, or a reconciliation that commits its report row, must not end in "no
such directory" at the last step: commands check their output files and directories first,
and say what is wrong with them in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.errors import CandlekeepError


class OutputError(CandlekeepError):
    """An output path that cannot be written; the message says which and what to do."""


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> None:
    """Fail unless ``path`` can be created or overwritten (its directory must exist)."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{what} {target} is a directory: give a file name")
    parent = target.parent
    if not parent.exists():
        raise OutputError(
            f"{what} {target}: directory {parent} does not exist: create it, or write elsewhere"
        )
    if not parent.is_dir():
        raise OutputError(f"{what} {target}: {parent} is not a directory: write elsewhere")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise OutputError(
                f"{what} {target}: {_denied(target)}: make it writable, or write elsewhere"
            )
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{what} {target}: cannot create files in {parent} ({_denied(parent)}): write elsewhere"
        )


def check_output_dir(path: str | os.PathLike[str], what: str = "output directory") -> None:
    """Fail unless ``path`` is a writable directory, or can be made one (``mkdir -p``)."""
    target = Path(path)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {target}: {existing} is not a directory: choose another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"{what} {target}: cannot write in {existing} ({_denied(existing)}): "
            "make it writable, or choose another"
        )


def _denied(path: Path) -> str:
    """Why writing is refused: a read-only file system or the permissions."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"
