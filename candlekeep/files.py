"""Opening trade files for reading: plain, gzip or Binance's single-file zip archives."""

from __future__ import annotations

import gzip
import io
import os
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from candlekeep.errors import UserError


def check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file: check the path (trade files are CSV or JSONL)")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory: pass the trade files inside it")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: permission denied: make the file readable")


@contextmanager
def open_trade_file(path: str) -> Iterator[TextIO]:
    """Text lines of a trade file; undecodable bytes become U+FFFD (and the line is rejected).

    A damaged archive is found while it is read (gzip checks its end only at the end): whoever
    reads the lines gets one :class:`UserError` naming the file, instead of ``EOFError``
    (which click turns into a bare "Aborted!") or a ``BadGzipFile`` taken for a bug.
    """
    try:
        with _open(path) as handle:
            yield handle
    except EOFError:
        raise damaged(path, "it ends before its compressed data does (truncated)") from None
    except (gzip.BadGzipFile, zipfile.BadZipFile, zlib.error) as exc:
        raise damaged(path, f"{exc}") from None


def damaged(path: str, what: str) -> UserError:
    return UserError(f"{path}: the compressed file is damaged: {what}: download or copy it again")


@contextmanager
def _open(path: str) -> Iterator[TextIO]:
    check_readable(path)
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="") as handle:
            yield handle
    elif path.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if len(members) != 1:
                raise UserError(f"{path}: expected one file inside the zip, found {len(members)}")
            with archive.open(members[0]) as raw:
                yield io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
    else:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            yield handle


def first_line(path: str) -> str:
    with open_trade_file(path) as handle:
        return handle.readline()


def inner_name(path: str) -> str:
    """The name that tells a file's format and symbol (the member's name inside a zip)."""
    if path.endswith(".zip") and os.path.isfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [m for m in archive.namelist() if not m.endswith("/")]
        except zipfile.BadZipFile as exc:
            raise damaged(path, str(exc)) from None
        if len(names) == 1:
            return names[0]
    return path[:-3] if path.endswith(".gz") else path
