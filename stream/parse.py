"""The parse stage: fetched Kafka records → one :class:`PartitionBatch` per partition, its trades
parsed, checked against their key and prepared for storing (SPEC §2), its invalid messages kept
with their reason.

It runs on the event loop while writers wait on PostgreSQL, so it does as much of a batch's
work as it can: the COPY rows of its fresh trades are encoded here, off the writers' path.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.core.trade_messages import check_key, parse_common_trade, parse_trade_message
from shared.core.trades import Rejection, Trade
from shared.store.trade_store import InvalidMessage, PreparedTrades, prepare_trades
from stream.state import PartitionState

KEY_CACHE_MAX = 10_000
#: Parse this many messages, then let the batch being written go on (its next step may wait on
#: the event loop).
PARSE_CHUNK = 1000


@dataclass
class PartitionBatch:
    """The messages of one partition in one batch, parsed."""

    partition: int
    resumed_from: int | None  # next_offset stored when this batch started (None: no row yet)
    next_offset: int  # offset after the batch's last message
    trades: list[Trade] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # the offset of each of ``trades``
    invalid: list[InvalidMessage] = field(default_factory=list)
    consumed: int = 0
    last_digest: int | None = None  # record_digest of the batch's last message
    #: An ``offset_resets`` row to complete with the time of the batch's first trade.
    reset_id: int | None = None
    #: ``prepare_trades(trades, tried)``, done by the parse stage while the batch before this
    #: one is written; None: done when the batch is written, without tried ids.
    prepared: PreparedTrades | None = None
    _offset_by_id: dict[int, int] | None = field(default=None, repr=False)

    def offset_of(self, trade: Trade) -> int | None:
        """The offset of the first message in this batch that carried ``trade``'s key (a late
        trade's source).

        The trades that reach the windows are the first copies, the very objects parsed from
        those messages: found by identity (a map built on first use, in C; the batch keeps its
        trades alive, so an id in it is that trade's), else by key.
        """
        return self.offsets_of([trade])[0]

    def offsets_of(self, trades: Sequence[Trade]) -> list[int | None]:
        """:meth:`offset_of` for each of ``trades`` (objects of this batch: by identity)."""
        if self._offset_by_id is None:
            self._offset_by_id = dict(zip(map(id, self.trades), self.offsets, strict=True))
        out: list[int | None] = []
        for trade in trades:
            offset = self._offset_by_id.get(id(trade))
            if offset is None:
                key = trade.key
                pairs = zip(self.trades, self.offsets, strict=True)
                offset = next((o for t, o in pairs if t.key == key), None)
            out.append(offset)
        return out


def record_digest(key: bytes | None, value: bytes | None) -> int:
    """A fingerprint of one Kafka message (CRC-32 of its key and value): the one stored with the
    offsets tells whether the log still holds, before the stored position, the message the
    worker consumed there, or is another log (broker storage lost, topic recreated)."""
    return zlib.crc32(value or b"", zlib.crc32(key or b""))


class Parser:
    """Parses fetched records for one worker; owns what it remembers between batches: the
    message keys already seen to name a valid symbol, and per symbol the greatest trade id
    tried (see ``prepare_trades``)."""

    def __init__(self, topic: str, max_future_us: int) -> None:
        self.topic = topic
        self.max_future_us = max_future_us
        #: Message keys already seen to be a valid symbol, with the symbol they name.
        self.key_symbols: dict[bytes, str] = {}
        #: Per (exchange, symbol), the greatest trade id this worker has tried to store.
        self.tried: dict[tuple[str, str], int] = {}

    async def parse(
        self, fetched, partitions: dict[int, PartitionState], now: float, replaced: list[int]
    ) -> list[tuple[PartitionState, PartitionBatch]]:
        """Parse fetched records into batches; partitions whose log turned out to be another
        one than the worker read (see ``PartitionState.verify``) go to ``replaced``."""
        now_us = int(now * 1_000_000)
        max_ts_us = now_us + self.max_future_us
        key_symbols = self.key_symbols
        fast = parse_common_trade
        topic = self.topic
        source = f"kafka:{topic}"
        batches = []
        for tp, records in fetched.items():
            state = partitions.get(tp.partition)
            if state is None or not records or tp.topic != topic:
                continue  # revoked meanwhile
            if state.verify is not None:
                offset, digest = state.verify
                if records[0].offset == offset:
                    if record_digest(records[0].key, records[0].value) != digest:
                        replaced.append(tp.partition)
                        continue
                    records = records[1:]  # the same message: the same log
                state.verify = None
                if not records:
                    continue
            if state.position is not None and records[0].offset < state.position:
                # Fetched before the seek to the stored offset took effect (e.g. from the offset
                # committed to Kafka, which lags PostgreSQL): already in the store.
                records = [r for r in records if r.offset >= state.position]
                if not records:
                    continue
            # resumed_from is set when the batch is written: after the one before it commits.
            batch = PartitionBatch(tp.partition, None, records[-1].offset + 1)
            batch.last_digest = record_digest(records[-1].key, records[-1].value)
            batch.reset_id = state.reset_id
            trades = batch.trades
            offsets = batch.offsets
            for start in range(0, len(records), PARSE_CHUNK):
                if start:
                    await asyncio.sleep(0)  # let the batch in flight take its next step
                for record in records[start : start + PARSE_CHUNK]:
                    key = record.key
                    value = record.value
                    parsed = fast(value, max_ts_us) if value.__class__ is bytes else None
                    if parsed is None:
                        parsed = parse_trade_message(value, max_ts_us=max_ts_us)
                    if parsed.__class__ is not Rejection:
                        if key_symbols.get(key) == parsed.symbol:  # type: ignore[union-attr]
                            trades.append(parsed)  # type: ignore[arg-type]
                            offsets.append(record.offset)
                            continue
                        bad_key = check_key(key, parsed)  # type: ignore[arg-type]
                        if bad_key is None:
                            if len(key_symbols) < KEY_CACHE_MAX:
                                key_symbols[key] = parsed.symbol  # type: ignore[index,union-attr]
                            trades.append(parsed)  # type: ignore[arg-type]
                            offsets.append(record.offset)
                            continue
                        parsed = bad_key
                    batch.invalid.append(
                        InvalidMessage(
                            source,
                            tp.partition,
                            record.offset,
                            key,
                            record.value,
                            parsed.code,  # type: ignore[union-attr]
                            parsed.reason,  # type: ignore[union-attr]
                        )
                    )
            batch.consumed = len(records)
            batch.prepared = prepare_trades(trades, self.tried)  # (COPY rows: off the writers)
            batches.append((state, batch))
        return batches
