"""A local venue that replays RECORDED responses: real HTTP and WebSocket, for tests and the demo.

One aiohttp server on 127.0.0.1 plays each venue under its own path prefix (``/binance``,
``/binance-usdm``, ``/kraken``), so one port serves them all; :meth:`VenueReplay.rest_url` and
:meth:`VenueReplay.ws_url` give the base URLs to set (``CANDLEKEEP_BINANCE_REST_URL`` …,
``feed … --url``).

What it serves is what a venue recorded, in the venue's own format (``tests/data/venues/*``,
each with its PROVENANCE.md). It *selects and pages* among the recorded rows the way the venue
does, and nothing more:

- Binance ``/api/v3/klines`` and ``/fapi/v1/klines``: the recorded rows whose open time is in
  ``[startTime, endTime]``, at most ``limit``; ``historicalTrades``: the rows from ``fromId``,
  at most ``limit``; the recording's ``Date`` header (the venue's clock when it answered);
- Kraken ``/0/public/OHLC``: the rows after ``since`` and the recorded ``last``;
  ``/0/public/Trades``: up to ``count`` (1000) rows after ``since`` (ns), ``last`` the newest
  row's time in ns;
- WebSocket: Binance's combined stream (``/stream?streams=x@trade/…``, the frames of those
  symbols) and Kraken's v2 protocol (subscribe to ``trade``, an ack per symbol, then the
  frames). Trade frames are built from recorded trade rows field by field (price and quantity
  text as recorded), since no public recording holds a venue's frames and its REST trades of
  the same minutes; recorded frames can be given as they are.

Fault dials (:class:`Faults`, changeable while it runs): drop the WebSocket once after N frames
and lose K frames before the client reconnects; answer 429 or 418 with ``Retry-After`` once;
answer malformed JSON once; be down (refuse connections).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

#: The recorded responses in the repository (each venue's directory has its PROVENANCE.md).
RECORDED = Path(__file__).resolve().parent.parent / "tests" / "data" / "venues"


@dataclass
class Recording:
    """One venue's recorded rows. ``klines``: (symbol, interval) → Binance kline rows, or (pair,
    minutes) → Kraken OHLC rows; ``trades``: symbol/pair → trade rows; ``ohlc_last``: Kraken's
    recorded ``last`` per (pair, minutes); ``date``: the recorded ``Date`` header; ``frames``:
    WebSocket frames (JSON text) in send order; ``ws_names``: Kraken pair → v2 symbol."""

    klines: dict[tuple[str, Any], list] = field(default_factory=dict)
    trades: dict[str, list] = field(default_factory=dict)
    ohlc_last: dict[tuple[str, int], int] = field(default_factory=dict)
    date: str | None = None
    frames: list[str] = field(default_factory=list)
    ws_names: dict[str, str] = field(default_factory=dict)


@dataclass
class Faults:
    """What goes wrong next. ``rate_limit``: (status, Retry-After seconds) answered once;
    ``malformed``: the next answer is cut JSON; ``drop_after``: the first WebSocket connection
    drops after that many frames, and ``skip`` frames are lost before the client reconnects."""

    rate_limit: tuple[int, int] | None = None
    malformed: bool = False
    drop_after: int | None = None
    skip: int = 0


class VenueReplay:
    """The server, in a thread of its own: ``with VenueReplay(recordings) as venue: …``."""

    def __init__(self, recordings: dict[str, Recording], faults: Faults | None = None):
        self.recordings = recordings
        self.faults = faults or Faults()
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.ws_paths: list[str] = []
        self.frames_sent = 0
        self.port = 0
        self._sent_to: dict[str, int] = {}  # venue → next frame index
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    # -- the Python API -----------------------------------------------------------------------

    def __enter__(self) -> VenueReplay:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the venue replay server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._call(self._stop.set)
        self._thread.join(15)

    def rest_url(self, venue: str) -> str:
        return f"http://127.0.0.1:{self.port}/{venue}"

    def ws_url(self, venue: str) -> str:
        return f"ws://127.0.0.1:{self.port}/{venue}" + ("/v2" if venue == "kraken" else "")

    def set_down(self, down: bool) -> None:
        """Refuse connections (stop listening) or listen again on the same port."""
        future = asyncio.run_coroutine_threadsafe(
            self._site.stop() if down else self._listen(), self._loop
        )
        future.result(15)

    def _call(self, fn) -> None:
        self._loop.call_soon_threadsafe(fn)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/{venue}/stream", self._binance_ws)
        app.router.add_get("/kraken/v2", self._kraken_ws)
        app.router.add_get("/{venue}/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen()
        self._ready.set()
        await self._stop.wait()
        await self._runner.cleanup()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]

    # -- REST ---------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        venue, path = request.match_info["venue"], "/" + request.match_info["path"]
        params = dict(request.query)
        self.requests.append((f"{venue}{path}", params, dict(request.headers)))
        recording = self.recordings.get(venue)
        if recording is None:
            return web.json_response({"msg": f"no recording of {venue}"}, status=404)
        if self.faults.rate_limit is not None:
            status, after = self.faults.rate_limit
            self.faults.rate_limit = None
            return web.json_response(
                {"code": -1003, "msg": "Too many requests."},
                status=status,
                headers={"Retry-After": str(after)},
            )
        try:
            if venue == "kraken":
                body = _kraken_rest(recording, path, params)
            else:
                body = _binance_rest(recording, path, params)
        except _Refused as refused:
            return web.json_response(refused.body, status=refused.status)
        text = _encode(body).decode()
        if self.faults.malformed:
            self.faults.malformed = False
            text = text[: len(text) // 2]
        headers = {"Content-Type": "application/json"}
        if recording.date:
            headers["Date"] = recording.date
        if venue != "kraken":
            headers["X-MBX-USED-WEIGHT-1M"] = str(len(self.requests))
        return web.Response(text=text, headers=headers)

    # -- WebSocket ----------------------------------------------------------------------------

    async def _binance_ws(self, request: web.Request) -> web.WebSocketResponse:
        venue = request.match_info["venue"]
        self.ws_paths.append(request.path_qs)
        streams = request.query.get("streams", "")
        wanted = {s.split("@")[0].upper() for s in streams.split("/") if s}
        frames = [
            f
            for f in self.recordings[venue].frames
            if json.loads(f).get("data", {}).get("s", "").upper() in wanted
        ]
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await self._play(ws, request, venue, frames)
        return ws

    async def _kraken_ws(self, request: web.Request) -> web.WebSocketResponse:
        self.ws_paths.append(request.path_qs)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        message = await ws.receive(timeout=10)
        if message.type != WSMsgType.TEXT:
            return ws
        ask = json.loads(message.data)
        params = ask.get("params", {})
        symbols = params.get("symbol", [])
        now = _rfc3339_now()
        for symbol in symbols:
            await ws.send_str(
                json.dumps(
                    {
                        "method": "subscribe",
                        "result": {"channel": "trade", "symbol": symbol, "snapshot": False},
                        "success": True,
                        "time_in": now,
                        "time_out": now,
                        "req_id": ask.get("req_id"),
                    }
                )
            )
        frames = [
            f
            for f in self.recordings["kraken"].frames
            if json.loads(f)["data"][0]["symbol"] in symbols
        ]
        await self._play(ws, request, "kraken", frames)
        return ws

    async def _play(
        self, ws: web.WebSocketResponse, request: web.Request, venue: str, frames: list[str]
    ) -> None:
        """Send ``frames`` from where this venue's stream left off; the first connection may be
        dropped after ``drop_after`` frames, and ``skip`` frames are then lost."""
        self._connections += 1
        first = self._connections == 1
        start = self._sent_to.get(venue, 0)
        stop = None
        if first and self.faults.drop_after is not None:
            stop = start + self.faults.drop_after
        for frame in frames[start:stop]:
            await ws.send_str(frame)
            self.frames_sent += 1
        if stop is not None:
            self._sent_to[venue] = stop + self.faults.skip
            await asyncio.sleep(0.3)  # let the frames reach the client, then drop
            if request.transport is not None:
                request.transport.abort()  # no close handshake: the connection is lost
            return
        self._sent_to[venue] = len(frames)
        async for _ in ws:  # hold the connection open until the client leaves
            pass


#: Decimals (Kraken's times, read exactly) go out as the JSON numbers they were recorded as.
_encode = msgspec.json.Encoder(decimal_format="number").encode


class _Refused(Exception):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body


def _int_param(params: dict, name: str, default: int | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise _Refused(
            400, {"code": -1100, "msg": f"Illegal characters found in '{name}'."}
        ) from None


def _binance_rest(recording: Recording, path: str, params: dict) -> Any:
    symbol = params.get("symbol", "")
    if path.endswith("/klines"):
        rows = recording.klines.get((symbol, params.get("interval")))
        if rows is None:
            raise _Refused(400, {"code": -1121, "msg": "Invalid symbol."})
        start = _int_param(params, "startTime", 0)
        end = _int_param(params, "endTime", 2**62)
        limit = _int_param(params, "limit", 500)
        return [r for r in rows if start <= r[0] <= end][:limit]
    if path.endswith("/historicalTrades"):
        rows = recording.trades.get(symbol)
        if rows is None:
            raise _Refused(400, {"code": -1121, "msg": "Invalid symbol."})
        from_id = _int_param(params, "fromId", rows[-1]["id"] - 499)
        limit = _int_param(params, "limit", 500)
        return [r for r in rows if r["id"] >= from_id][:limit]
    raise _Refused(404, {"code": -1, "msg": f"no recording of {path}"})


def _kraken_rest(recording: Recording, path: str, params: dict) -> Any:
    pair = params.get("pair", "")
    if path == "/0/public/OHLC":
        minutes = _int_param(params, "interval", 1)
        rows = recording.klines.get((pair, minutes))
        if rows is None:
            return {"error": ["EQuery:Unknown asset pair"]}
        since = _int_param(params, "since", 0)
        chosen = [r for r in rows if r[0] > since]
        return {"error": [], "result": {pair: chosen, "last": recording.ohlc_last[(pair, minutes)]}}
    if path == "/0/public/Trades":
        rows = recording.trades.get(pair)
        if rows is None:
            return {"error": ["EQuery:Unknown asset pair"]}
        since = _int_param(params, "since", 0)
        since_ns = since if since > 10**12 else since * 10**9
        count = min(1000, _int_param(params, "count", 1000))
        chosen = [r for r in rows if _ns(r[2]) > since_ns][:count]
        last = _ns(chosen[-1][2]) if chosen else since_ns
        return {"error": [], "result": {pair: chosen, "last": str(last)}}
    return {"error": [f"EGeneral:Unknown method {path}"]}


def _ns(seconds: Any) -> int:
    return int((Decimal(str(seconds)) * 10**9).to_integral_value(rounding=ROUND_FLOOR))


def _rfc3339_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- frames built from recorded trade rows --------------------------------------------------------


def binance_trade_frame(row: dict, symbol: str, kind: str | None = None) -> str:
    """A ``historicalTrades`` row as Binance's ``<symbol>@trade`` frame (event time = trade
    time: the row has no other); ``kind`` adds USD-M's ``X``."""
    data: dict[str, Any] = {"e": "trade", "E": row["time"], "T": row["time"], "s": symbol}
    data.update(t=row["id"], p=row["price"], q=row["qty"])
    if kind is not None:
        data["X"] = kind
    data["m"] = row["isBuyerMaker"]
    return json.dumps({"stream": f"{symbol.lower()}@trade", "data": data}, separators=(",", ":"))


