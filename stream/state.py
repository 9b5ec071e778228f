"""What the stream worker holds: per assigned partition, and for the whole run."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.core.continuity import IdContinuity
from shared.core.windows import PartitionWindows


@dataclass(eq=False)
class PartitionState:
    """What the worker holds for one assigned partition (replaced whole when it is reloaded,
    so a batch parsed for the old one is recognised and dropped)."""

    windows: PartitionWindows
    committed_state: dict | None
    stored_offset: int | None  # next offset in stream_progress (None: no row yet)
    last_tick: float = 0.0
    #: Next offset after the last batch handed to the writer (committed or in flight).
    position: int | None = None
    #: Batches of this partition handed to a writer and not finished yet.
    inflight: int = 0
    #: record_digest of the message before stored_offset, as committed.
    last_digest: int | None = None
    #: The partition's trade-id continuity (SPEC §4), and its state as committed.
    continuity: IdContinuity | None = None
    committed_continuity: dict | None = None
    #: (offset, digest) of the stored message the first fetch must show again: the log is the
    #: one the worker read (None: nothing to check).
    verify: tuple[int, int] | None = None
    #: An offset_resets row waiting for the first trade read after it.
    reset_id: int | None = None
    #: Since when (monotonic) fetches say the log ends below the position, and how many did.
    short_since: float | None = None
    short_checks: int = 0
    last_poll: int | None = None

    def __post_init__(self) -> None:
        if self.position is None:
            self.position = self.stored_offset


@dataclass
class RunSummary:
    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    conflicting: int = 0  # of the duplicates, those that differ from the stored first copy
    invalid: int = 0
    late: int = 0
    candles: int = 0
    retries: int = 0
    resets: int = 0
    skipped: int = 0  # messages passed over by offset resets (consumed + skipped = read range)
    gaps: int = 0  # trade-id gaps recorded in trade_gaps
    missing: int = 0  # the trades missing in them
    gaps_filled: int = 0  # open gaps whose every trade got stored later
    partitions: set[int] = field(default_factory=set)
