"""The pure windowing core: trades (parse, validate, identity), candles (fold, merge), intervals,
the watermark clock and window state, file formats. No I/O: callers pass trades and time in."""
