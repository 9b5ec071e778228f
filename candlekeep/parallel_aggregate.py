"""``candlekeep aggregate`` on every core: trade files cut into units, folded in worker processes.

A *unit* is a whole file (compressed files and small ones) or a byte range of a plain file cut
on line boundaries. Each worker folds its unit with the core, as the serial path does
(:class:`TradeLineReader` rows into a :class:`CandleBook`: Binance files without a Trade
object per line) and sends back its base candles, counts, first invalid lines and the trade ids
it saw. The parent then:

- merges the base candles with ``Candle.absorb`` in unit order: exact, and of two equal highs
  written differently (``1.5``, ``1.50``) the first read stays, as when folding serially;
- finds trade ids seen in more than one unit (only where the units' id ranges overlap, so files
  of ever-growing Binance ids cost nothing) and folds the later units again with those ids
  excluded, so the first copy in file order wins, as serially; rare, and correct;
- prints the invalid lines in file and line order, numbered as in the file. A worker does not
  know how many lines precede its range: it numbers lines from its range's start and the parent
  adds the line counts of the earlier units of the file, in order.

The output is byte for byte the serial path's. ``--workers 1``, small inputs and single units
run serially in this process: starting processes would cost more than it saves.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
from array import array
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from candlekeep.files import open_trade_file
from candlekeep.trade_input import MAX_LINES_SHOWN, TradeInput
from shared.core.aggregation import CandleBook
from shared.core.intervals import IntervalSet
from shared.core.trade_files import TradeLineReader
from shared.core.trades import Rejection

#: Inputs smaller than this in total are folded serially (process start-up would dominate).
MIN_PARALLEL_BYTES = 4 << 20
#: Chunks of plain files are about input size / (2 x workers), within these bounds: at least a
#: few MB so per-unit costs stay small, at most this so a worker's ids and lines stay bounded.
MIN_CHUNK_BYTES = 4 << 20
MAX_CHUNK_BYTES = 256 << 20
CHUNKS_PER_WORKER = 2
#: Line numbers inside a unit that does not start its file are counted from here, so the
#: reader's "line 1 may be a header" rule applies to a file's true first line only.
_RELATIVE = 1 << 40
_COMPRESSED = (".gz", ".zip")

Key = tuple[str, str]


@dataclass(frozen=True)
class Unit:
    """A piece of work: a whole file (``end`` None) or its bytes ``[start, end)``."""

    index: int
    path: str
    fmt: str
    symbol: str | None
    start: int = 0
    end: int | None = None


@dataclass
class UnitResult:
    """What a worker sends back (pickled): small, but for ``ids`` when they have gaps."""

    index: int
    book: CandleBook
    #: Lines read; a unit not starting its file numbers them from ``_RELATIVE + 1``.
    lines: int
    invalid: int
    #: The first invalid lines (relative number, text, reason): enough to print the first
    #: MAX_LINES_SHOWN of the whole input and to know there were more.
    shown: list[tuple[int, str, Rejection]]
    #: Reasons of the invalid lines not in ``shown``.
    unshown_reasons: Counter
    microseconds: bool | None
    #: (exchange, symbol) -> (lowest id, highest id, every id seen); None on a re-run.
    #: Consecutive ids (Binance's) are sent as a range: nothing to pack or pickle.
    ids: dict[Key, tuple[int, int, range | array | tuple[int, ...]]] | None = None
    #: Lines that were trades (not invalid, blank or a header): a file with none fails the run.
    trade_lines: int = 0


@dataclass
class _Task:
    unit: Unit
    intervals: IntervalSet
    exchange: str
    exclude: dict[Key, set[int]] = field(default_factory=dict)
    want_ids: bool = True


def add_trades(
    source: TradeInput, book: CandleBook, workers: int, chunk_bytes: int | None = None
) -> None:
    """Fold every trade of ``source`` into ``book``: in worker processes when that pays off,
    else serially here. Counts, invalid lines and the time unit end up in ``source`` as after
    ``book.add_rows(source.rows())``. ``chunk_bytes`` forces the chunk size (and parallelism
    for any input size): for tests and tuning."""
    units = plan_units(source, workers, chunk_bytes)
    if units is None:
        book.add_rows(source.rows())
        return
    results = _run(units, source, book.intervals, workers)
    for result in results:
        book.merge_from(result.book)
        if source.microseconds is None:
            source.microseconds = result.microseconds


def plan_units(
    source: TradeInput, workers: int, chunk_bytes: int | None = None
) -> list[Unit] | None:
    """The units to fold in parallel, in input order; None to fold serially."""
    plan = source.plan
    sizes = [os.path.getsize(path) for path, _, _ in plan]
    total = sum(sizes)
    if workers <= 1 or (chunk_bytes is None and total < MIN_PARALLEL_BYTES):
        return None
    source.check_symbols()
    if chunk_bytes is None:
        chunk_bytes = total // (workers * CHUNKS_PER_WORKER)
        chunk_bytes = min(max(chunk_bytes, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    units: list[Unit] = []
    for (path, fmt, symbol), size in zip(plan, sizes, strict=True):
        pieces = max(1, round(size / chunk_bytes))
        if pieces == 1 or path.endswith(_COMPRESSED):
            units.append(Unit(len(units), path, fmt, symbol))
            continue
        for start, end in line_ranges(path, size, pieces):
            units.append(Unit(len(units), path, fmt, symbol, start, end))
    return units if len(units) > 1 else None


def line_ranges(path: str, size: int, pieces: int) -> list[tuple[int, int]]:
    """About ``pieces`` byte ranges covering the file, each ending just after a ``\\n`` (the
    last at the end of the file). A ``\\n`` is never inside a UTF-8 character or a ``\\r\\n``,
    so every range decodes and splits into lines exactly as its part of the whole file."""
    bounds = [0]
    with open(path, "rb") as handle:
        for piece in range(1, pieces):
            handle.seek(max(size * piece // pieces, bounds[-1] + 1) - 1)
            handle.readline()  # up to and past the next newline
            cut = handle.tell()
            if cut >= size:
                break
            bounds.append(cut)
    bounds.append(size)
    return list(pairwise(bounds))


# --- the worker side ----------------------------------------------------------------------------


def fold_unit(task: _Task) -> UnitResult:
    """Fold one unit with the core, as the serial path folds a file (runs in a worker)."""
    unit = task.unit
    book = CandleBook(task.intervals)
    for (exchange, symbol), ids in task.exclude.items():
        book.exclude(exchange, symbol, ids)
    shown: list[tuple[int, str, Rejection]] = []
    unshown: Counter = Counter()
    base = 0 if unit.start == 0 else _RELATIVE

    def on_invalid(number: int, line: str, rejection: Rejection) -> None:
        if len(shown) <= MAX_LINES_SHOWN:
            shown.append((number - base, line, rejection))
        else:
            unshown[rejection.code] += 1

    reader = TradeLineReader(
        unit.fmt, symbol=unit.symbol, exchange=task.exchange, on_invalid=on_invalid
    )
    reader.lines = base
    with _open_unit(unit) as lines:
        book.add_rows(reader.rows(lines))
    ids = None
    if task.want_ids:
        ids = {key: _compact(seen) for key, seen in book.dedup.seen.items() if seen}
    book.dedup.seen = {}  # not needed by the parent, and the bulk of the pickle
    return UnitResult(
        unit.index,
        book,
        reader.lines - base,
        reader.invalid,
        shown,
        unshown,
        reader.microseconds,
        ids,
        reader.lines - base - reader.invalid - reader.skipped,
    )


@contextmanager
def _open_unit(unit: Unit) -> Iterator[TextIO]:
    """The unit's text lines, decoded and split as ``open_trade_file`` does for the file."""
    if unit.end is None:
        with open_trade_file(unit.path) as handle:
            yield handle
        return
    raw = _ByteRange(unit.path, unit.start, unit.end)
    buffered = io.BufferedReader(raw, buffer_size=1 << 20)
    with io.TextIOWrapper(buffered, encoding="utf-8", errors="replace", newline="") as handle:
        yield handle


