"""candlekeep's pure core and what the stream and batch sides share.

Nothing in this package reads the clock, a file, the network or a database: callers pass trades
and time in, and get candles and late trades back.
"""
