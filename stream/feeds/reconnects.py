"""What a feed logs about its reconnects: per symbol, the last trade id before, the first after.

A WebSocket that drops loses every trade sent while it was down. The stream finds such holes
in the ids (``trade_gaps``); the feed's log says where they may be, so a person reading it can
tell a reconnect that lost nothing (first after = last before + 1) from one that lost trades.
Where the feed has a database (``DATABASE_URL``), each is also recorded in ``feed_reconnects``
(``record``, see ``candlekeep/feed_cmd.py``), for the report of its period.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

#: Records one reconnect of a symbol: (symbol, last id before, first id after, disconnected at,
#: reconnected at: its first trade after).
Record = Callable[[str, "int | None", int, datetime, datetime], None]


@dataclass
class ReconnectLog:
    """Last trade id per symbol; after a reconnect, the first id per symbol is logged once."""

    logger: structlog.typing.FilteringBoundLogger
    record: Record | None = None
    last_ids: dict[str, int] = field(default_factory=dict)
    _before: dict[str, int | None] = field(default_factory=dict)
    _reconnects: int = 0
    _dropped_at: datetime | None = None

    def trade(self, symbol: str, trade_id: int) -> None:
        if symbol in self._before:
            before = self._before.pop(symbol)
            self.logger.warning(
                "first trade after reconnect",
                symbol=symbol,
                last_trade_id_before=before,
                first_trade_id_after=trade_id,
                missed=None if before is None else max(0, trade_id - before - 1),
                reconnects=self._reconnects,
            )
            if self.record is not None and self._dropped_at is not None:
                self.record(symbol, before, trade_id, self._dropped_at, datetime.now(UTC))
        self.last_ids[symbol] = trade_id

    def reconnecting(self, symbols) -> dict[str, int | None]:
        """Called on a disconnect: the last ids before it, per symbol (for the warning)."""
        self._reconnects += 1
        self._dropped_at = datetime.now(UTC)
        self._before = {s: self.last_ids.get(s) for s in symbols}
        return dict(self._before)
