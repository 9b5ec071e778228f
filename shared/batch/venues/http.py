"""The one HTTP client the venues share: bounded waits, retries, and errors a person can act on.

A venue's REST API fails in a few ways, and each has one answer here:

- it cannot be reached (refused, reset, timed out) or answers 5xx: retried with exponential
  backoff, :attr:`VenueHttp.retries` times, then :class:`VenueUnavailable`;
- it says slow down: 429 with ``Retry-After`` is waited out when the wait is at most
  ``max_retry_after_s``, else :class:`VenueUnavailable` at once (nothing hangs); 418 (Binance's
  ban of an IP that ignored its 429s) is unavailable at once;
- it counts request weight (Binance's ``X-MBX-USED-WEIGHT-1M``): once the minute's weight is
  nearly used up, the next request waits for the next minute (bounded the same way);
- it has a public rate limit (Kraken: about one request a second): requests are spaced by
  ``min_interval_s``;
- it refuses the request (4xx: an unknown symbol, a bad parameter): :class:`VenueRejected` with
  the venue's own message;
- it answers something that is not the JSON it documents: :class:`VenueResponseError`.

JSON is decoded with decimals for every number (``msgspec``'s ``float_hook``), so a price the
venue writes as a JSON number is as exact as one it writes as a string. The clock and the sleep
are parameters, so tests of long ``Retry-After`` values do not sleep.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import msgspec

from shared.errors import CandlekeepError

_decode = msgspec.json.Decoder(float_hook=Decimal)


class VenueError(CandlekeepError):
    """Something went wrong asking a venue; the message says what, and what to do."""


class VenueUnavailable(VenueError):
    """The venue could not be asked now (down, too slow, rate-limited past the bound, or no
    longer serving the data): the caller records ``unverified`` and goes on."""


class PeriodNotServed(VenueUnavailable):
    """The venue is up, but no longer serves that period (Kraken keeps its latest 720 candles of
    an interval): only that request's candles are unverified, the venue can still be asked."""


class VenueRejected(VenueError):
    """The venue refused the request (unknown symbol, bad parameter): a configuration mistake."""


class VenueResponseError(VenueError):
    """The venue answered, but not with what it documents (malformed JSON, missing fields)."""


@dataclass(frozen=True)
class Reply:
    """A decoded JSON answer and when the venue says it sent it (its ``Date`` header, epoch ms;
    the local clock when it sends none): "closed" candles are judged by the venue's clock."""

    body: Any
    venue_now_ms: int
    headers: Mapping[str, str]


