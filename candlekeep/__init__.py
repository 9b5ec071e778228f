"""candlekeep: the command line, a thin shell around the core in ``shared``."""

__version__ = "0.1.0"
