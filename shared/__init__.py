"""What the stream and batch sides share, in three layers (SPEC §1).

- ``shared.core``: the pure windowing core. Trades and time in, candles, late trades and gaps
  out; it reads no clock, file, network or database, and imports nothing that does.
- ``shared.store``: PostgreSQL: connections, schema and migrations, storing trades, the stream's
  progress, candle upserts.
- ``shared.batch``: the DAG's steps as plain functions: recompute, reconcile, checks, the report.

``shared.config`` (every setting, from the environment) and ``shared.errors`` serve all three.
"""
