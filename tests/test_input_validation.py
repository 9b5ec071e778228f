"""One validation for every entry point (issue 11, items 6, 7 and 9): out-of-range values in
Binance CSVs are invalid lines with the file's line number, as in JSON; symbols and exchanges are
normalised once; bad options, a month interval, an empty interval, files with nothing valid and
garbage first lines are refused or reported, never taken silently."""

from __future__ import annotations

import gzip
import json
import re
import tempfile
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from candlekeep.cli import cli
from candlekeep.load import load_trades
from candlekeep.trade_input import TradeInput
from shared.core.trade_files import TradeLineReader
from shared.core.trade_messages import parse_trade_message
from shared.core.trades import Rejection
from shared.store import db

T0 = 1570752011620  # ms


def agg_line(agg_id, price="0.5", qty="1", first=None, last=None, ts=None):
    first = agg_id if first is None else first
    last = first if last is None else last
    ts = T0 + agg_id if ts is None else ts
    return f"{agg_id},{price},{qty},{first},{last},{ts},True,True"


#: (what, the aggTrade CSV line, the same value in a canonical JSON message or None)
OUT_OF_RANGE = [
    ("id 2^63", agg_line(2**63, first=1, last=1), {"trade_id": 2**63}),
    ("id of 200,000 digits", "9" * 200_000 + f",0.5,1,1,1,{T0},True,True", None),
    ("first id 2^63", agg_line(7, first=2**63, last=2**63), None),
    ("span over 2^31", agg_line(8, first=0, last=2**31), None),
    ("200,000-digit price", agg_line(9, price="1" * 200_000), {"price": "1" * 1002}),
    ("1E-20000", agg_line(10, price="1E-20000"), {"price": "1E-20000"}),
    ("1E+2000 quantity", agg_line(11, qty="1E+2000"), {"quantity": "1E+2000"}),
    (
        "1001 decimals",
        agg_line(12, qty="0." + "0" * 1000 + "1"),
        {"quantity": "0." + "0" * 1000 + "1"},
    ),
    ("time of 5000 digits", agg_line(13, ts="9" * 5000), None),
]


def rejections(lines, fmt="binance-aggtrades"):
    found = []
    reader = TradeLineReader(
        fmt, symbol="XRPETH", on_invalid=lambda n, line, r: found.append((n, r))
    )
    trades = list(reader.trades(lines))
    return trades, found


@pytest.mark.parametrize(
    ("what", "line", "json_fields"), OUT_OF_RANGE, ids=[c[0] for c in OUT_OF_RANGE]
)
def test_out_of_range_csv_values_are_invalid_lines_like_in_json(what, line, json_fields):
    trades, found = rejections([agg_line(1) + "\n", line + "\n", agg_line(3) + "\n"])
    assert [t.trade_id for t in trades] == [1, 3]
    assert [n for n, _ in found] == [2]
    rejection = found[0][1]
    assert rejection.code in ("out_of_range", "bad_timestamp"), rejection
    assert len(rejection.reason) < 200  # names the value briefly, never 200,000 digits
    if json_fields is not None:  # the JSON path says the same about the same value
        message = {"symbol": "XRPETH", "trade_id": 2, "price": "0.5", "quantity": "1"}
        message |= {"timestamp": T0} | json_fields
        parsed = parse_trade_message(json.dumps(message).encode())
        assert isinstance(parsed, Rejection) and parsed.code == rejection.code


@pytest.fixture
def url(database_url):
    db.upgrade(database_url)
    with db.connect(database_url) as conn:
        conn.execute("TRUNCATE trades, invalid_trades")
        conn.commit()
    return database_url


def invoke(*args, url=None):
    env = {"DATABASE_URL": url} if url else {}
    return CliRunner().invoke(cli, [*map(str, args)], env=env, catch_exceptions=False)


