"""Opening trade files for reading: plain, gzip or Binance's single-file zip archives."""

from __future__ import annotations

import gzip
import io
import os
import zipfile
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
    """Text lines of a trade file; undecodable bytes become U+FFFD (and the line is rejected)."""
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
        with zipfile.ZipFile(path) as archive:
            names = [m for m in archive.namelist() if not m.endswith("/")]
            if len(names) == 1:
                return names[0]
    return path[:-3] if path.endswith(".gz") else path
