"""Reconciliation (SPEC §6 step 3): compare stream and batch candles and explain every difference.

For every candle key a run owns (see ``shared.batch.recompute.owned_windows``), in SQL:

- ``match``: both candles exist and every field is equal;
- ``missing_in_batch``: a stream candle and no stored trade behind it;
- ``late``: they differ, and recomputing the window from its trades *without the late ones*
  gives exactly the stream's candle (or, where every trade of the window was late, no candle);
- ``repaired``: they differ, and recomputing the window without the trades a repair fetched
  from the venue (the ids of ``trade_gaps`` rows filled by ``repair``: trades the feed never
  delivered, so the stream never had them), and without its late ones, gives exactly the
  stream's candle (or no candle, where the stream has none);
- ``missing_in_stream``: a batch candle, no stream candle, and late trades do not explain it;
- ``unexplained``: any other difference: a bug or lost data.

Every non-match becomes a ``candle_mismatches`` row carrying, for each field that differs, the
stream's and the batch's value. A rerun replaces the run's rows, in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg

from shared.batch.candle_sql import STATE, base_fold, candle_columns, rollup, same
from shared.batch.recompute import fold_settings, owned_windows
from shared.core.candles import CANDLE_FIELDS
from shared.core.intervals import IntervalSet
from shared.store.schema import MISMATCH_KINDS

KINDS = ("match", *MISMATCH_KINDS)
FIELDS = CANDLE_FIELDS


@dataclass
class Reconciliation:
    """Counts of each kind, overall and per interval."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    by_interval: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def compared(self) -> int:
        return sum(self.counts.values())


def _ranges_sql(start: datetime, end: datetime, intervals: IntervalSet) -> tuple[str, list]:
    rows, params = [], []
    for window_range in owned_windows(start, end, intervals):
        rows.append("(%s::text, %s::timestamptz, %s::timestamptz, %s::interval)")
        params += [
            window_range.interval.name,
            window_range.first_start,
            window_range.last_end,
            timedelta(microseconds=window_range.interval.length_us),
        ]
    return "VALUES " + ", ".join(rows), params


def _windows_sql(start: datetime, end: datetime, intervals: IntervalSet) -> tuple[str, dict]:
    """Every interval's windows rolled up from the ``states`` CTE (the base interval too: a
    window's on-time states and its late count are two rows)."""
    ranges = owned_windows(start, end, intervals)
    params: dict = {
        "base_len": timedelta(microseconds=intervals.base.length_us),
        "scan_start": min(r.first_start for r in ranges),
        "scan_end": ranges[0].last_end,
    }
    selects = []
    for n, window_range in enumerate(ranges):
        params[f"name{n}"] = window_range.interval.name
        params[f"len{n}"] = timedelta(microseconds=window_range.interval.length_us)
        merged = rollup(f"%(len{n})s", "states", sums=("late_trades", "repaired_trades"))
        selects.append(f"SELECT %(name{n})s::text AS interval, r.* FROM ({merged}) AS r")
    return " UNION ALL ".join(selects), params


_PAIRS = """
CREATE TEMP TABLE reconcile_pairs ON COMMIT DROP AS
WITH ranges(interval, first_start, last_end, length) AS ({ranges}),
keys AS (
    SELECT c.exchange, c.symbol, c.interval, c.window_start, c.window_end
    FROM batch_candles c JOIN ranges r USING (interval)
    WHERE c.window_start >= r.first_start AND c.window_end <= r.last_end
    UNION
    SELECT c.exchange, c.symbol, c.interval, c.window_start, c.window_end
    FROM stream_candles c JOIN ranges r USING (interval)
    WHERE c.window_start >= r.first_start AND c.window_end <= r.last_end
)
SELECT k.*, b.exchange IS NOT NULL AS in_batch, s.exchange IS NOT NULL AS in_stream,
       ({same_bs}) AS equal,
       {b_fields}, {s_fields}
FROM keys k
LEFT JOIN batch_candles b USING (exchange, symbol, interval, window_start)
LEFT JOIN stream_candles s USING (exchange, symbol, interval, window_start)
"""