class _ByteRange(io.RawIOBase):
    """Bytes ``[start, end)`` of a file, as a stream that ends at ``end``."""

    def __init__(self, path: str, start: int, end: int):
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        self._file.seek(start)
        self._left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            return 0
        with memoryview(buffer) as view:
            read = self._file.readinto(view[: self._left])
        self._left -= read
        return read

    def close(self) -> None:
        self._file.close()
        super().close()


def _compact(ids: set[int]) -> tuple[int, int, range | array | tuple[int, ...]]:
    """(lowest, highest, ids): a range when they are consecutive, as Binance's are (nothing to
    send), else 8 bytes an id where they fit in 64 bits."""
    low, high = min(ids), max(ids)
    if high - low + 1 == len(ids):
        return low, high, range(low, high + 1)
    try:
        return low, high, array("q", ids)
    except OverflowError:
        return low, high, tuple(ids)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: workers just stop, the parent reports it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- the parent side ----------------------------------------------------------------------------


def _run(
    units: list[Unit], source: TradeInput, intervals: IntervalSet, workers: int
) -> list[UnitResult]:
    """Fold every unit in a process pool; results in unit order, duplicates across units
    settled. Invalid lines are reported through ``source`` as soon as all units before theirs
    are done."""
    results: list[UnitResult | None] = [None] * len(units)
    reporter = _Reporter(units, source)
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(units)), mp_context=_context(), initializer=_worker_init
    )
    try:
        # Submit before any progress thread starts: with "fork", workers start on first submit.
        pending: set[Future] = {
            pool.submit(fold_unit, _Task(unit, intervals, source.exchange)) for unit in units
        }
        with _progress(source, len(units)) as advance:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()
                    results[result.index] = result
                    advance()
                reporter.report_ready(results)
        finished: list[UnitResult] = results  # type: ignore[assignment]
        # Rare: units holding ids that an earlier unit holds too are folded again without them.
        reruns = {
            index: pool.submit(
                fold_unit, _Task(units[index], intervals, source.exchange, exclude, False)
            )
            for index, exclude in cross_unit_duplicates(finished).items()
        }
        for index, future in reruns.items():
            finished[index] = future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return finished


