"""``candlekeep aggregate``: Binance's own klines reproduced, formats, invalid lines, errors."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
import zipfile
from decimal import Decimal

import pytest
from click.testing import CliRunner

from candlekeep.cli import cli

from .conftest import SAMPLE_DIR

AGG = SAMPLE_DIR / "XRPETH-aggTrades-2019-10-11_13.csv"


def run(*args, ok=True):
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def binance_klines(name):
    with open(SAMPLE_DIR / f"XRPETH-klines-{name}-2019-10-11_13.csv") as handle:
        rows = list(csv.reader(handle))[1:]
    return rows[:-1]  # the last kline covers time after the last trade: partial


@pytest.mark.parametrize("interval", ["1m", "5m"])
def test_fill_gaps_reproduces_every_binance_kline(tmp_path, interval):
    out = tmp_path / "klines.csv"
    run(
        "aggregate",
        AGG,
        "--fill-gaps",
        "--output-format",
        "binance-klines",
        "--interval",
        interval,
        "-o",
        out,
    )
    mine = list(csv.reader(out.open()))
    reference = binance_klines(interval)
    assert len(reference) > 700
    # Ours ends with the last trade's window, which is Binance's partial last kline: left out.
    assert len(mine) == len(reference) + 1
    for ours, theirs in zip(mine[:-1], reference, strict=True):
        assert ours[0] == theirs[0]
        assert [Decimal(v) for v in ours[1:6]] == [Decimal(v) for v in theirs[1:6]], theirs[0]
        assert len(ours) == 12
        assert int(ours[6]) == int(ours[0]) + {"1m": 60_000, "5m": 300_000}[interval] - 1
    empty = [row for row in mine if Decimal(row[5]) == 0]
    assert empty, "the sample has trade-less minutes, filled like Binance does"
    assert all(row[8] == "0" for row in empty)


def test_aggtrades_trade_count_counts_raw_trades(tmp_path):
    out = tmp_path / "c.jsonl"
    run("aggregate", AGG, "--interval", "1h", "-o", out)
    candles = [json.loads(line) for line in out.open()]
    total = sum(c["trade_count"] for c in candles)
    with AGG.open() as handle:
        raw = sum(int(r[4]) - int(r[3]) + 1 for r in csv.reader(handle))
    assert total == raw > 12477  # more raw trades than aggregated ones


def test_jsonl_output_has_every_field_as_exact_strings(tmp_path):
    out = tmp_path / "c.jsonl"
    run("aggregate", AGG, "-o", out)
    candles = [json.loads(line) for line in out.open()]
    assert {c["interval"] for c in candles} == {"1m", "5m", "15m", "1h"}
    first = candles[0]
    assert first == {
        "exchange": "binance",
        "symbol": "XRPETH",
        "interval": "1m",
        "window_start": "2019-10-11T00:00:00Z",
        "window_end": "2019-10-11T00:01:00Z",
        "open": "0.00141342",
        "high": "0.00141557",
        "low": "0.00141266",
        "close": "0.00141418",
        "volume": "1482.00000000",
        "quote_volume": "2.0955056400000000",
        "trade_count": 9,
        "first_trade_id": 13519807,
        "last_trade_id": 13519815,
        "taker_buy_volume": "1182.00000000",
        "taker_buy_quote_volume": "1.6711193600000000",
    }


def test_invalid_lines_are_reported_and_the_lines_around_them_still_count(tmp_path):
    lines = AGG.read_text().splitlines()[:6]
    bad = [
        "13519900,abc,1.0,1,1,1570752011620,True,True",  # price not a number
        "13519901,0.001,-1,1,1,1570752011620,True,True",  # negative quantity
        "13519902,0.001,1,1,1,1570752011620,maybe,True",  # bad side
        "13519903,0.001,1,1,1",  # too few columns
        "13519904,NaN,1,1,1,1570752011620,True,True",  # not finite
        "13519905,0.001,1,5,1,1570752011620,True,True",  # last id < first id
        "13519906,0.001,1,1,1,99999999999999999999,True,True",  # impossible timestamp
    ]
    path = tmp_path / "XRPETH-aggTrades-mixed.csv"
    path.write_text("\n".join(lines[:3] + bad + lines[3:]) + "\n")
    out = tmp_path / "c.jsonl"
    result = run("aggregate", path, "--interval", "1h", "-o", out)
    for n, word in zip(
        range(4, 11),
        ["price", "quantity", "is_buyer_maker", "columns", "finite", "last_trade_id", "timestamp"],
        strict=True,
    ):
        assert f"{path}:{n}: invalid:" in result.stderr
        assert word in next(line for line in result.stderr.splitlines() if f":{n}: " in line)
    candle = json.loads(out.read_text())
    reference = json.loads(run("aggregate", AGG, "--interval", "1h").stdout.splitlines()[0])
    assert candle["first_trade_id"] == reference["first_trade_id"]
    assert "7 invalid lines" in result.stderr


def test_jsonl_input_with_malformed_lines(tmp_path):
    path = tmp_path / "trades.jsonl"
    path.write_text(
        '{"symbol":"BTCUSDT","trade_id":1,"price":"100","quantity":"1","timestamp":1700000000000}\n'
        "not json\n"
        '{"symbol":"BTCUSDT","trade_id":2,"price":"0","quantity":"1","timestamp":1700000001000}\n'
        '{"symbol":"BTCUSDT","trade_id":3,"price":"101","quantity":"2","timestamp":1700000002000}\n'
        '{"symbol":"BTCUSDT","trade_id":1,"price":"100","quantity":"1","timestamp":1700000000000}\n'
    )
    result = run("aggregate", path, "--interval", "1m")
    assert ":2: invalid: message is not valid JSON" in result.stderr
    assert ":3: invalid: price: must be greater than 0" in result.stderr
    assert "1 duplicates, 0 conflicting, 2 invalid lines" in result.stderr
    candle = json.loads(result.stdout)
    assert (candle["trade_count"], candle["volume"], candle["close"]) == (2, "3", "101")


def test_binance_spot_trades_in_microseconds_from_zip_and_gzip(tmp_path):
    rows = [
        "1,100.5,0.1,10.05,1735689600000000,true,true",
        "2,101.0,0.2,20.2,1735689601000000,false,true",
        "3,99.0,0.3,29.7,1735689660000000,true,true",
    ]
    plain = tmp_path / "BTCUSDT-trades-2025-01-01.csv"
    plain.write_text("\n".join(rows) + "\n")
    with zipfile.ZipFile(tmp_path / "BTCUSDT-trades-2025-01-01.zip", "w") as archive:
        archive.write(plain, plain.name)
    with gzip.open(tmp_path / "BTCUSDT-trades-2025-01-01.csv.gz", "wt") as handle:
        handle.write("\n".join(rows) + "\n")
    outputs = set()
    for name in [
        "BTCUSDT-trades-2025-01-01.csv",
        "BTCUSDT-trades-2025-01-01.zip",
        "BTCUSDT-trades-2025-01-01.csv.gz",
    ]:
        result = run("aggregate", tmp_path / name, "--output-format", "binance-klines")
        outputs.add(result.stdout)
    assert len(outputs) == 1
    first, second = [line.split(",") for line in outputs.pop().splitlines()]
    assert first[:9] == [
        "1735689600000000",
        "100.5",
        "101.0",
        "100.5",
        "101.0",
        "0.3",
        "1735689659999999",
        "30.25",
        "2",
    ]
    assert first[9:11] == ["0.2", "20.20"]  # only trade 2 was a taker buy
    assert second[0] == "1735689660000000"


def test_symbol_comes_from_the_option_or_the_file_name(tmp_path):
    path = tmp_path / "trades.csv"
    shutil.copy(AGG, path)
    result = run("aggregate", path, ok=False)
    assert result.exit_code == 1 and "--symbol" in result.output
    result = run("aggregate", path, "--symbol", "xrpeth", "--interval", "1h")
    assert '"symbol":"XRPETH"' in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.csv"], "missing.csv: no such file"),
        ([str(AGG), "--interval", "7m"], "unknown interval '7m'"),
        ([str(AGG), "--interval", "5m,7m"], "unknown interval '7m'"),
        (
            [str(AGG), "--output-format", "binance-klines", "--interval", "1m,5m"],
            "one interval per file",
        ),
        ([str(AGG), "--input-format", "parquet"], "Invalid value for '--input-format'"),
    ],
)
def test_errors_are_one_clear_line_without_a_traceback(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "candlekeep", "aggregate", *args], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_format_is_a_clear_error(tmp_path):
    path = tmp_path / "XRPETH.txt"
    path.write_text("a;b;c\n")
    result = run("aggregate", path, ok=False)
    assert "cannot tell the format" in result.output and "--input-format" in result.output


def test_bad_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CANDLEKEEP_INTERVALS", "1m,7m")
    result = run("aggregate", AGG, ok=False)
    assert result.exit_code == 1
    assert "CANDLEKEEP_INTERVALS" in result.output
