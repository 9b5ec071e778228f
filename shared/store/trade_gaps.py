"""``trade_gaps``: the one module that writes it (SPEC §4 "Trade-id continuity", §7).

A gap is a run of trade ids of a symbol never delivered, at a venue whose ids are consecutive.
The stream finds candidates with its partitions' continuity (``shared.core.continuity``); a
candidate is only a hole in what *that partition* saw, and a symbol's trades may arrive on
several partitions (SPEC §4), or have been stored by ``load``. So :func:`record_gaps` checks the
candidates' ids against the stored trades (the key of ``trades`` makes that an index range scan
per candidate) and records only the runs really missing, with the timestamps of the stored trades
on either side. The ids are the table's key, and a run overlapping a gap already recorded is not
recorded again: a gap is one row however many partitions, restarts or sides (stream, batch) find
it.

A gap is *filled* once every one of its ids is stored: :func:`mark_filled` sets ``filled_at`` and
``filled_by`` (``stream`` for a late arrival, ``load``, ``repair``), called in the transaction that
stored them. Readers take :func:`open_gaps` and :func:`gaps_between`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import psycopg
from psycopg.rows import dict_row

from shared.core.continuity import Gap
from shared.core.trades import datetime_to_ts

_EPOCH_PLUS = "timestamptz 'epoch' + {} * interval '1 microsecond'"

#: Each candidate's stored ids with its two neighbours as the ends; the runs between consecutive
#: ones are what is missing. The lateral subquery's LIMIT (an outer column) keeps the planner from
#: flattening it into a join that scans ``trades``: each candidate stays one range of the key.
_RECORD = f"""
WITH candidate AS (
    SELECT * FROM unnest(%(exchange)s::text[], %(symbol)s::text[], %(first)s::int8[],
                         %(last)s::int8[], %(before)s::int8[], %(after)s::int8[])
        AS c(exchange, symbol, first_id, last_id, before_us, after_us)
), edge AS (
    SELECT exchange, symbol, first_id, first_id - 1 AS trade_id,
           {_EPOCH_PLUS.format("before_us")} AS ts
    FROM candidate
    UNION ALL
    SELECT c.exchange, c.symbol, c.first_id, t.trade_id, t.ts
    FROM candidate c CROSS JOIN LATERAL (
        SELECT t.trade_id, t.ts FROM trades t
        WHERE t.exchange = c.exchange AND t.symbol = c.symbol
          AND t.trade_id BETWEEN c.first_id AND c.last_id
        ORDER BY t.trade_id LIMIT c.last_id - c.first_id + 1
    ) t
    UNION ALL
    SELECT exchange, symbol, first_id, last_id + 1, {_EPOCH_PLUS.format("after_us")}
    FROM candidate
), run AS (
    SELECT exchange, symbol, trade_id + 1 AS first_missing_id,
           lead(trade_id) OVER w - 1 AS last_missing_id, ts AS before_ts,
           lead(ts) OVER w AS after_ts
    FROM edge WINDOW w AS (PARTITION BY exchange, symbol, first_id ORDER BY trade_id)
)
INSERT INTO trade_gaps (exchange, symbol, first_missing_id, last_missing_id, before_ts, after_ts,
                        detected_by, topic, partition)
SELECT r.exchange, r.symbol, r.first_missing_id, r.last_missing_id, r.before_ts, r.after_ts,
       %(detected_by)s, %(topic)s, %(partition)s
FROM run r
WHERE r.last_missing_id >= r.first_missing_id
  AND NOT EXISTS (  -- the recorded gap nearest below its end, if it overlaps
      SELECT 1 FROM (
          SELECT g.last_missing_id FROM trade_gaps g
          WHERE g.exchange = r.exchange AND g.symbol = r.symbol
            AND g.first_missing_id <= r.last_missing_id
          ORDER BY g.first_missing_id DESC LIMIT 1
      ) g WHERE g.last_missing_id >= r.first_missing_id)
ORDER BY r.exchange, r.symbol, r.first_missing_id  -- one lock order for every writer
ON CONFLICT DO NOTHING
RETURNING exchange, symbol, first_missing_id, last_missing_id, before_ts, after_ts
"""

_FILLED = """
UPDATE trade_gaps g SET filled_at = now(), filled_by = %(filled_by)s
WHERE g.filled_at IS NULL {where}
  AND (SELECT count(*) FROM trades t
       WHERE t.exchange = g.exchange AND t.symbol = g.symbol
         AND t.trade_id BETWEEN g.first_missing_id AND g.last_missing_id) = g.missing_count