@pytest.mark.integration
def test_load_keeps_the_good_lines_and_names_each_bad_one_by_its_line_in_the_file(url, tmp_path):
    """Today's crash: the bad value reached COPY, which failed after earlier chunks were
    committed and named the line within its chunk."""
    lines = [agg_line(n) for n in range(1, 41)]
    bad_at = {}
    for number, (_, line, _) in zip(range(7, 41, 3), OUT_OF_RANGE, strict=False):
        lines[number - 1] = line
        bad_at[number] = line
    path = tmp_path / "XRPETH-aggTrades-2019-10-11.csv"
    path.write_text("\n".join(lines) + "\n")
    source = TradeInput([str(path)], keep_invalid=True)
    totals = load_trades(url, source, chunk=4)  # many chunks, the bad lines in later ones
    good = 40 - len(bad_at)
    assert totals == {
        "read": good,
        "stored": good,
        "duplicates": 0,
        "conflicting": 0,
        "invalid": len(bad_at),
        "gaps_filled": 0,
    }
    with db.connect(url) as conn:
        stored = {r[0] for r in conn.execute("SELECT trade_id FROM trades")}
        invalid = conn.execute(
            "SELECT source_offset, reason_code FROM invalid_trades ORDER BY source_offset"
        ).fetchall()
    assert stored == set(range(1, 41)) - set(bad_at)
    assert [r[0] for r in invalid] == sorted(bad_at)
    assert {r[1] for r in invalid} <= {"out_of_range", "bad_timestamp"}
    # The command: exit 0, each bad line named by its number in the file.
    result = invoke("load", path, url=url)
    assert result.exit_code == 0, result.output
    for number in bad_at:
        assert f"{path}:{number}: invalid: " in result.stderr
    assert f"loaded 0 new trades ({good} already stored" in result.stderr


def test_aggregate_folds_the_good_lines_and_names_each_bad_one(tmp_path):
    lines = [agg_line(n) for n in range(1, 21)]
    bad_numbers = range(2, 2 + 2 * len(OUT_OF_RANGE), 2)
    for number, (_, line, _) in zip(bad_numbers, OUT_OF_RANGE, strict=True):
        lines[number - 1] = line
    path = tmp_path / "XRPETH-aggTrades-2019-10-11.csv"
    path.write_text("\n".join(lines) + "\n")
    result = invoke("aggregate", path, "--interval", "1h", "--workers", 1)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trade_count"] == 20 - len(OUT_OF_RANGE)
    reported = [int(x.split(":")[1]) for x in result.stderr.splitlines() if ": invalid: " in x]
    assert reported == list(bad_numbers)


@pytest.mark.integration
def test_exchange_and_symbol_are_normalised_once_whatever_the_spelling(url, tmp_path):
    path = tmp_path / "trades.csv"
    path.write_text("\n".join(agg_line(n) for n in range(1, 6)) + "\n")
    first = invoke("load", path, "--symbol", "xrpeth", "--exchange", "Binance", url=url)
    again = invoke("load", path, "--symbol", " XRPETH ", "--exchange", "binance", url=url)
    assert first.exit_code == again.exit_code == 0, first.output + again.output
    assert "loaded 0 new trades (5 already stored" in again.stderr
    with db.connect(url) as conn:
        rows = conn.execute("SELECT DISTINCT exchange, symbol FROM trades").fetchall()
    assert rows == [("binance", "XRPETH")]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--symbol", "<SCRIPT>"),
        ("--symbol", "BTC\tUSDT"),
        ("--symbol", 'BTC"USDT'),
        ("--symbol", "X" * 33),
        ("--exchange", "bin ance"),
        ("--exchange", "binance'"),
        ("--exchange", ""),
    ],
)
def test_a_bad_symbol_or_exchange_is_a_usage_error_naming_the_rule(url, tmp_path, option, value):
    path = tmp_path / "XRPETH-aggTrades-x.csv"
    path.write_text(agg_line(1) + "\n")
    for command in ("load", "aggregate"):
        result = invoke(command, path, option, value, url=url)
        assert result.exit_code == 2, result.output
        error = result.stderr.splitlines()[-1]
        assert error.startswith(f"Error: Invalid value for '{option}'")
        assert "1-32 characters of" in error and "Traceback" not in result.stderr
    with db.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone()[0] == 0


def test_feed_symbols_follow_the_same_rule():
    result = invoke("feed", "synthetic", "--symbols", "BTCUSDT,<script>")
    assert result.exit_code == 2
    assert "Invalid value for '--symbols': '<script>' is not 1-32 characters" in result.stderr


@pytest.mark.parametrize("value", ["1M", "1m,1M", "5M"])
def test_a_month_interval_is_refused_with_the_supported_ones(value, tmp_path):
    path = tmp_path / "XRPETH-aggTrades-x.csv"
    path.write_text(agg_line(1) + "\n")
    result = invoke("aggregate", path, "--interval", value)
    assert result.exit_code == 1
    assert "1M is a month" in result.stderr and "1m 5m 15m 1h 4h 1d" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("value", ["", " ", ","])
