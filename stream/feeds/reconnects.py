"""What a feed logs about its reconnects: per symbol, the last trade id before, the first after.

A WebSocket that drops loses every trade sent while it was down. The stream finds such holes
in the ids (``trade_gaps``); the feed's log says where they may be, so a person reading it can
tell a reconnect that lost nothing (first after = last before + 1) from one that lost trades.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog


@dataclass
class ReconnectLog:
    """Last trade id per symbol; after a reconnect, the first id per symbol is logged once."""

    logger: structlog.typing.FilteringBoundLogger
    last_ids: dict[str, int] = field(default_factory=dict)
    _before: dict[str, int | None] = field(default_factory=dict)
    _reconnects: int = 0

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
        self.last_ids[symbol] = trade_id

    def reconnecting(self, symbols) -> dict[str, int | None]:
        """Called on a disconnect: the last ids before it, per symbol (for the warning)."""
        self._reconnects += 1
        self._before = {s: self.last_ids.get(s) for s in symbols}
        return dict(self._before)
