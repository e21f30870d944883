"""Slow requests at the door (slowloris): connections whose request headers have not arrived whole.

uvicorn waits for a request's headers without a deadline (its keep-alive timeout starts only after a
response), so a client that opens many connections and dribbles its headers a byte at a time holds a
socket (a file descriptor, a parser buffer) each, for as long as it likes, before any middleware or
per-client limit (calls.cap) sees a request. This is the policy its HTTP protocol asks
(transports.fastrtc_compat.unfinished_requests_protocol): each address may have at most `limit`
connections waiting for a request's headers at once (new ones beyond it are answered 429 and closed at
once), and every wait ends after `header_seconds` (408, closed). An idle keep-alive connection waits for
its next request too, so it counts. Trusted proxies are not counted (a reverse proxy sends a request's
headers whole, and keeps its own idle connections); the deadline still applies to them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class UnfinishedRequests:
    limit: int | None = 32  # connections waiting for headers, per address; None or 0: no limit
    header_seconds: float = 10.0  # how long a connection may take to send a request's headers
    exempt: Callable[[str], bool] = lambda address: False  # e.g. trusted proxies
    refused: int = 0
    timed_out: int = 0
    # waiting connections by address; touched only from the event loop
    _waiting: Counter[str] = field(default_factory=Counter, repr=False)

    def start(self, address: str) -> bool:
        """A connection from `address` starts waiting for a request: False when it is one too many
        (the connection is refused); True when it is admitted and counted until `finish`."""
        if self.limit and not self.exempt(address) and self._waiting[address] >= self.limit:
            self.refused += 1
            if self.refused % 100 == 1:
                log.warning("refused a connection from %s: %d already waiting for their request's headers "
                            "(%d refused so far)", address, self._waiting[address], self.refused)
            return False
        self._waiting[address] += 1
        return True

    def finish(self, address: str) -> None:
        """The request's headers arrived, or the connection closed or timed out."""
        self._waiting[address] -= 1
        if self._waiting[address] <= 0:
            del self._waiting[address]

    def expire(self, address: str) -> None:
        """A connection's wait passed `header_seconds`."""
        self.timed_out += 1
        if self.timed_out % 100 == 1:
            log.warning("closed a connection from %s: no request headers within %.0f s (%d so far)", address,
                        self.header_seconds, self.timed_out)
        self.finish(address)

    def waiting(self, address: str) -> int:
        return self._waiting[address]

    @property
    def refusal(self) -> bytes:
        return self._answer(429, "Too Many Requests", f"At most {self.limit} unfinished requests from one address.")

    @property
    def timeout(self) -> bytes:
        return self._answer(408, "Request Timeout", f"The request's headers took over {self.header_seconds:g} s.")

    @staticmethod
    def _answer(status: int, reason: str, text: str) -> bytes:
        """A whole HTTP/1.1 response that closes the connection (no request was parsed to answer with h11)."""
        body = text.encode()
        return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\n\r\n").encode() + body
