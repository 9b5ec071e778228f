"""The data-quality report: the ``dq_reports`` row, the HTML page in a real browser, the CLI."""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest
from click.testing import CliRunner
from PIL import Image

from candlekeep.cli import cli
from shared.batch.batch_run import run_period
from shared.batch.charts import PALETTE, bar_chart
from shared.config import Settings
from shared.store import db

from .browser import dump_dom, screenshot
from .conftest import REPO
from .test_reconcile import simulate_stream

pytestmark = pytest.mark.integration

START, END = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"


@pytest.fixture
def reported(database_url, tmp_path):
    db.upgrade(database_url)
    with db.connect(database_url) as conn:
        conn.execute(
            "TRUNCATE trades, stream_candles, stream_candle_parts, batch_candles, late_trades,"
            " candle_mismatches, dq_reports, stream_progress, invalid_trades, trade_gaps"
        )
        conn.commit()
        simulate_stream(conn, seed=4)
        conn.execute(  # one bug: a stream candle with a wrong close
            "UPDATE stream_candles SET close = close + 1 WHERE ctid = (SELECT ctid FROM"
            " stream_candles WHERE interval = '1m' ORDER BY window_start LIMIT 1)"
        )
        conn.commit()
    settings = Settings(report_dir=str(tmp_path / "reports"))
    summary = run_period(database_url, settings, START, END)
    return database_url, settings, summary, tmp_path


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))


def test_report_row_and_page_open_in_a_browser_with_charts_and_no_console_errors(reported):
    url, _, summary, tmp_path = reported
    assert summary.status == "fail" and summary.counts["unexplained"] == 1
    with db.connect(url) as conn:
        status, stored = conn.execute("SELECT status, summary FROM dq_reports").fetchone()
    assert status == "fail" and stored["counts"] == summary.counts
    page = next((tmp_path / "reports").glob("dq_*.html"))
    html = page.read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    png = tmp_path / "report.png"
    console = screenshot(page.as_uri(), png, tmp_path / "profile")
    assert console == []
    dom = dump_dom(page.as_uri(), tmp_path / "profile2")
    assert dom.count('class="series series-batch"') == 2  # one line chart per symbol
    assert dom.count('class="mismatch"') >= 2
    assert dom.count('class="bar"') >= 7  # lateness buckets
    # The charts were painted: their colours cover real area of the screenshot.
    colours = Counter(Image.open(png).convert("RGB").get_flattened_data())
    assert colours[_rgb(PALETTE["batch"])] > 500
    assert colours[_rgb(PALETTE["bar"])] > 500
    assert colours[_rgb(PALETTE["mismatch"])] > 200
    docs_shot = REPO / "docs" / "images" / "report.png"
    shutil.copy(png, docs_shot)  # the screenshot the docs show, refreshed by every run


def test_reconcile_and_report_commands(reported):
    url, _, _, tmp_path = reported
    env = {"DATABASE_URL": url, "CANDLEKEEP_REPORT_DIR": str(tmp_path / "cli")}
    result = CliRunner().invoke(cli, ["reconcile", "--start", START, "--end", END], env=env)
    assert result.exit_code == 3, result.output  # fail: one unexplained difference
    assert "status FAIL" in result.output and "unexplained 1" in result.output
    assert "1 unexplained difference(s)" in result.output
    out = tmp_path / "range.html"
    result = CliRunner().invoke(
        cli, ["report", "--start", START, "--end", "2026-01-01T00:30:00Z", "-o", str(out)], env=env
    )
    assert result.exit_code == 0, result.output
    assert "2026-01-01T00:30:00+00:00" in out.read_text()
    bad = CliRunner().invoke(cli, ["reconcile", "--start", END, "--end", START], env=env)
    assert bad.exit_code == 1 and "is not after start" in bad.output


#: Every reason code a message can be rejected with, as the invalid-message chart shows them.
REASONS = (
    "bad_key",
    "not_json",
    "not_utf8",
    "not_finite",
    "not_object",
    "wrong_type",
    "not_positive",
    "bad_timestamp",
    "missing_field",
)
MEASURE_LABELS = """<script>
const boxes = [...document.querySelectorAll("svg.chart text.label")].map(t => t.getBBox());
let overlaps = 0;
boxes.forEach((a, i) => boxes.slice(i + 1).forEach(b => {
  if (a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height)
    overlaps++;
}));
document.body.setAttribute("data-labels", boxes.length);
document.body.setAttribute("data-overlaps", overlaps);
</script>"""


def test_bar_labels_do_not_print_over_each_other_in_a_browser(tmp_path):
    """The invalid-message chart names nine reasons in a 560 px chart: measured by the browser,
    no two labels overlap (they alternate between two rows when their slots are too narrow)."""
    page = tmp_path / "bars.html"
    page.write_text(
        "<html><head><style>body { font: 14px system-ui, sans-serif; }"
        " svg.chart text { font-size: 11px; }</style></head><body>"
        + bar_chart([(r, n + 1) for n, r in enumerate(REASONS)])
        + MEASURE_LABELS
        + "</body></html>"
    )
    dom = dump_dom(page.as_uri(), tmp_path / "profile")
    assert re.search(r'data-labels="9"', dom)
    assert re.search(r'data-overlaps="0"', dom), dom[:300]