RETURNING exchange, symbol, first_missing_id, last_missing_id, before_ts, after_ts
"""

_COLUMNS = (
    "id, exchange, symbol, first_missing_id, last_missing_id, missing_count, before_ts,"
    " after_ts, detected_by, topic, partition, detected_at, filled_at, filled_by, note"
)


def _gaps(rows: Iterable[tuple]) -> list[Gap]:
    return [
        Gap(exchange, symbol, first, last, datetime_to_ts(before), datetime_to_ts(after))
        for exchange, symbol, first, last, before, after in rows
    ]


def gaps_of(cur: psycopg.Cursor | None) -> list[Gap]:
    """The gaps :func:`record_gaps` recorded or :func:`mark_filled` marked, from its cursor (in
    a pipeline: once it has synced), by symbol and id."""
    if cur is None:
        return []
    return sorted(_gaps(cur.fetchall()), key=lambda g: (g.exchange, g.symbol, g.first_missing_id))


def record_gaps(
    conn: psycopg.Connection,
    candidates: Sequence[Gap],
    *,
    detected_by: str,
    topic: str | None = None,
    partition: int | None = None,
) -> psycopg.Cursor | None:
    """Record the runs of ``candidates``' ids that no stored trade fills and no recorded gap
    overlaps, in the caller's transaction; the gaps recorded are read with :func:`gaps_of`."""
    if not candidates:
        return None
    params = {
        "exchange": [g.exchange for g in candidates],
        "symbol": [g.symbol for g in candidates],
        "first": [g.first_missing_id for g in candidates],
        "last": [g.last_missing_id for g in candidates],
        "before": [g.before_ts_us for g in candidates],
        "after": [g.after_ts_us for g in candidates],
        "detected_by": detected_by,
        "topic": topic,
        "partition": partition,
    }
    return conn.execute(_RECORD, params)


def mark_filled(
    conn: psycopg.Connection,
    filled_by: str,
    symbols: Iterable[tuple[str, str]] | None = None,
    *,
    detected_within: timedelta | None = None,
) -> psycopg.Cursor | None:
    """Mark filled the open gaps every id of which is now stored (of ``symbols`` only, and
    recorded within ``detected_within`` of now, where given), in the caller's transaction, as
    filled by ``filled_by`` (``stream``, ``load``, ``repair``); read them with :func:`gaps_of`."""
    where = []
    params: dict = {"filled_by": filled_by}
    if symbols is not None:
        pairs = sorted(set(symbols))
        if not pairs:
            return None
        where.append(
            "AND (g.exchange, g.symbol) IN"
            " (SELECT * FROM unnest(%(exchanges)s::text[], %(symbols)s::text[]))"
        )
        params["exchanges"] = [e for e, _ in pairs]
        params["symbols"] = [s for _, s in pairs]
    if detected_within is not None:
        where.append("AND g.detected_at >= now() - %(within)s")
        params["within"] = detected_within
    return conn.execute(_FILLED.format(where=" ".join(where)), params)


def open_gap_ids(conn: psycopg.Connection) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """Per (exchange, symbol), the id ranges of its open gaps (for a writer's quick check of
    whether a batch may fill one)."""
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for exchange, symbol, first, last in conn.execute(
        "SELECT exchange, symbol, first_missing_id, last_missing_id FROM trade_gaps"
        " WHERE filled_at IS NULL ORDER BY exchange, symbol, first_missing_id"
    ):
        out.setdefault((exchange, symbol), []).append((first, last))
    if not conn.autocommit:
        conn.rollback()
    return out


def gaps_between(
    conn: psycopg.Connection, start: datetime, end: datetime, *, open_only: bool = False
) -> list[dict]:
    """The gaps whose missing trades may lie in ``[start, end)`` (their neighbours' span meets
    it), oldest first, as rows of every column; ``open_only``: those not filled."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_COLUMNS} FROM trade_gaps WHERE before_ts < %s AND after_ts >= %s"
            + (" AND filled_at IS NULL" if open_only else "")
            + " ORDER BY before_ts, exchange, symbol, first_missing_id",
            (end, start),
        ).fetchall()
    if not conn.autocommit:
        conn.rollback()
    return rows


def open_gaps(conn: psycopg.Connection, start: datetime, end: datetime) -> list[dict]:
    """The open gaps of ``[start, end)`` (see :func:`gaps_between`): what a repair fetches."""
    return gaps_between(conn, start, end, open_only=True)


def note_open(conn: psycopg.Connection, gap_id: int, note: str) -> None:
    """A repair got none of the gap's trades: it stays open, saying why (in the caller's
    transaction)."""
    conn.execute(
        "UPDATE trade_gaps SET note = %s WHERE id = %s AND filled_at IS NULL", (note, gap_id)
    )


def narrow_open(conn: psycopg.Connection, gap: dict, runs: Sequence[Gap], note: str) -> None:
    """A repair got some of the gap's trades: the row narrows to the first run of ids still
    missing, and each further run becomes a row of its own (``detected_by`` as the gap's), all
    open and saying why, so an open row's ids are always what is still missing."""
    first, *more = runs
    conn.execute(
        "UPDATE trade_gaps SET first_missing_id = %s, last_missing_id = %s,"
        f" before_ts = {_EPOCH_PLUS.format('%s')}, after_ts = {_EPOCH_PLUS.format('%s')},"
        " note = %s WHERE id = %s AND filled_at IS NULL",
        (
            first.first_missing_id,
            first.last_missing_id,
            first.before_ts_us,
            first.after_ts_us,
            note,
            gap["id"],
        ),
    )
    for run in more:
        conn.execute(
            "INSERT INTO trade_gaps (exchange, symbol, first_missing_id, last_missing_id,"
            f" before_ts, after_ts, detected_by, note) VALUES (%s, %s, %s, %s,"
            f" {_EPOCH_PLUS.format('%s')}, {_EPOCH_PLUS.format('%s')}, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (
                run.exchange,
                run.symbol,
                run.first_missing_id,
                run.last_missing_id,
                run.before_ts_us,
                run.after_ts_us,
                gap["detected_by"],
                note,
            ),
        )
