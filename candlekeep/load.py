"""``candlekeep load``: bulk-load trade files into ``trades`` (idempotent), invalid lines into
``invalid_trades``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from itertools import islice

import click

from candlekeep.trade_input import TradeInput, trade_source_options
from shared.core.trades import Trade

#: Trades per COPY and transaction; one chunk is in memory at a time.
CHUNK = 100_000


class StreamedChunk(Sequence[Trade]):
    """The next trades of an iterator, read as the store first iterates over them, and kept for
    any later pass.

    ``store_trades`` sends a chunk in one COPY, encoding row after row while the server inserts
    the rows already sent. Read ahead into a list, a chunk's trades were parsed while the server
    had nothing to do (parsing is half the loader's CPU time): the load took the parse time
    plus the longer of encoding and inserting. Read as they are sent, parsing overlaps the
    server's work as well: 3M trades loaded in 9.6–11.0 s instead of 11.0–12.8 s (a plain COPY
    of the same rows: 6.2–7.1 s; bench/store_load_recompute.py, a shared 2-CPU machine). A
    second pass (the result, the staging path when some trade is stored already, the stale
    periods) reads the kept list, and reads on from the iterator where the first pass stopped.
    """

    def __init__(self, trades: Iterator[Trade]):
        self._source = trades
        self._read: list[Trade] = []

    def __iter__(self) -> Iterator[Trade]:
        read = self._read
        n = 0
        while True:
            if n < len(read):
                yield read[n]
            else:
                trade = next(self._source, None)
                if trade is None:
                    return
                read.append(trade)
                yield trade
            n += 1

    def _all(self) -> list[Trade]:
        self._read.extend(self._source)
        return self._read

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, index):
        return self._all()[index]

    def __bool__(self) -> bool:
        return bool(self._read) or next(iter(self), None) is not None


def load_trades(url: str, source: TradeInput, chunk: int = CHUNK) -> dict[str, int]:
    """Load every trade of ``source`` in chunks, one transaction each; memory stays flat."""
    from shared.store import db
    from shared.store.trade_gaps import gaps_of, mark_filled
    from shared.store.trade_store import InvalidMessage, store_invalid, store_trades

    totals = {"read": 0, "stored": 0, "duplicates": 0, "conflicting": 0, "invalid": 0}
    totals["gaps_filled"] = 0
    trades = source.trades()
    with db.connect(url) as conn:
        db.require_schema(conn, url)
        while True:
            batch = StreamedChunk(islice(trades, chunk))
            result = store_trades(conn, batch)  # reads the chunk as it sends it
            invalid = source.take_invalid()
            if not batch and not invalid:
                break
            store_invalid(
                conn,
                [
                    InvalidMessage(
                        os.path.abspath(line.path),
                        -1,
                        line.line_number,
                        None,
                        line.line.encode("utf-8", "replace"),
                        line.rejection.code,
                        line.rejection.reason,
                    )
                    for line in invalid
                ],
            )
            # Trade-id gaps whose every trade is now stored are filled (one statement over the
            # open gaps only, through their partial index: nothing to do in the common case).
            filled = gaps_of(mark_filled(conn, "load")) if result.stored else []
            conn.commit()
            totals["gaps_filled"] += len(filled)
            totals["read"] += len(batch)
            totals["stored"] += result.stored
            totals["duplicates"] += result.duplicates
            totals["conflicting"] += result.conflicting
            totals["invalid"] += len(invalid)
            del batch, invalid, result  # before the next chunk is read: one chunk alive at a time
    return totals


@click.command()
@trade_source_options
@click.pass_context
def load(ctx, files, input_format, symbol, exchange):
    """Bulk-load trade files into PostgreSQL (loading a file twice adds nothing)."""
    from candlekeep.services import database_url

    url = database_url(ctx)
    started = time.perf_counter()
    source = TradeInput(list(files), input_format, symbol, exchange, keep_invalid=True)
    totals = load_trades(url, source)
    elapsed = time.perf_counter() - started
    source.console.print(
        f"loaded {totals['stored']:,} new trades ({totals['duplicates']:,} already stored or "
        f"duplicated, of which {totals['conflicting']:,} conflicting (kept in trade_conflicts), "
        f"{totals['invalid']:,} invalid lines kept in invalid_trades) from "
        f"{len(files)} file(s) in {elapsed:.1f}s ({totals['read'] / max(elapsed, 1e-9):,.0f} "
        "rows/s)"
        + (
            f"; {totals['gaps_filled']:,} trade-id gap(s) filled (see trade_gaps)"
            if totals["gaps_filled"]
            else ""
        ),
        highlight=False,
    )
    source.require_trades()
