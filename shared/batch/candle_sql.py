"""The candle fold in SQL (SPEC §3): the one definition recompute, reconcile and the checks use.

A candle is built in two stages, as in the core (``shared.core.candles``), over *fold states*:
one row per (exchange, symbol, window_start) with the columns of ``STATE``. ``first`` and
``last`` are ``ARRAY[epoch, trade_id, price]`` of the window's first and last trade by
``(ts, trade_id)``, so that merging states is ``min``/``max`` of arrays (compared element by
element) and the other columns merge by ``max``/``min``/``sum``/``bool_or``:

- ``base_fold``: trades → the states of base windows (the CTEs ``aggregate`` and ``base``);
- ``candle_states``: stored base candles (a candle table's rows) → states;
- ``rollup``: states → the states of a larger interval's windows;
- ``candle_columns``: a state → the candle fields of SPEC §3, in ``CANDLE_FIELDS`` order.

``recompute`` folds all stored trades; ``reconcile`` folds them without the late ones; the
rollup check merges the stored base candles of either candle table and compares them with the
stored larger candles. Because all three build on these functions, "the batch's larger candles
are the merge of its base candles" holds by construction, and tests/test_reconcile.py checks the
SQL fold against the core's fold in Python.
"""

from __future__ import annotations

from shared.core.candles import CANDLE_FIELDS

#: How each column of a fold state merges into a larger window's state.
MERGE = {
    "first": "min",
    "last": "max",
    "high": "max",
    "low": "min",
    "volume": "sum",
    "quote_volume": "sum",
    "trade_count": "sum",
    "sided": "bool_or",  # some trade said which side was the taker
    "taker_volume": "sum",
    "taker_quote": "sum",
}
STATE = tuple(MERGE)

#: Each candle field (SPEC §3) from a fold state. Taker-buy volumes are NULL unless a trade said
#: which side it was, and 0 (not NULL) where trades said so but none was a taker buy.
_FIELD = {
    "open": "first[3]",
    "high": "high",
    "low": "low",
    "close": "last[3]",
    "volume": "volume",
    "quote_volume": "quote_volume",
    "trade_count": "trade_count",
    "first_trade_id": "first[2]::bigint",
    "last_trade_id": "last[2]::bigint",
    "taker_buy_volume": "CASE WHEN sided THEN coalesce(taker_volume, 0) END",
    "taker_buy_quote_volume": "CASE WHEN sided THEN coalesce(taker_quote, 0) END",
}
assert tuple(_FIELD) == CANDLE_FIELDS, "a candle field without its SQL (or out of order)"

#: The columns of a candle table's row, in the order the INSERTs write them.
CANDLE_COLUMNS = ("exchange", "symbol", "interval", "window_start", "window_end", *CANDLE_FIELDS)


#: Only order-book trades are folded (SPEC §2 ``kind``: a venue's other trades are stored and
#: reported, and its own klines leave them out).
MARKET_ONLY = "t.kind = 'market'"


def base_fold(*, scan: str = "", kept: str = "") -> str:
    """The CTEs ``aggregate`` and ``base``: the fold states of the base windows of the trades
    ``t`` with ``ts`` in ``[%(scan_start)s, %(scan_end)s)`` (and ``scan``), of which only those
    matching ``kept`` (SQL on ``t``; every trade when empty) and :data:`MARKET_ONLY` are folded.
    ``%(base_len)s`` is the base interval's length.

    A hash-aggregate pass computes every column but ``first`` and ``last``, and each window's
    least and greatest ``ts`` and ``trade_id``; ``first`` and ``last`` then come from one probe
    each of the primary key (``_EXACT``, else ``_WALK``) instead of a comparison on every row
    (``min``/``max`` of an ``ARRAY[epoch, id, price]`` built per trade took twice the time for a
    day of 10M trades). The probes go in key order (``exchange, symbol, window_start``: the
    windows sorted after the hash aggregate, which emits them in hash order): consecutive probes
    then read neighbouring index and heap pages, which are in ``shared_buffers`` already, instead
    of pages all over the table (a day of 1M trades: 0.25 s of probes instead of 0.45 s). The
    aggregate is ``MATERIALIZED`` so that the sort applies to its 1,440 rows a symbol-day, and
    the planner does not turn it into a sort of every trade for a group aggregate.
    """
    where = " AND ".join(
        w for w in ("t.ts >= %(scan_start)s AND t.ts < %(scan_end)s", MARKET_ONLY, scan, kept) if w
    )
    probe_kept = f" AND {MARKET_ONLY}" + (f" AND {kept}" if kept else "")
    return f"""
aggregate AS MATERIALIZED (
    SELECT t.exchange, t.symbol,
           date_bin(%(base_len)s, t.ts, timestamptz 'epoch') AS window_start,
           max(t.price) AS high,
           min(t.price) AS low,
           sum(t.quantity) AS volume,
           sum(t.price * t.quantity) AS quote_volume,
           sum(t.raw_trades) AS trade_count,
           bool_or(t.is_buyer_maker IS NOT NULL) AS sided,
           sum(t.quantity) FILTER (WHERE NOT t.is_buyer_maker) AS taker_volume,
           sum(t.price * t.quantity) FILTER (WHERE NOT t.is_buyer_maker) AS taker_quote,
           min(t.ts) AS first_ts, max(t.ts) AS last_ts,
           min(t.trade_id) AS min_id, max(t.trade_id) AS max_id
    FROM trades AS t
    WHERE {where}
    GROUP BY 1, 2, 3
),
base AS MATERIALIZED (
    SELECT a.exchange, a.symbol, a.window_start,
           coalesce({_EXACT.format(id="min_id", ts="first_ts")},
                    {_WALK.format(order="ASC", ts="first_ts", kept=probe_kept)}) AS first,
           coalesce({_EXACT.format(id="max_id", ts="last_ts")},
                    {_WALK.format(order="DESC", ts="last_ts", kept=probe_kept)}) AS last,
           a.high, a.low, a.volume, a.quote_volume, a.trade_count, a.sided, a.taker_volume,
           a.taker_quote
    FROM (SELECT * FROM aggregate ORDER BY exchange, symbol, window_start) AS a
)"""