# The stored trades of the symbols with a differing key that a stream never folded: the late ones
# (a late row explains the stored trade only if it is that copy, same id and ts; the stream never
# folds nor sets aside a later copy; found with one key probe each, ``LIMIT 1`` keeping the
# planner from joining them with a scan of the hour) and those a repair fetched (ids in a
# ``trade_gaps`` range filled by ``repair``), one row per trade (a trade may be both), keyed by
# the trade's identity. A table of its own, analysed, so that the fold below leaves them out with
# one hash anti-join on its scan and one key probe in its open/close probes: written as ``NOT
# EXISTS`` on ``late_trades`` and ``trade_gaps`` directly, the range condition and the estimates
# (often an empty ``trade_gaps``) made the planner read every trade through the primary key for
# merge joins and sort them for a group aggregate, or hash all of the hour's trades: 2.5 to 3
# times the recomputation of the same hour.
_EXCLUDED = """
CREATE TEMP TABLE reconcile_excluded ON COMMIT DROP AS
SELECT exchange, symbol, trade_id, min(ts) AS ts, bool_or(late) AS late,
       bool_or(repaired) AS repaired
FROM (
    SELECT t.exchange, t.symbol, t.trade_id, t.ts, true AS late, false AS repaired
    FROM late_trades AS l
    CROSS JOIN LATERAL (
        SELECT t.exchange, t.symbol, t.trade_id, t.ts FROM trades AS t
        WHERE t.exchange = l.exchange AND t.symbol = l.symbol AND t.trade_id = l.trade_id
          AND t.ts = l.ts
        LIMIT 1
    ) AS t
    WHERE l.ts >= %(scan_start)s AND l.ts < %(scan_end)s
      AND l.exchange = ANY(%(exchanges)s) AND l.symbol = ANY(%(symbols)s)
    UNION ALL
    SELECT t.exchange, t.symbol, t.trade_id, t.ts, false, true
    FROM trade_gaps AS g
    JOIN trades AS t ON t.exchange = g.exchange AND t.symbol = g.symbol
                    AND t.trade_id BETWEEN g.first_missing_id AND g.last_missing_id
    WHERE g.filled_by = 'repair' AND t.ts >= %(scan_start)s AND t.ts < %(scan_end)s
      AND g.exchange = ANY(%(exchanges)s) AND g.symbol = ANY(%(symbols)s)
) AS x
GROUP BY 1, 2, 3
"""

# The windows recomputed from their trades without the excluded ones, set-based, for the symbols
# with a differing key: the fold of ``candle_sql`` over the run's trades not in
# ``reconcile_excluded``, and each window's count of late and of repaired trades; both merged
# into the larger intervals by the one rollup; kept only for the keys that differ. A window whose
# trades were all late has no on-time state (``first`` is NULL).
_KEPT = (
    "NOT EXISTS (SELECT 1 FROM reconcile_excluded AS e WHERE e.exchange = t.exchange"
    " AND e.symbol = t.symbol AND e.trade_id = t.trade_id)"
)
#: The trades of the exchanges and symbols with a differing key (a superset of the differing
#: pairs: only what is folded, the windows kept are those of differing keys). Constant arrays
#: the planner hashes and estimates from the column statistics; a semi-join with the pairs
#: made it expect 5,000 of an hour's 1M trades and sort them all for a group aggregate.
_DIFFERING = "t.exchange = ANY(%(exchanges)s) AND t.symbol = ANY(%(symbols)s)"
_STATE_NULLS = ", ".join(f"NULL AS {col}" for col in STATE)
_WITHOUT_LATE = f"""
CREATE TEMP TABLE reconcile_without_late ON COMMIT DROP AS
WITH {base_fold(scan=_DIFFERING, kept=_KEPT)},
excluded AS (
    SELECT exchange, symbol, date_bin(%(base_len)s, ts, timestamptz 'epoch') AS window_start,
           count(*) FILTER (WHERE late) AS late_trades,
           count(*) FILTER (WHERE repaired) AS repaired_trades
    FROM reconcile_excluded
    GROUP BY 1, 2, 3
),
states AS (
    SELECT exchange, symbol, window_start, {", ".join(STATE)}, 0 AS late_trades,
           0 AS repaired_trades FROM base
    UNION ALL
    SELECT exchange, symbol, window_start, {_STATE_NULLS}, late_trades, repaired_trades
    FROM excluded
),
windows AS ({{windows}})
SELECT p.exchange, p.symbol, p.interval, p.window_start, x.first IS NOT NULL AS on_time,
       x.late_trades, x.repaired_trades, {candle_columns()}
FROM reconcile_pairs p
JOIN windows x USING (exchange, symbol, interval, window_start)
WHERE NOT p.equal
{{no_data}}"""