@dataclass
class VenueHttp:
    """GET requests to one venue's base URL with the rules above."""

    name: str  # the exchange name, for messages
    base_url: str
    timeout_s: float = 10.0
    max_retry_after_s: float = 60.0
    retries: int = 3
    backoff_s: float = 0.5
    min_interval_s: float = 0.0
    headers: Mapping[str, str] | None = None
    #: Binance's request-weight budget per minute; ``None``: the venue has none.
    weight_limit_1m: int | None = None
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000
    transport: httpx.BaseTransport | None = None

    def __post_init__(self) -> None:
        self._client = httpx.Client(
            base_url=self.base_url.rstrip("/"),
            timeout=httpx.Timeout(self.timeout_s),
            headers=dict(self.headers or {}),
            transport=self.transport,
            follow_redirects=False,
        )
        self._last_request_at: float | None = None
        self._wait_for_weight_ms: int | None = None

    def close(self) -> None:
        self._client.close()

    def get_json(self, path: str, params: Mapping[str, Any]) -> Reply:
        """The decoded JSON of ``GET base_url + path?params``, by the rules of the module."""
        failures = 0
        while True:
            self._pace()
            try:
                response = self._client.get(path, params=dict(params))
            except httpx.TimeoutException:
                error = f"no answer within {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                error = f"cannot connect: {exc or type(exc).__name__}"
            else:
                status = response.status_code
                if status == 200:
                    self._note_weight(response)
                    return Reply(
                        self._decode(response, path), self._venue_now(response), response.headers
                    )
                if status in (418, 429):
                    wait_s = self._retry_after(response)
                    what = (
                        "banned this address for a while (418)"
                        if status == 418
                        else "asks to slow down (429)"
                    )
                    if status == 418 or wait_s is None or wait_s > self.max_retry_after_s:
                        after = f"; Retry-After {wait_s:g} s" if wait_s is not None else ""
                        raise VenueUnavailable(
                            f"{self.name} {what}{after}, beyond the {self.max_retry_after_s:g} s "
                            "this run waits (CANDLEKEEP_VENUE_MAX_RETRY_AFTER): try again later"
                        )
                    self.sleep(wait_s)
                    failures += 1
                    if failures > self.retries:
                        raise VenueUnavailable(
                            f"{self.name} kept answering 429 ({failures} waits): try again later"
                        )
                    continue
                if status >= 500:
                    error = f"HTTP {status} from the venue"
                else:
                    raise VenueRejected(
                        f"{self.name} refused {path}: HTTP {status}: {_venue_message(response)}"
                    )
            failures += 1
            if failures > self.retries:
                raise VenueUnavailable(
                    f"{self.name} at {self.base_url} is unavailable ({error}; "
                    f"{failures} attempts): check the URL setting or try again later"
                )
            self.sleep(self.backoff_s * 2 ** (failures - 1))

    # -- the rules ---------------------------------------------------------------------------

    def _pace(self) -> None:
        """Space requests by ``min_interval_s``, and wait out a used-up weight budget."""
        if self._wait_for_weight_ms is not None:
            wait_s = self._wait_for_weight_ms / 1000
            self._wait_for_weight_ms = None
            if wait_s > self.max_retry_after_s:
                raise VenueUnavailable(
                    f"{self.name}'s request weight for this minute is used up, and the "
                    f"{wait_s:g} s to the next minute is beyond CANDLEKEEP_VENUE_MAX_RETRY_AFTER"
                )
            self.sleep(wait_s)
        if self.min_interval_s and self._last_request_at is not None:
            wait_s = self._last_request_at + self.min_interval_s - self.monotonic()
            if wait_s > 0:
                self.sleep(wait_s)
        self._last_request_at = self.monotonic()

    def _note_weight(self, response: httpx.Response) -> None:
        """Past 90 % of the minute's weight, the next request waits for the next minute."""
        if self.weight_limit_1m is None:
            return
        used = response.headers.get("x-mbx-used-weight-1m")
        if used is None or not used.strip().isdigit():
            return
        if int(used) >= self.weight_limit_1m * 9 // 10:
            now_ms = self._venue_now(response)
            self._wait_for_weight_ms = 60_000 - now_ms % 60_000

    def _retry_after(self, response: httpx.Response) -> float | None:
        value = response.headers.get("retry-after")
        if value is None:
            return None
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - self.wall_ms() / 1000)

    def _venue_now(self, response: httpx.Response) -> int:
        date = response.headers.get("date")
        if date:
            try:
                return int(email.utils.parsedate_to_datetime(date).timestamp() * 1000)
            except (TypeError, ValueError):
                pass
        return self.wall_ms()

    def _decode(self, response: httpx.Response, path: str) -> Any:
        try:
            return _decode.decode(response.content)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise VenueResponseError(
                f"{self.name} answered {path} with something that is not JSON ({exc}): "
                f"{response.text[:80]!r}"
            ) from None


def _venue_message(response: httpx.Response) -> str:
    """Binance's ``{"code": -1121, "msg": "Invalid symbol."}``, or the start of the body."""
    try:
        body = _decode.decode(response.content)
    except (msgspec.DecodeError, RecursionError):
        return response.text[:120] or "(empty body)"
    if isinstance(body, dict) and "msg" in body:
        return f"{body.get('msg')} (code {body.get('code')})"
    return response.text[:120]