#: A window's first (last) trade by ``(ts, trade_id)`` is, of its trades at its least (greatest)
#: ``ts``, the one with the least (greatest) id. Where ids grow with time (Binance, Kraken: the
#: venues' ids are consecutive) that is the trade with the window's least (greatest) id, and
#: ``_EXACT`` finds it with one lookup of the primary key ``(exchange, symbol, trade_id)`` by that
#: id: if that trade is at the window's least (greatest) ``ts``, it is the first (last) trade,
#: exactly (no trade of the window has a smaller (greater) ``ts``, nor, at that ``ts``, a smaller
#: (greater) id). That trade is always one the fold kept (the id is the least or greatest of the
#: kept trades), so the lookup needs no ``kept`` condition. Otherwise (the trade came out of id
#: order) ``_WALK`` walks the key through ``[min_id, max_id]`` from the low (high) end and stops
#: at the first kept trade with that ``ts``: every trade of the window has an id in that range,
#: and no trade outside the window has that ``ts``, so it is exact too. One probe per window in
#: the common case, as with a time-ordered index, but without a second B-tree for every writer to
#: maintain (docs/storage.md). The lookup by id is cheaper than the first step of the walk (a
#: day of 3M trades: 0.3 s of probes instead of 0.48 s). ``(t.ts = …) IS TRUE`` (the same,
#: ``ts`` is never NULL) keeps the planner from adding the BRIN index on ``ts`` to the key in a
#: bitmap scan that reads and sorts the whole window: five times the time per probe (a day of 1M
#: trades: 5.2-5.9 s of probes instead of 2.3 s).
_EXACT = """(
        SELECT ARRAY[extract(epoch FROM t.ts), t.trade_id, t.price] FROM trades AS t
        WHERE t.exchange = a.exchange AND t.symbol = a.symbol AND t.trade_id = a.{id}
          AND (t.ts = a.{ts}) IS TRUE)"""
_WALK = """(
        SELECT ARRAY[extract(epoch FROM t.ts), t.trade_id, t.price] FROM trades AS t
        WHERE t.exchange = a.exchange AND t.symbol = a.symbol
          AND t.trade_id BETWEEN a.min_id AND a.max_id AND (t.ts = a.{ts}) IS TRUE{kept}
        ORDER BY t.trade_id {order}
        LIMIT 1)"""


def candle_states(table: str) -> str:
    """The fold states of a candle table's rows (filter them with a WHERE on the result's
    ``interval``/``window_start``/``window_end``): a candle's first and last trade are ordered
    by its window's start, which orders candles of one symbol and interval as their trades."""
    return f"""
SELECT exchange, symbol, interval, window_start, window_end,
       ARRAY[extract(epoch FROM window_start), first_trade_id, open] AS first,
       ARRAY[extract(epoch FROM window_start), last_trade_id, close] AS last,
       high, low, volume, quote_volume, trade_count,
       taker_buy_volume IS NOT NULL AS sided,
       taker_buy_volume AS taker_volume, taker_buy_quote_volume AS taker_quote
FROM {table}"""


def rollup(length: str, source: str = "base", *, sums: tuple[str, ...] = ()) -> str:
    """The states of ``source`` merged into windows of ``length`` (SQL for an ``interval``),
    with ``sums``: more columns of ``source`` to add up."""
    merged = ", ".join(f"{how}({col}) AS {col}" for col, how in MERGE.items())
    extra = "".join(f", sum({col}) AS {col}" for col in sums)
    return f"""
SELECT exchange, symbol, date_bin({length}, window_start, timestamptz 'epoch') AS window_start,
       {merged}{extra}
FROM {source}
GROUP BY 1, 2, 3"""


def candle_columns() -> str:
    """The candle fields (``CANDLE_FIELDS`` order) of a fold state, named as in candle tables."""
    return ", ".join(f"{_FIELD[name]} AS {name}" for name in CANDLE_FIELDS)


def same(a: str, b: str) -> str:
    """SQL: the candles ``a`` and ``b`` are equal in every field (NULLs equal)."""
    return " AND ".join(f"{a}.{f} IS NOT DISTINCT FROM {b}.{f}" for f in CANDLE_FIELDS)
