"""The check against the venue (SPEC §6.1) on RECORDED Kraken data, against a real PostgreSQL.

The venue is the replay server (``candlekeep/venue_replay.py``) serving Kraken's own answers
(tests/data/venues/kraken, with provenance): 1000 XBTUSDT trades and the 1m OHLC of the same
minutes. The stored trades are those recorded trades, as the venue module reads them; a hole in
them is what a feed that lost trades leaves.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import pytest

from candlekeep.venue_replay import Faults, VenueReplay, load_recordings
from shared.batch import batch_run
from shared.batch.venues.kraken import trade_from_row
from shared.config import Settings
from shared.core.trades import Trade, parse_timestamp
from shared.store import db
from shared.store.trade_store import store_trades

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent / "data" / "venues" / "kraken"
HOUR = ("2025-11-10T19:00:00Z", "2025-11-10T20:00:00Z")
#: Three consecutive trades inside the minute 19:34 (neighbours 10218570 and 10218574 too).
LOST = range(10218571, 10218574)
LOST_MINUTE = "2025-11-10T19:34:00+00:00"


def recorded_trades():
    rows = json.loads((DATA / "trades_XBTUSDT.json").read_text(), parse_float=Decimal)
    return [trade_from_row(r, "BTC-USDT") for r in rows["result"]["XBTUSDT"]]


@pytest.fixture(scope="module")
def replay():
    with VenueReplay(load_recordings()) as server:
        yield server


@pytest.fixture
def settings(replay, monkeypatch, tmp_path):
    monkeypatch.setenv("CANDLEKEEP_VENUE_CHECKS", "true")
    monkeypatch.setenv("CANDLEKEEP_KRAKEN_REST_URL", replay.rest_url("kraken"))
    monkeypatch.setenv("CANDLEKEEP_VENUE_TIMEOUT", "1")
    monkeypatch.setenv("CANDLEKEEP_VENUE_MAX_RETRY_AFTER", "5")
    monkeypatch.setenv("CANDLEKEEP_INTERVALS", "1m")  # the recording has Kraken's 1m OHLC
    monkeypatch.setenv("CANDLEKEEP_REPORT_DIR", str(tmp_path / "reports"))
    replay.faults = Faults()
    return Settings()


@pytest.fixture
def url(database_url):
    db.upgrade(database_url)
    with db.connect(database_url) as conn:
        conn.execute(
            "TRUNCATE trades, stream_candles, stream_candle_parts, batch_candles, late_trades,"
            " candle_mismatches, stream_progress, dq_reports, trade_gaps, exchange_candles,"
            " candle_verifications, feed_reconnects"
        )
        conn.commit()
    return database_url


def store(url, trades):
    with db.connect(url) as conn:
        store_trades(conn, trades)
        conn.commit()


def verdicts(url) -> dict[str, tuple]:
    with db.connect(url) as conn:
        return {
            r[0].isoformat(): r[1:]
            for r in conn.execute(
                "SELECT window_start, verdict, differences, missing_trades, reason"
                " FROM candle_verifications ORDER BY 1"
            ).fetchall()
        }


def gaps(url) -> list[tuple]:
    with db.connect(url) as conn:
        return conn.execute(
            "SELECT first_missing_id, last_missing_id, detected_by, filled_by, filled_at IS NULL"
            " FROM trade_gaps ORDER BY 1"
        ).fetchall()


def requests_to(replay, path: str, since: int) -> list[dict]:
    return [params for where, params, _ in replay.requests[since:] if where == f"kraken{path}"]


def test_every_minute_with_trades_is_verified_against_krakens_own_candles(url, settings, replay):
    store(url, recorded_trades())
    summary = batch_run.run_period(url, settings, *HOUR)
    found = verdicts(url)
    # Kraken's filled minutes (no trade: count 0, the previous close) are not missing candles:
    # one verdict per minute with trades, and every one agrees, vwap truncated included.
    with db.connect(url) as conn:
        minutes = conn.execute(
            "SELECT count(*) FROM batch_candles WHERE window_start >= %s AND window_end <= %s",
            HOUR,
        ).fetchone()[0]
        filled = conn.execute(
            "SELECT count(*) FROM exchange_candles WHERE trade_count = 0"
        ).fetchone()[0]
    assert minutes == len(found) == 45 and filled == 15
    assert {v[0] for v in found.values()} == {"verified"}
    assert summary.venue.counts == {
        "verified": 45,
        "gap": 0,
        "exchange_mismatch": 0,
        "unverified": 0,
    }
    assert summary.trade_gaps == [] and not any("venue" in r for r in summary.reasons)


def test_lost_trades_are_a_gap_that_repair_fills_from_the_venue_once(url, settings, replay):
    store(url, [t for t in recorded_trades() if t.trade_id not in LOST])
    summary = batch_run.run_period(url, settings, *HOUR)
    # The batch run finds exactly the lost ids from the stored trades.
    assert gaps(url) == [(LOST[0], LOST[-1], "batch", None, True)]
    found = verdicts(url)
    verdict, differences, missing, _ = found[LOST_MINUTE]
    assert (verdict, missing) == ("gap", 3)
    assert differences["trade_count"] == {"batch": "10", "venue": "13"}
    assert {v[0] for k, v in found.items() if k != LOST_MINUTE} == {"verified"}
    assert summary.status == "warn"
    assert "kraken:BTC-USDT: 3 trade(s) missing in trade-id gaps still open" in summary.reasons

    before = len(replay.requests)
    repaired = batch_run.repair_period(url, settings, *HOUR)
    asked = requests_to(replay, "/0/public/Trades", before)
    assert len(asked) == 1  # one page from the time of the trade before the hole
    assert repaired.repair.fetched == 3 and repaired.repair.stored == 3
    assert repaired.repair.filled == 1 and repaired.repair.left_open == []
    assert gaps(url) == [(LOST[0], LOST[-1], "batch", "repair", False)]
    assert verdicts(url)[LOST_MINUTE][0] == "verified"
    assert repaired.venue.counts["verified"] == 45 and repaired.venue.counts["gap"] == 0
    with db.connect(url) as conn:
        restored = conn.execute(
            "SELECT trade_id, price, quantity FROM trades WHERE trade_id BETWEEN %s AND %s"
            " ORDER BY 1",
            (LOST[0], LOST[-1]),
        ).fetchall()
    assert restored == [(t.trade_id, t.price, t.quantity) for t in recorded_trades()[363:366]]

    # A second repair has no open gap: it asks the venue for no trade and stores nothing.
    before = len(replay.requests)
    again = batch_run.repair_period(url, settings, *HOUR)
    assert requests_to(replay, "/0/public/Trades", before) == []
    assert (again.repair.gaps, again.repair.stored) == (0, 0)
    assert not any("gap" in r for r in again.reasons)


def test_a_trade_stored_wrong_is_an_exchange_mismatch_and_fails(url, settings):
    trades = recorded_trades()
    wrong = next(i for i, t in enumerate(trades) if t.trade_id == 10218580)
    trades[wrong].quantity += Decimal("0.001")  # no id is missing: nothing explains it
    store(url, trades)
    summary = batch_run.run_period(url, settings, *HOUR)
    mismatched = {k: v for k, v in verdicts(url).items() if v[0] != "verified"}
    assert list(mismatched) == ["2025-11-10T19:35:00+00:00"]
    verdict, differences, missing, _ = mismatched["2025-11-10T19:35:00+00:00"]
    assert verdict == "exchange_mismatch" and missing == 0
    assert "volume" in differences and "trade_count" not in differences
    assert Decimal(differences["volume"]["batch"]) - Decimal(differences["volume"]["venue"]) == (
        Decimal("0.001")
    )
    assert summary.status == "fail"
    assert any("exchange_mismatch" in r for r in summary.reasons)


def test_a_venue_that_is_down_leaves_candles_unverified_and_warns_in_bounded_time(
    url, settings, replay
):
    store(url, recorded_trades())
    replay.set_down(True)
    try:
        started = time.monotonic()
        summary = batch_run.run_period(url, settings, *HOUR)
        took = time.monotonic() - started
    finally:
        replay.set_down(False)
    assert took < 30  # four attempts of at most 1 s, with backoff: asked once, not per minute
    assert summary.venue.counts["unverified"] == 45 and summary.venue.counts["verified"] == 0
    assert summary.status == "warn"
    [problem] = summary.venue.problems
    assert problem.exchange == "kraken" and "unavailable" in problem.reason
    assert any("not checked against the venue (kraken)" in r for r in summary.reasons)
    reasons = {v[3] for v in verdicts(url).values()}
    assert len(reasons) == 1 and "Kraken" in reasons.pop()


def test_a_429_with_retry_after_is_waited_out(url, settings, replay):
    store(url, recorded_trades())
    replay.faults = Faults(rate_limit=(429, 1))
    started = time.monotonic()
    summary = batch_run.run_period(url, settings, *HOUR)
    assert time.monotonic() - started >= 1
    assert summary.venue.counts["verified"] == 45 and summary.venue.problems == []


def test_a_malformed_venue_answer_is_reported_not_a_crash(url, settings, replay):
    store(url, recorded_trades())
    replay.faults = Faults(malformed=True)
    summary = batch_run.run_period(url, settings, *HOUR)
    [problem] = summary.venue.problems
    assert "not JSON" in problem.reason and problem.symbol == "BTC-USDT"
    assert summary.venue.counts["unverified"] == 45 and summary.status == "warn"


def test_an_hour_without_a_trade_of_a_symbol_that_traded_before_is_not_pass(url, settings):
    store(url, recorded_trades())  # the recording ends at 00:13
    batch_run.run_period(url, settings, "2025-11-10T23:00:00Z", "2025-11-11T00:00:00Z")
    quiet = batch_run.run_period(url, settings, "2025-11-11T01:00:00Z", "2025-11-11T02:00:00Z")
    assert quiet.venue.counts == dict.fromkeys(quiet.venue.counts, 0)  # 0 candles compared
    assert quiet.status == "warn"
    [silent] = quiet.silent_symbols
    assert (silent.exchange, silent.symbol) == ("kraken", "BTC-USDT")
    assert any("kraken:BTC-USDT expected but has no trade" in r for r in quiet.reasons)
    # A trade of another kind makes no candle, but the symbol traded: it is not silent.
    other = Trade(
        "kraken",
        "BTC-USDT",
        10**9,
        parse_timestamp("2025-11-11T01:30:00Z"),
        Decimal("1"),
        Decimal("1"),
        kind="adl",
    )
    store(url, [other])
    again = batch_run.run_period(url, settings, "2025-11-11T01:00:00Z", "2025-11-11T02:00:00Z")
    assert again.silent_symbols == [] and again.venue.counts["verified"] == 0


def test_a_configured_symbol_with_no_trade_is_not_pass(url, settings, monkeypatch):
    monkeypatch.setenv("CANDLEKEEP_EXPECTED_SYMBOLS", "kraken:ETH-USDT")
    summary = batch_run.run_period(url, Settings(), *HOUR)  # nothing stored at all
    assert summary.status == "warn"
    assert [(s.symbol, s.last_seen) for s in summary.silent_symbols] == [("ETH-USDT", None)]


def test_an_exchange_without_a_venue_module_is_unverified_without_a_warning(url, settings):
    store(
        url,
        [
            t.__class__(**{**{f: getattr(t, f) for f in t.__struct_fields__}, "exchange": "sim"})
            for t in recorded_trades()
        ],
    )
    summary = batch_run.run_period(url, settings, *HOUR)
    assert summary.venue.counts["unverified"] == 45 and summary.venue.problems == []
    assert not any("venue" in r for r in summary.reasons)
    assert {v[3] for v in verdicts(url).values()} == {
        "candlekeep has no venue module for exchange 'sim': its candles are not checked"
    }


# -- end to end: feed → broker → stream → reconcile → repair ---------------------------------------

#: The recorded trades from 18:5x to 20:02 (past the hour, so that the stream closes it), as
#: Kraken's WebSocket v2 frames; the connection drops before trade 10218571 and LOST are lost.
FRAMES = slice(290, 417)


@pytest.mark.parametrize("_", [None], ids=["kraken"])
def test_a_dropped_feed_connection_is_a_gap_that_repair_makes_verified(
    _, database_url, kafka_bootstrap, settings, replay, monkeypatch
):
    import asyncio

    from candlekeep.venue_replay import Recording
    from stream.worker import StreamWorker

    from .streaming import reset_tables, stream_settings
    from .test_feeds import feed

    reset_tables(database_url)
    recording = load_recordings()["kraken"]
    frames = recording.frames[FRAMES]
    rows = recording.trades["XBTUSDT"][FRAMES]
    drop = next(n for n, r in enumerate(rows) if r[6] == LOST[0])
    live = stream_settings(intervals="1m")
    with VenueReplay(
        {"kraken": Recording(frames=frames)}, Faults(drop_after=drop, skip=len(LOST))
    ) as ws:
        result = feed(
            kafka_bootstrap,
            live.topic_trades,
            "kraken",
            "--symbols",
            "XBT/USDT",
            "--url",
            ws.ws_url("kraken"),
            "--max-trades",
            str(len(frames) - len(LOST)),
        )
    assert result.exit_code == 0, result.output
    asyncio.run(StreamWorker(live, database_url, kafka_bootstrap, exit_when_idle_s=3).run())

    # The stream found the hole live; the batch run finds the same one: exactly the lost ids.
    for name in ("TOPIC_TRADES", "CONSUMER_GROUP"):
        monkeypatch.setenv(f"CANDLEKEEP_{name}", getattr(live, name.lower()))
    checked = Settings()
    summary = batch_run.run_period(database_url, checked, *HOUR)
    assert [(g[0], g[1], g[4]) for g in gaps(database_url)] == [(LOST[0], LOST[-1], True)]
    found = verdicts(database_url)
    assert found[LOST_MINUTE][0] == "gap" and found[LOST_MINUTE][2] == len(LOST)
    assert {v[0] for k, v in found.items() if k != LOST_MINUTE} == {"verified"}
    assert summary.counts["match"] == len(found) and summary.status == "warn"

    before = len(replay.requests)
    repaired = batch_run.repair_period(database_url, checked, *HOUR)
    assert len(requests_to(replay, "/0/public/Trades", before)) == 1
    assert (repaired.repair.fetched, repaired.repair.stored) == (len(LOST), len(LOST))
    assert verdicts(database_url)[LOST_MINUTE][0] == "verified"
    assert repaired.venue.counts["verified"] == len(found)
    # The stream never had the lost trades: stream and batch now differ by exactly them.
    assert repaired.counts["repaired"] == 1 and repaired.counts["unexplained"] == 0
    assert repaired.status == "pass", repaired.reasons

    before = len(replay.requests)
    again = batch_run.repair_period(database_url, checked, *HOUR)
    assert requests_to(replay, "/0/public/Trades", before) == [] and again.repair.stored == 0


# -- Binance spot (recorded trades and hourly klines, tests/data/venues/binance) ---------------


def test_binance_gap_is_repaired_by_id_and_an_open_kline_is_not_a_candle(
    url, settings, replay, monkeypatch
):
    from shared.batch.venues.binance import trade_from_row as binance_trade

    monkeypatch.setenv("CANDLEKEEP_BINANCE_REST_URL", replay.rest_url("binance"))
    monkeypatch.setenv("CANDLEKEEP_INTERVALS", "1h")  # the recording has Binance's 1h klines
    checked = Settings()
    rows = json.loads((DATA.parent / "binance" / "trades_BTCUSDT.json").read_text())
    trades = [binance_trade(r, "binance", "BTCUSDT") for r in rows]
    lost = range(499110500, 499110505)
    store(url, [t for t in trades if t.trade_id not in lost])
    hour = ("2020-12-06T17:00:00Z", "2020-12-06T18:00:00Z")
    summary = batch_run.run_period(url, checked, *hour)
    assert gaps(url) == [(lost[0], lost[-1], "batch", None, True)]
    # The 17:00 kline was still open at the venue's clock (the answer's Date, 17:55:16): only
    # closed candles are the venue's word, so the hour is not verified, and the report says so.
    [(verdict, _, _, reason)] = verdicts(url).values()
    assert verdict == "unverified" and reason == "binance has no candle for this window"
    assert summary.status == "warn"
    assert any("no candle for 1 window(s)" in r for r in summary.reasons)

    before = len(replay.requests)
    repaired = batch_run.repair_period(url, checked, *hour)
    asked = [p for where, p, _ in replay.requests[before:] if where.endswith("historicalTrades")]
    assert asked == [{"symbol": "BTCUSDT", "fromId": str(lost[0]), "limit": str(len(lost))}]
    assert (repaired.repair.stored, repaired.repair.filled) == (len(lost), 1)
    assert gaps(url) == [(lost[0], lost[-1], "batch", "repair", False)]
    before = len(replay.requests)
    batch_run.repair_period(url, checked, *hour)
    assert not [w for w, _, _ in replay.requests[before:] if w.endswith("historicalTrades")]


def test_a_venue_candle_before_the_first_stored_trade_is_unverified_not_a_mismatch(
    url, settings, replay, monkeypatch
):
    from shared.batch.venues.binance import trade_from_row as binance_trade

    monkeypatch.setenv("CANDLEKEEP_BINANCE_REST_URL", replay.rest_url("binance"))
    monkeypatch.setenv("CANDLEKEEP_INTERVALS", "1h")
    monkeypatch.setenv("CANDLEKEEP_EXPECTED_SYMBOLS", "binance:BTCUSDT")
    rows = json.loads((DATA.parent / "binance" / "trades_BTCUSDT.json").read_text())
    store(url, [binance_trade(r, "binance", "BTCUSDT") for r in rows])
    # 16:00 traded at Binance (its closed kline), before candlekeep's first trade (17:52): the
    # feed had not started, so no trade of that hour is expected to be stored.
    summary = batch_run.run_period(url, Settings(), "2020-12-06T16:00Z", "2020-12-06T17:00Z")
    [(verdict, _, _, reason)] = verdicts(url).values()
    assert verdict == "unverified" and "before candlekeep's first stored trade" in reason
    assert summary.venue.problems == [] and not any("venue" in r for r in summary.reasons)
    assert any("binance:BTCUSDT expected but has no trade" in r for r in summary.reasons)


def test_ids_the_venue_no_longer_serves_stay_open_with_the_reason(url, settings, monkeypatch):
    from candlekeep.venue_replay import Recording
    from shared.batch.venues.binance import trade_from_row as binance_trade

    recorded = load_recordings()["binance"]
    rows = recorded.trades["BTCUSDT"]
    lost = range(499110500, 499110506)
    gone = {499110502, 499110503}  # the venue no longer serves these two (withheld rows)
    served = Recording(
        klines=recorded.klines,
        trades={"BTCUSDT": [r for r in rows if r["id"] not in gone]},
        date=recorded.date,
    )
    with VenueReplay({"binance": served}) as venue:
        monkeypatch.setenv("CANDLEKEEP_BINANCE_REST_URL", venue.rest_url("binance"))
        monkeypatch.setenv("CANDLEKEEP_INTERVALS", "1h")
        checked = Settings()
        trades = [binance_trade(r, "binance", "BTCUSDT") for r in rows]
        store(url, [t for t in trades if t.trade_id not in lost])
        hour = ("2020-12-06T17:00:00Z", "2020-12-06T18:00:00Z")
        repaired = batch_run.repair_period(url, checked, *hour)
        assert (repaired.repair.fetched, repaired.repair.stored) == (4, 4)
        assert [(o.first_missing_id, o.last_missing_id) for o in repaired.repair.left_open] == [
            (499110502, 499110503)
        ]
        # The gap narrows to what is still missing, open, saying why; the report says it too.
        with db.connect(url) as conn:
            rows_now = conn.execute(
                "SELECT first_missing_id, last_missing_id, filled_at IS NULL, note"
                " FROM trade_gaps ORDER BY 1"
            ).fetchall()
        [(first, last, still_open, note)] = rows_now
        assert (first, last, still_open) == (499110502, 499110503, True)
        assert "served no trade with these ids" in note
        assert "binance:BTCUSDT: 2 trade(s) missing in trade-id gaps still open" in (
            repaired.reasons
        )
        # Asked again, the venue still does not serve them: nothing more is stored.
        again = batch_run.repair_period(url, checked, *hour)
        assert (again.repair.gaps, again.repair.stored, len(again.repair.left_open)) == (1, 0, 1)


def test_reconcile_prints_the_three_way_table_and_repair_what_it_did(url, settings):
    from click.testing import CliRunner

    from candlekeep.cli import cli

    store(url, [t for t in recorded_trades() if t.trade_id not in LOST])
    env = {"DATABASE_URL": url}
    result = CliRunner().invoke(cli, ["reconcile", "--start", HOUR[0], "--end", HOUR[1]], env=env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "interval" in line and "verified" in line)
    minute = next(line for line in lines if line.split()[:1] == ["1m"])
    assert "stream vs batch" in result.output and "batch vs venue" in result.output
    cells = dict(zip(header.split(), minute.split(), strict=True))
    assert (cells["verified"], cells["gap"], cells["exchange_mismatch"]) == ("44", "1", "0")
    assert cells["missing_in_stream"] == "45"  # no stream ran: every batch candle
    result = CliRunner().invoke(cli, ["repair", "--start", HOUR[0], "--end", HOUR[1]], env=env)
    assert result.exit_code == 0, result.output
    assert "repair: 1 open gap(s) asked for, 1 filled, 3 trade(s) fetched, 3 stored" in (
        result.output
    )
    minute = next(line for line in result.output.splitlines() if line.split()[:1] == ["1m"])
    assert dict(zip(header.split(), minute.split(), strict=True))["verified"] == "45"


def test_the_report_page_shows_the_three_way_table_the_gaps_and_the_reconnects(
    url, settings, tmp_path
):
    from datetime import datetime

    from shared.batch.report import report_path
    from shared.store.feed_reconnects import record_reconnect

    from .browser import dump_dom

    store(url, [t for t in recorded_trades() if t.trade_id not in LOST])
    with db.connect(url) as conn:
        record_reconnect(
            conn,
            "kraken",
            "BTC-USDT",
            LOST[0] - 1,
            LOST[-1] + 1,
            datetime.fromisoformat("2025-11-10T19:34:39.9+00:00"),
            datetime.fromisoformat("2025-11-10T19:34:40.7+00:00"),
        )
        conn.commit()
    summary = batch_run.run_period(url, settings, *HOUR)
    [reconnect] = summary.reconnects
    assert (reconnect.last_id_before, reconnect.first_id_after) == (LOST[0] - 1, LOST[-1] + 1)
    dom = dump_dom(report_path(settings, summary).as_uri(), tmp_path / "profile")
    three_way = dom[
        dom.index('id="three-way"') : dom.index("</table>", dom.index('id="three-way"'))
    ]
    assert "batch vs venue" in three_way and ">44<" in three_way  # 44 verified, 1 gap
    gaps_table = dom[dom.index('id="trade-gaps"') :]
    assert f"{LOST[0]} – {LOST[-1]}" in gaps_table and "<b>open</b>" in gaps_table
    reconnects = dom[dom.index('id="reconnects"') :]
    assert f">{len(LOST)}</td>" in reconnects  # the ids the reconnect skipped
    contradicted = dom[dom.index('id="verifications"') :]
    assert "trade_count</code>: 10 → 13" in contradicted


def test_a_period_older_than_the_venue_serves_is_unverified_for_that_request_only(
    url, settings, monkeypatch
):
    monkeypatch.setenv("CANDLEKEEP_EXPECTED_SYMBOLS", "kraken:BTC-USDT")
    # Kraken serves its latest 720 1m candles: 11:00 is before the recording's oldest (12:17).
    summary = batch_run.run_period(url, Settings(), "2025-11-10T11:00Z", "2025-11-10T12:00Z")
    [problem] = summary.venue.problems
    assert (problem.exchange, problem.symbol, problem.interval) == ("kraken", "BTC-USDT", "1m")
    assert "latest 720" in problem.reason and summary.status == "warn"