def test_an_empty_interval_is_refused_not_taken_for_the_default(value, tmp_path):
    path = tmp_path / "XRPETH-aggTrades-x.csv"
    path.write_text(agg_line(1) + "\n")
    result = invoke("aggregate", path, "--interval", value)
    assert result.exit_code == 2
    assert "names no interval" in result.stderr and result.stdout == ""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("XRPETH-aggTrades-bad.csv", "junk\n1,2,3\n"),
        ("trades.jsonl", '{"symbol": "X"}\nnot json\n'),
        ("XRPETH-aggTrades-empty.csv", ""),
    ],
)
def test_a_file_with_nothing_valid_fails_saying_so(url, tmp_path, name, text):
    good = tmp_path / "XRPETH-aggTrades-good.csv"
    good.write_text(agg_line(1) + "\n")
    path = tmp_path / name
    path.write_text(text)
    for command in ("load", "aggregate"):
        result = invoke(command, good, path, url=url)
        assert result.exit_code == 1, result.output
        assert f"{path}: nothing valid was read" in result.stderr
        assert "Traceback" not in result.stderr
    # The invalid lines are still kept, and the good file's trade stored.
    with db.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone()[0] == 1
        invalid = conn.execute("SELECT count(*) FROM invalid_trades").fetchone()[0]
    assert invalid == sum(1 for line in text.splitlines() if line.strip())


def test_a_garbage_first_line_is_an_invalid_line_and_a_real_header_is_skipped(tmp_path):
    body = [agg_line(n) for n in range(1, 4)]
    garbage = tmp_path / "XRPETH-aggTrades-garbage.csv"
    garbage.write_text("\n".join(["#!%garbage", *body]) + "\n")
    result = invoke("aggregate", garbage, "--interval", "1h")
    assert result.exit_code == 0, result.output
    assert f"{garbage}:1: invalid: " in result.stderr and "1 invalid lines" in result.stderr
    header = tmp_path / "XRPETH-aggTrades-header.csv"
    names = "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker"
    header.write_text("\n".join([names, *body]) + "\n")
    result = invoke("aggregate", header, "--interval", "1h")
    assert result.exit_code == 0 and "0 invalid lines" in result.stderr
    assert json.loads(result.stdout)["trade_count"] == 3


# --- property: random bytes and out-of-range numbers through every file format --------------