_CLASSIFY = """
CREATE TEMP TABLE reconcile_kinds ON COMMIT DROP AS
SELECT p.exchange, p.symbol, p.interval, p.window_start, coalesce(w.late_trades, 0) AS late,
       CASE
           WHEN p.equal AND p.in_batch AND p.in_stream THEN 'match'
           WHEN p.in_stream AND NOT p.in_batch THEN 'missing_in_batch'
           WHEN (w.late_trades > 0 OR w.repaired_trades > 0) AND (
                (NOT w.on_time AND NOT p.in_stream)
                OR (w.on_time AND p.in_stream AND {same_ws})
           ) THEN CASE WHEN w.repaired_trades > 0 THEN 'repaired' ELSE 'late' END
           WHEN NOT p.in_stream THEN 'missing_in_stream'
           ELSE 'unexplained'
       END AS kind
FROM reconcile_pairs p
LEFT JOIN reconcile_without_late w USING (exchange, symbol, interval, window_start)
"""

_DIFFERENCES = """
(SELECT coalesce(jsonb_object_agg(f.name, jsonb_build_object('stream', f.s::text,
                                                              'batch', f.b::text)), '{{}}')
 FROM (VALUES {values}) AS f(name, s, b)
 WHERE f.s IS DISTINCT FROM f.b)
"""


def classify(
    conn: psycopg.Connection, start: datetime, end: datetime, intervals: IntervalSet
) -> Reconciliation:
    """Classify every owned key and replace the run's ``candle_mismatches`` rows, in one
    transaction (the caller's, if one is open)."""
    ranges, params = _ranges_sql(start, end, intervals)
    b_fields = ", ".join(f"b.{f} AS b_{f}" for f in FIELDS)
    s_fields = ", ".join(f"s.{f} AS s_{f}" for f in FIELDS)
    values = ", ".join(f"('{f}', p.s_{f}::numeric, p.b_{f}::numeric)" for f in FIELDS)
    with conn.transaction():
        conn.execute(
            _PAIRS.format(
                ranges=ranges, same_bs=same("b", "s"), b_fields=b_fields, s_fields=s_fields
            ),
            params,
        )
        windows, scan = _windows_sql(start, end, intervals)
        exchanges, symbols = conn.execute(
            "SELECT array_agg(DISTINCT exchange), array_agg(DISTINCT symbol)"
            " FROM reconcile_pairs WHERE NOT equal"
        ).fetchone()
        scan |= {"exchanges": exchanges or [], "symbols": symbols or []}
        conn.execute(_EXCLUDED, scan)
        conn.execute("ALTER TABLE reconcile_excluded ADD PRIMARY KEY (exchange, symbol, trade_id)")
        conn.execute("ANALYZE reconcile_excluded")
        # JIT off (fold_settings): the planner cannot count a fold's windows (it takes every
        # trade for a window), so the key probes look costly and JIT would compile the
        # statement: 5.5 s of compiling for 0.9 s of work on an hour of 500k trades. Where no
        # key differs, the table is made empty without reading a trade.
        with fold_settings(conn):
            conn.execute(
                _WITHOUT_LATE.format(windows=windows, no_data="" if symbols else "WITH NO DATA"),
                scan,
            )
        same_ws = " AND ".join(f"w.{f} IS NOT DISTINCT FROM p.s_{f}" for f in FIELDS)
        conn.execute(_CLASSIFY.format(same_ws=same_ws))
        conn.execute(
            f"DELETE FROM candle_mismatches m USING ({ranges}) AS r(interval, first_start,"
            " last_end, length) WHERE m.interval = r.interval"
            " AND m.window_start >= r.first_start AND m.window_start + r.length <= r.last_end",
            params,
        )
        conn.execute(
            "INSERT INTO candle_mismatches (exchange, symbol, interval, window_start, kind,"
            " differences, late_trades)"
            " SELECT k.exchange, k.symbol, k.interval, k.window_start, k.kind,"
            f" {_DIFFERENCES.format(values=values)}, k.late"
            " FROM reconcile_kinds k JOIN reconcile_pairs p"
            " USING (exchange, symbol, interval, window_start) WHERE k.kind <> 'match'"
        )
        rows = conn.execute(
            "SELECT interval, kind, count(*) FROM reconcile_kinds GROUP BY 1, 2"
        ).fetchall()
    result = Reconciliation()
    for interval, kind, count in rows:
        result.counts[kind] += count
        result.by_interval.setdefault(interval, dict.fromkeys(KINDS, 0))[kind] = count
    return result
