"""PostgreSQL: connections, schema and migrations, storing trades (first copy wins), the stream's
progress and candle upserts. The only layer of ``shared`` that talks to the database."""