def cross_unit_duplicates(results: list[UnitResult]) -> dict[int, dict[Key, set[int]]]:
    """Unit index -> (exchange, symbol) -> ids of that unit already seen in an earlier unit.

    Only units whose id ranges overlap another's are compared: Binance ids grow through a file,
    so a split file or a month of daily files has no overlap and costs one sort."""
    by_key: dict[Key, list[tuple[int, int, int, range | array | tuple[int, ...]]]] = {}
    for result in results:
        for key, (low, high, ids) in (result.ids or {}).items():
            by_key.setdefault(key, []).append((result.index, low, high, ids))
    exclusions: dict[int, dict[Key, set[int]]] = {}
    for key, entries in by_key.items():
        overlapping = _overlapping(entries)
        seen: set[int] = set()
        for index, _, _, ids in entries:  # in unit order: the first copy wins
            if index not in overlapping:
                continue
            again = seen.intersection(ids)
            if again:
                exclusions.setdefault(index, {})[key] = again
            seen.update(ids)
    return exclusions


def _overlapping(entries: list[tuple[int, int, int, object]]) -> set[int]:
    """Indexes of the entries whose [low, high] meets another's (clusters of two or more)."""
    out: set[int] = set()
    cluster: list[int] = []
    reach = None
    for index, low, high, _ in sorted(entries, key=lambda e: e[1]):
        if reach is not None and low <= reach:
            cluster.append(index)
            reach = max(reach, high)
            continue
        if len(cluster) > 1:
            out.update(cluster)
        cluster, reach = [index], high
    if len(cluster) > 1:
        out.update(cluster)
    return out


class _Reporter:
    """Reports invalid lines through ``source`` in unit order, with true line numbers."""

    def __init__(self, units: list[Unit], source: TradeInput):
        self.units = units
        self.source = source
        self.next = 0
        self.lines_before = 0  # lines of the earlier units of the current file

    def report_ready(self, results: list[UnitResult | None]) -> None:
        while self.next < len(self.units) and (result := results[self.next]) is not None:
            unit = self.units[self.next]
            if unit.start == 0:
                self.lines_before = 0
            source = self.source
            for number, line, rejection in result.shown:
                source.report_invalid(unit.path, self.lines_before + number, line, rejection)
            source.invalid += result.invalid - len(result.shown)
            source.invalid_reasons.update(result.unshown_reasons)
            source.lines += result.lines
            source.trade_lines[unit.path] += result.trade_lines
            self.lines_before += result.lines
            self.next += 1


@contextmanager
def _progress(source: TradeInput, units: int) -> Iterator:
    """A bar of units done, on a terminal."""
    progress = Progress(
        TextColumn("[bold]aggregating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("parts"),
        TimeElapsedColumn(),
        console=source.console,
        transient=True,
        disable=not source.console.is_terminal,
    )
    with progress:
        task = progress.add_task("aggregating", total=units)
        yield lambda: progress.advance(task)


def _context():
    """Start workers by forking where that is safe and cheap (Linux): no imports to redo."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def default_workers() -> int:
    return os.cpu_count() or 1