FILES = settings(
    settings.default, max_examples=max(20, settings.default.max_examples // 6), deadline=None
)
FORMATS = ["jsonl", "binance-trades", "binance-aggtrades"]

out_of_range_values = st.one_of(
    st.tuples(st.just("trade_id"), st.integers(2**63, 2**80).map(str)),
    st.tuples(st.just("trade_id"), st.integers(4400, 6000).map(lambda n: "7" * n)),
    st.tuples(
        st.sampled_from(["price", "quantity"]),
        st.integers(1001, 100_000).map(lambda e: f"1E-{e}"),
    ),
    st.tuples(
        st.sampled_from(["price", "quantity"]), st.integers(1002, 3000).map(lambda n: "3" * n)
    ),
    st.tuples(
        st.sampled_from(["price", "quantity"]), st.integers(1001, 9999).map(lambda e: f"2E+{e}")
    ),
    st.tuples(st.just("timestamp"), st.integers(4_102_444_800_000_000, 10**30).map(str)),
    st.tuples(st.just("span"), st.integers(2**31, 2**62).map(str)),
)
garbage = st.binary(max_size=60).map(
    lambda b: b.replace(b"\n", b"").replace(b"\r", b"") + b"\x00"  # never a trade nor a header
)
entries = st.lists(
    st.one_of(
        st.tuples(st.just("good"), st.integers(0, 600)),  # padding: long lines, still good
        st.tuples(st.just("bad"), out_of_range_values),
        st.tuples(st.just("bytes"), garbage),
    ),
    max_size=25,
)


def render(fmt: str, trade_id: int, fields: dict[str, str]) -> bytes:
    values = {
        "trade_id": str(trade_id),
        "price": "1.5",
        "quantity": "0.25",
        "timestamp": str(T0 + trade_id),
        "span": "1",
    } | fields
    if fmt == "jsonl":
        message = {
            "symbol": "XRPETH",
            "trade_id": values["trade_id"],
            "price": values["price"],
            "quantity": values["quantity"],
            "timestamp": values["timestamp"],
        }
        # Ids and times as JSON numbers, prices as strings (both spellings are canonical).
        text = json.dumps(message)
        for name in ("trade_id", "timestamp"):
            text = text.replace(f'"{name}": "{values[name]}"', f'"{name}": {values[name]}')
        return text.encode()
    if fmt == "binance-trades":
        row = [values["trade_id"], values["price"], values["quantity"], "1", values["timestamp"]]
        return ",".join([*row, "True", "True"]).encode()
    first = trade_id
    last = first + int(values["span"]) - 1
    row = [values["trade_id"], values["price"], values["quantity"], str(first), str(last)]
    return ",".join([*row, values["timestamp"], "True", "True"]).encode()


def write_input(tmp, fmt, compressed, drawn):
    """The file's bytes from the drawn entries: good lines (ids = their line numbers, some
    padded long), out-of-range ones, garbage. Returns the path, the good ids, the bad lines."""
    lines, good, bad = [], {}, []
    for number, (kind, value) in enumerate(drawn, 1):
        if kind == "good":
            quantity = "0.25" + "0" * value
            lines.append(render(fmt, number, {"quantity": quantity}))
            good[number] = Decimal("0.25")
        elif kind == "bad":
            name, text = value
            if name == "span" and fmt != "binance-aggtrades":  # only aggTrades have spans
                name, text = "trade_id", str(2**63 + int(text))
            lines.append(render(fmt, number, {name: text}))
            bad.append(number)
        else:
            lines.append(value)
            bad.append(number)
    data = b"".join(line + b"\n" for line in lines)
    suffix = ".jsonl" if fmt == "jsonl" else ".csv"
    path = tmp / f"XRPETH-{fmt}-{uuid.uuid4().hex[:8]}{suffix}"
    if compressed:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path, good, bad


def check_outcome(result, path, good, bad):
    """Never a crash; the exit status the docs give; every bad line named by its number."""
    assert "Traceback" not in result.output and "This is a bug" not in result.stderr
    if good:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1, result.output
        assert f"{path}: nothing valid was read" in result.stderr
    reported = [
        int(m.group(1))
        for m in re.finditer(rf"^{re.escape(str(path))}:(\d+): invalid: ", result.stderr, re.M)
    ]
    assert reported == bad


@FILES
@given(
    fmt=st.sampled_from(FORMATS),
    compressed=st.booleans(),
    drawn=entries,
    workers=st.sampled_from([1, 2]),
)
def test_aggregate_never_crashes_and_folds_every_good_line_once(fmt, compressed, drawn, workers):
    with tempfile.TemporaryDirectory() as tmp:
        path, good, bad = write_input(Path(tmp), fmt, compressed, drawn)
        args = ["aggregate", path, "--input-format", fmt, "--symbol", "XRPETH", "--interval", "1d"]
        result = invoke(*args, "--workers", workers, "--chunk-bytes", 300)
    check_outcome(result, path, good, bad)
    candles = [json.loads(line) for line in result.stdout.splitlines()]
    assert sum(c["trade_count"] for c in candles) == len(good)
    assert sum(Decimal(c["volume"]) for c in candles) == sum(good.values())


@pytest.mark.integration
@FILES
@given(fmt=st.sampled_from(FORMATS), compressed=st.booleans(), drawn=entries)
def test_load_never_crashes_and_stores_every_good_line_once(database_url, fmt, compressed, drawn):
    db.upgrade(database_url)
    with db.connect(database_url) as conn:
        conn.execute("TRUNCATE trades, invalid_trades")
        conn.commit()
    with tempfile.TemporaryDirectory() as tmp:
        path, good, bad = write_input(Path(tmp), fmt, compressed, drawn)
        args = ["load", path, "--input-format", fmt, "--symbol", "XRPETH"]
        result = invoke(*args, url=database_url)
    check_outcome(result, path, good, bad)
    with db.connect(database_url) as conn:
        stored = conn.execute("SELECT trade_id, quantity FROM trades ORDER BY trade_id").fetchall()
        invalid = conn.execute("SELECT source_offset FROM invalid_trades ORDER BY 1").fetchall()
    assert stored == sorted(good.items())
    assert [r[0] for r in invalid] == bad
