"""``candlekeep aggregate --workers N``: byte for byte the serial result, with the input cut into
tiny parts (the hidden ``--chunk-bytes``), duplicates and invalid lines across parts, several
symbols, compressed files; and the core pieces it relies on (merging books, folding rows)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
import zipfile
from collections import Counter
from itertools import pairwise

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from candlekeep import parallel_aggregate as pa
from candlekeep.cli import cli
from candlekeep.parallel_aggregate import cross_unit_duplicates
from candlekeep.trade_input import TradeInput
from shared.core.aggregation import CandleBook, Deduplicator
from shared.core.candle_formats import candle_record
from shared.core.candles import open_candle
from shared.core.intervals import IntervalSet
from shared.core.trades import Trade

from .conftest import REPO, SAMPLE_DIR
from .strategies import trade_lists

AGG = SAMPLE_DIR / "XRPETH-aggTrades-2019-10-11_13.csv"
INTERVALS = IntervalSet.parse("1m,5m,15m")
_spec = importlib.util.spec_from_file_location("make_trades", REPO / "bench" / "make_trades.py")
make_trades = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_trades)


def run(*args):
    result = CliRunner().invoke(cli, ["aggregate", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def summary_free(stderr: str) -> str:
    """stderr without the elapsed time of the summary line."""
    return re.sub(r" in \d+\.\d\ds$", "", stderr.rstrip("\n"), flags=re.M)


def serial_and_parallel(tmp_path, *args, workers=3, chunk_bytes=20_000):
    """Run both ways; assert the same output bytes and the same stderr. Returns the results."""
    serial_out, parallel_out = tmp_path / "serial.out", tmp_path / "parallel.out"
    serial = run(*args, "--workers", 1, "-o", serial_out)
    parallel = run(*args, "--workers", workers, "--chunk-bytes", chunk_bytes, "-o", parallel_out)
    assert parallel_out.read_bytes() == serial_out.read_bytes()
    assert serial_out.stat().st_size > 0
    assert summary_free(parallel.stderr) == summary_free(serial.stderr)
    return serial, parallel, parallel_out.read_bytes()


def units_of(*paths, chunk_bytes, input_format="auto", symbol=None):
    source = TradeInput([str(p) for p in paths], input_format, symbol)
    return pa.plan_units(source, 2, chunk_bytes)


def trade_lines(count, seed=7):
    return list(make_trades.trade_lines(count, seed))


# --- the CLI: parallel == serial ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--interval", "1m,5m,15m,1h"],
        ["--fill-gaps", "--output-format", "binance-klines", "--interval", "1m"],
    ],
)
def test_bundled_sample_in_many_parts_is_byte_identical(tmp_path, args):
    units = units_of(AGG, chunk_bytes=60_000)
    assert len(units) > 10 and units[0].start == 0 and units[-1].end == AGG.stat().st_size
    serial, _, _ = serial_and_parallel(tmp_path, AGG, *args, chunk_bytes=60_000)
    assert (
        "aggregated 12,477 trades (0 duplicates, 0 conflicting, 0 invalid lines)" in serial.stderr
    )


def test_duplicates_across_parts_first_copy_in_file_order_wins(tmp_path, monkeypatch):
    lines = trade_lines(6000)
    rnd = random.Random(3)
    # Later copies of earlier trades with another price and quantity: if a later copy won,
    # the candles would change. Some ids come back twice, some within the same part.
    copies = []
    for index in rnd.sample(range(len(lines)), 60):
        fields = lines[index].split(",")
        fields[1], fields[2] = "1.5", "9.00000000"
        copies.append((lines[index], ",".join(fields)))
    for original, copy in copies + copies[:10]:
        lines.insert(rnd.randrange(lines.index(original) + 1, len(lines) + 1), copy)
    path = tmp_path / "BTCUSDT-trades-dups.csv"
    path.write_text("".join(lines))
    assert len(units_of(path, chunk_bytes=30_000)) > 10
    found = []

    def spy(results):
        found.append(cross_unit_duplicates(results))
        return found[-1]

    monkeypatch.setattr(pa, "cross_unit_duplicates", spy)
    _, parallel, out = serial_and_parallel(
        tmp_path, path, "--interval", "1m,5m", "--input-format", "binance-trades"
    )
    # Several later parts were folded again without the ids of earlier ones.
    assert len(found[0]) > 3
    assert sum(len(ids) for parts in found[0].values() for ids in parts.values()) >= 50
    assert (
        "aggregated 6,000 trades (70 duplicates, 70 conflicting, 0 invalid lines)"
        in parallel.stderr
    )
    assert b'"low":"1.5' not in out  # no copy was folded
    # Same with the later copies alone (no duplicate): the folded data does change.
    reference = tmp_path / "reference.jsonl"
    clean = tmp_path / "BTCUSDT-trades-clean.csv"
    clean.write_text("".join(trade_lines(6000)))
    run(clean, "--interval", "1m,5m", "--workers", 1, "-o", reference)
    assert reference.read_bytes() == out


def test_invalid_lines_in_several_parts_keep_their_true_line_numbers(tmp_path):
    lines = ["trade_id,price,qty,quote_qty,time,is_buyer_maker,is_best_match\n"]
    lines += trade_lines(5000)
    path = tmp_path / "BTCUSDT-trades-bad.csv"
    path.write_text("".join(lines))
    chunk = 25_000
    units = units_of(path, chunk_bytes=chunk)
    assert len(units) > 10
    # Turn the first line of every other part into junk of the same length (so the parts do
    # not move): a part starting with a non-digit line must report it, not take it for a header.
    starts = {sum(len(line) for line in lines[:i]): i for i in range(len(lines))}
    bad = {}
    for unit in units[1::2]:
        i = starts[unit.start]
        bad[i + 1] = "x" * (len(lines[i]) - 1) + "\n"
    for number in (2, 777, 3001, len(lines)):  # and a few more anywhere, the last line too
        fields = lines[number - 1].split(",")
        fields[5] = "T" * len(fields[5])  # not a side
        bad[number] = ",".join(fields)
    for number, text in bad.items():
        lines[number - 1] = text
    path.write_text("".join(lines))
    assert [u.start for u in units_of(path, chunk_bytes=chunk)] == [u.start for u in units]
    _, parallel, _ = serial_and_parallel(tmp_path, path, "--interval", "1m", chunk_bytes=chunk)
    reported = [
        int(m.group(1))
        for m in re.finditer(rf"^{re.escape(str(path))}:(\d+): invalid", parallel.stderr, re.M)
    ]
    assert reported == sorted(bad)
    assert f"{len(bad)} invalid lines" in parallel.stderr


def test_more_invalid_lines_than_shown_are_counted_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(pa, "MAX_LINES_SHOWN", 5)
    monkeypatch.setattr("candlekeep.trade_input.MAX_LINES_SHOWN", 5)
    lines = trade_lines(3000)
    for number in range(10, 3000, 150):
        lines[number] = "junk\n"
    path = tmp_path / "BTCUSDT-trades-junk.csv"
    path.write_text("".join(lines))
    _, parallel, _ = serial_and_parallel(tmp_path, path, "--interval", "1m")
    assert parallel.stderr.count(": invalid: ") == 5
    assert "(more invalid lines" in parallel.stderr and "20 invalid lines" in parallel.stderr


def jsonl_trades(count, seed=11):
    rnd = random.Random(seed)
    symbols = ["BTCUSDT", "ETHUSDT", "XRPETH"]
    next_id = dict.fromkeys(symbols, 1000)
    out = []
    for n in range(count):
        symbol = rnd.choice(symbols)
        next_id[symbol] += 1
        record = {
            "exchange": rnd.choice(["binance", "binance", "kraken"]),
            "symbol": symbol,
            "trade_id": next_id[symbol],
            "price": f"{rnd.randint(100, 200)}.{rnd.randint(0, 99):02d}{'0' * rnd.randint(0, 3)}",
            "quantity": f"0.{rnd.randint(1, 9999):04d}",
            "timestamp": 1_700_000_000_000 + n * 37,
        }
        if rnd.random() < 0.8:
            record["is_buyer_maker"] = rnd.random() < 0.5
        out.append(json.dumps(record) + "\n")
    return out


def test_several_symbols_in_jsonl(tmp_path):
    lines = jsonl_trades(4000)
    rnd = random.Random(5)
    for _ in range(40):  # duplicates, anywhere later
        index = rnd.randrange(len(lines) - 1)
        lines.insert(rnd.randrange(index + 1, len(lines)), lines[index])
    for number in (3, 1500, 2800):
        lines.insert(number, "{not json\n")
    lines.insert(2000, "\n")  # blank lines are skipped, not invalid
    path = tmp_path / "trades.jsonl"
    path.write_text("".join(lines))
    assert len(units_of(path, chunk_bytes=25_000)) > 10
    _, parallel, out = serial_and_parallel(
        tmp_path, path, "--interval", "1m,5m", chunk_bytes=25_000
    )
    assert (
        "aggregated 4,000 trades (40 duplicates, 0 conflicting, 3 invalid lines)" in parallel.stderr
    )
    symbols = {(c["exchange"], c["symbol"]) for c in map(json.loads, out.splitlines())}
    assert len(symbols) == 6


def test_compressed_and_plain_files_together_keep_the_first_files_time_unit(tmp_path):
    micro = [
        line.replace(f",{ts}", f",{ts}000", 1)
        for line in trade_lines(800, seed=1)
        for ts in [line.split(",")[4]]
    ]
    gz = tmp_path / "BTCUSDT-trades-2025-01-01.csv.gz"
    with gzip.open(gz, "wt") as handle:
        handle.writelines(micro)
    archive = tmp_path / "BTCUSDT-trades-2025-01-02.zip"
    other_ids = [str(int(line[:10]) + 10**6) + line[10:] for line in trade_lines(800, seed=2)]
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("BTCUSDT-trades-2025-01-02.csv", "".join(other_ids))
    plain = tmp_path / "BTCUSDT-trades-2025-01-03.csv"
    plain.write_text("".join(trade_lines(3000, seed=1)))  # the gz trades again, in ms
    units = units_of(gz, archive, plain, chunk_bytes=30_000)
    assert [u.end for u in units[:2]] == [None, None] and len(units) > 5
    _, parallel, out = serial_and_parallel(
        tmp_path, gz, archive, plain, "--output-format", "binance-klines", "--interval", "1m"
    )
    assert len(out.split(b",")[0]) == 16  # µs open times: the first file's unit
    assert "(800 duplicates, 0 conflicting, 0 invalid lines) from 3 file(s)" in parallel.stderr


def test_workers_1_and_small_inputs_run_serially(tmp_path):
    assert units_of(AGG, chunk_bytes=None) is None  # under MIN_PARALLEL_BYTES
    source = TradeInput([str(AGG)])
    assert pa.plan_units(source, 1, 10_000) is None
    serial_and_parallel(tmp_path, AGG, "--interval", "5m", workers=1)


def test_an_error_in_a_worker_is_one_clear_line(tmp_path):
    archive = tmp_path / "BTCUSDT-trades-2025-01-01.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("a.csv", "1,1,1,1,1,true,true\n")
        zipped.writestr("b.csv", "1,1,1,1,1,true,true\n")
    plain = tmp_path / "BTCUSDT-trades-2025-01-02.csv"
    plain.write_text("".join(trade_lines(500)))
    args = [plain, archive, "--input-format", "binance-trades", "--workers", 2]
    result = CliRunner().invoke(cli, ["aggregate", *map(str, args), "--chunk-bytes", "10000"])
    assert result.exit_code == 1
    assert "expected one file inside the zip, found 2" in result.output


# --- the pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_parts_split_lines_as_the_whole_file_does(tmp_path, newline):
    text = newline.join(f"{n},ä{'x' * (n % 17)}" for n in range(400))  # no final newline
    path = tmp_path / "lines.txt"
    path.write_bytes(text.encode())
    size = path.stat().st_size
    ranges = pa.line_ranges(path, size, 9)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in pairwise(ranges))
    parts = []
    for start, end in ranges:
        with pa._open_unit(pa.Unit(0, str(path), "jsonl", None, start, end)) as handle:
            parts.append(list(handle))
    with open(path, encoding="utf-8", newline="") as handle:
        whole = list(handle)
    assert [line for part in parts for line in part] == whole
    assert len(parts) == (1 if newline == "\r" else 9)  # cut after "\n" only


def test_cross_unit_duplicates_compares_overlapping_id_ranges_only():
    def result(index, **ids):
        packed = {("binance", k): pa._compact(set(v)) for k, v in ids.items()}
        return pa.UnitResult(index, None, 0, 0, [], Counter(), None, packed)

    results = [
        result(0, A=range(0, 100), B=[5, 6]),
        result(1, A=range(100, 200), B=[6, 7]),
        result(2, A=[50, 150, 300], B=[8]),
        result(3, A=[150, 400]),
    ]
    assert cross_unit_duplicates(results) == {
        1: {("binance", "B"): {6}},
        2: {("binance", "A"): {50, 150}},
        3: {("binance", "A"): {150}},
    }
    assert cross_unit_duplicates([*results[:2], result(2, A=range(200, 300))]) == {
        1: {("binance", "B"): {6}}
    }


def reference_fold(trades, intervals):
    """Fold with ``Candle.add`` one trade at a time: what the book's loop does for many."""
    dedup = Deduplicator()
    bases = {}
    for trade in dedup.unique(trades):
        start = intervals.base.window_start(trade.ts_us)
        key = (trade.exchange, trade.symbol, start)
        if key in bases:
            bases[key].add(trade)
        else:
            bases[key] = open_candle(trade, intervals.base)
    return [candle_record(bases[k]) for k in sorted(bases)], dedup.duplicates


