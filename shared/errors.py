"""The base of errors whose message is written for a person: what was wrong, what to do."""


class CandlekeepError(Exception):
    """Shown to the user as one line, without a traceback."""
