"""Live calls by connection id, so readouts (UI timers, /metrics) and the hub can find them."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

from agent.calls.session import Session


class SessionRegistry:
    """Live calls by connection id, so readouts (UI timers, /metrics) can find them. A resumed call
    is found by its first connection's id (its call id) and by each later connection's."""

    def __init__(self, keep_closed: int = 32, keep_links: int = 1024):
        self._live: dict[str, Session] = {}
        self._recent: deque[Session] = deque(maxlen=keep_closed)
        self._links: OrderedDict[str, str] = OrderedDict()  # a later connection's id -> its call id
        self._keep_links = keep_links
        self._lock = threading.Lock()

    def add(self, session: Session) -> None:
        with self._lock:
            self._live[session.call_id] = session

    def remove(self, session: Session) -> None:
        with self._lock:
            if self._live.get(session.call_id) is session:
                del self._live[session.call_id]
                self._recent.append(session)

    def link(self, connection_id: str, session: Session) -> None:
        """`connection_id` now carries `session` (a resumed call): `get` finds the call by it too."""
        if connection_id == session.call_id:
            return
        with self._lock:
            self._links[connection_id] = session.call_id
            while len(self._links) > self._keep_links:
                self._links.popitem(last=False)

    def is_live(self, call_id: str) -> bool:
        with self._lock:
            return call_id in self._live

    def calls_from(self, client: str) -> int:
        """Live calls whose caller is at this address."""
        with self._lock:
            return sum(1 for s in self._live.values() if s.client == client)

    def get(self, call_id: str | None) -> Session | None:
        if not call_id:
            return None
        with self._lock:
            call_id = self._links.get(call_id, call_id)
            found = self._live.get(call_id)
            if found is None:
                found = next((s for s in reversed(self._recent) if s.call_id == call_id), None)
            return found

    def live(self) -> list[Session]:
        with self._lock:
            return list(self._live.values())