def records(book):
    return [candle_record(c) for s in book.symbols() for c in book.candles(INTERVALS.base, s)]


@given(trade_lists(max_size=80), st.randoms(use_true_random=False), st.integers(1, 5))
def test_books_of_consecutive_parts_merge_into_the_whole_books_candles(trades, rnd, parts):
    """add_all == add_rows == Candle.add digit for digit; parts folded apart (later parts
    excluding the ids of earlier ones) and merged in order == the whole folded at once."""
    trades = list(trades)
    for _ in range(rnd.randrange(0, 6)):  # later copies that must lose
        if trades:
            t = rnd.choice(trades)
            copy = Trade(t.exchange, t.symbol, t.trade_id, t.ts_us, t.price * 2, t.quantity)
            trades.insert(rnd.randrange(trades.index(t) + 1, len(trades) + 1), copy)
    whole = CandleBook(INTERVALS)
    whole.add_all(trades)
    expected, duplicates = reference_fold(trades, INTERVALS)
    assert records(whole) == expected and whole.dedup.duplicates == duplicates
    by_rows = CandleBook(INTERVALS)
    for key in dict.fromkeys((t.exchange, t.symbol) for t in trades):
        rows = [
            (*key, t.trade_id, t.ts_us, t.price, t.quantity, t.is_buyer_maker, t.raw_trades, t.kind)
            for t in trades
            if (t.exchange, t.symbol) == key
        ]
        by_rows.add_rows(rows)
    assert records(by_rows) == expected
    assert (by_rows.trades, by_rows.dedup.duplicates) == (whole.trades, duplicates)
    cuts = sorted(rnd.randrange(len(trades) + 1) for _ in range(parts - 1))
    merged = CandleBook(INTERVALS)
    seen: dict[tuple[str, str], set[int]] = {}
    for start, end in zip([0, *cuts], [*cuts, len(trades)], strict=True):
        part = trades[start:end]
        book = CandleBook(INTERVALS)
        for (exchange, symbol), ids in seen.items():
            book.exclude(exchange, symbol, ids)
        book.add_all(part)
        for t in part:
            seen.setdefault((t.exchange, t.symbol), set()).add(t.trade_id)
        merged.merge_from(book)
    assert records(merged) == expected
    assert (merged.trades, merged.dedup.duplicates) == (whole.trades, whole.dedup.duplicates)
    assert [candle_record(c) for c in merged.all_candles()] == [
        candle_record(c) for c in whole.all_candles()
    ]