def kraken_trade_frame(row: list, ws_symbol: str) -> str:
    """A Kraken REST Trades row as its WebSocket v2 ``trade`` update (numbers as recorded)."""
    seconds = Decimal(str(row[2]))
    micros = int((seconds * 10**6).to_integral_value(rounding=ROUND_FLOOR))
    stamp = datetime.fromtimestamp(micros // 10**6, UTC).replace(microsecond=micros % 10**6)
    trade = {
        "symbol": ws_symbol,
        "side": "buy" if row[3] == "b" else "sell",
        "price": "@P@",
        "qty": "@Q@",
        "ord_type": "market" if row[4] == "m" else "limit",
        "trade_id": row[6],
        "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    text = json.dumps({"channel": "trade", "type": "update", "data": [trade]})
    return text.replace('"@P@"', str(row[0])).replace('"@Q@"', str(row[1]))


# -- the recordings on disk ----------------------------------------------------------------------


def load_recordings(directory: Path = RECORDED) -> dict[str, Recording]:
    """The recordings of ``tests/data/venues``: ``binance/`` (``klines_<SYMBOL>_<interval>.json``
    and ``trades_<SYMBOL>.json``, the bodies of ``/api/v3/klines`` and ``/api/v3/trades``;
    ``date.txt`` the ``Date`` of the klines answer), ``kraken/`` (``ohlc_<PAIR>_<minutes>m.json``
    and ``trades_<PAIR>.json``, whole answers). Trade frames are built from the trade rows.
    ``binance-usdm`` gets a recording only from a ``binance-usdm/`` directory of the same form."""
    recordings: dict[str, Recording] = {}
    for venue in ("binance", "binance-usdm"):
        folder = directory / venue
        if not (folder / "date.txt").exists():
            continue
        recording = Recording(date=(folder / "date.txt").read_text().strip())
        for path in sorted(folder.glob("klines_*.json")):
            _, symbol, interval = path.stem.split("_")
            recording.klines[(symbol, interval)] = json.loads(path.read_text())
        for path in sorted(folder.glob("trades_*.json")):
            symbol = path.stem.split("_")[1]
            rows = json.loads(path.read_text())
            recording.trades[symbol] = rows
            recording.frames += [binance_trade_frame(r, symbol) for r in rows]
        recordings[venue] = recording
    folder = directory / "kraken"
    if folder.exists():
        recording = Recording(ws_names=json.loads((folder / "ws_names.json").read_text()))
        for path in sorted(folder.glob("ohlc_*.json")):
            _, pair, minutes = path.stem.split("_")
            result = json.loads(path.read_text(), parse_float=Decimal)["result"]
            recording.klines[(pair, int(minutes.rstrip("m")))] = result[pair]
            recording.ohlc_last[(pair, int(minutes.rstrip("m")))] = result["last"]
        for path in sorted(folder.glob("trades_*.json")):
            pair = path.stem.split("_")[1]
            rows = json.loads(path.read_text(), parse_float=Decimal)["result"][pair]
            recording.trades[pair] = rows
            ws_name = recording.ws_names[pair]
            recording.frames += [kraken_trade_frame(r, ws_name) for r in rows]
        recordings["kraken"] = recording
    return recordings
