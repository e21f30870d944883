"""One client connection and its call, whatever the transport: opening (or resuming) the call, the
settings the caller changes mid-call, server-side ends, and leaving (a hang-up ends the call, a
dropped connection holds it for the caller to resume). Messages to the client go out through `send`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.calls.hub import CallHub
from agent.calls.session import Session
from agent.errors import CallRefused, ConditionError, ResumeFailed, SamplingError
from agent.voices import CallSettings

log = logging.getLogger(__name__)

# WebSocket close codes that mean the caller left; any other end (1006: no close frame) is a dropped
# connection, whose call waits for the caller to resume it (CallHub.drop)
WEBSOCKET_HANG_UP_CODES = frozenset({1000, 1001})


class CallConnection:
    def __init__(self, hub: CallHub, send: Callable[[dict[str, Any]], None]):
        self.hub = hub
        self.session: Session | None = None
        self.ended: str | None = None  # why this connection has no call (refused, ended by the server)
        self.left = False  # the client hung up or its connection dropped
        self._send = send
        self._connection = 0  # the session's connection number this one carries (Session.connection)
        self._warned: set[str] = set()

    # -- messages to the client ------------------------------------------------------------------

    def notify(self, kind: str, message: str) -> None:
        """Send {"type": kind, "message": ...} to the client."""
        self._send({"type": kind, "message": message})

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
            self.notify("warning", message)

    # -- the call --------------------------------------------------------------------------------

    def current(self) -> Session | None:
        """This connection's call; None once the call moved to a newer connection (resumed there)."""
        session = self.session
        if session is not None and session.connection != self._connection:
            self.session, self.ended = None, "This call continued on another connection."
            return None
        return session

    async def replace_freed(self) -> None:
        """The engine freed the call's seat (no audio for a while, or a prompted call reached the
        context): end that call properly and tell the caller; the next `open` starts over."""
        ended, self.session = self.session, None
        if ended is None:
            return
        reason = ended.seat.closed_reason
        await self.hub.close_async(ended, "its seat was freed by the engine")
        self.notify("warning", f"The call starts over: {reason}")

    async def open(self, settings: CallSettings, call_id: str, client: str | None,
                   token: str | None) -> Session | None:
        """A new call, or the dropped call `token` names; None if refused (the client is told why).
        The client is told which, with the token to resume this call if its connection drops."""
        try:
            session, resumed = await self._open(settings, call_id, client, token)
        except CallRefused as exc:
            self.refuse(str(exc))
            return None
        self._send({"type": "call", "call_id": session.call_id, "resume_token": session.resume_token,
                    "resumed": resumed, "message": "call resumed" if resumed else "call started"})
        if self.left:  # the client left while its call was opening
            await self.hub.close_async(session, "client left")
            return None
        self.session, self._connection = session, session.connection
        return session

    async def _open(self, settings: CallSettings, call_id: str, client: str | None,
                    token: str | None) -> tuple[Session, bool]:
        if token:
            try:
                return await self.hub.open_async(call_id, settings, resume_token=token), True
            except ResumeFailed as exc:
                self.notify("warning", f"{exc} Starting a new call.")
        return await self.hub.open_async(call_id, settings, client), False

    def refuse(self, message: str) -> None:
        """No call for this connection: tell the client why."""
        self.ended = message
        log.warning("call refused: %s", message)
        self.notify("error", message)

    def apply(self, session: Session, wanted: CallSettings) -> None:
        """The caller's settings changed mid-call: apply what can change now, warn once about the rest."""
        if wanted != session.settings:
            wanted = self._keep_prompt(session, wanted)
        if wanted == session.settings:
            return
        if self.hub.route(wanted) is not session.engine:
            self.warn_once(f"model:{wanted.voice}", f"The voice {wanted.voice!r} runs on another model: "
                           "hang up and call again to switch to it.")
            return
        try:
            session.change_settings(wanted)
        except (ConditionError, SamplingError) as exc:
            self.warn_once(f"settings:{wanted}", str(exc))
            return
        log.info("call %s: settings -> %s", session.call_id, wanted)

    def _keep_prompt(self, session: Session, wanted: CallSettings) -> CallSettings:
        """On a model that takes prompts the voice, persona and emotion (carried by the persona) are
        the call's start: a change applies from the next call (the caller is told once); the rest
        applies now."""
        if session.engine.prompt_presets() is None:
            return wanted
        now = session.settings
        kept = replace(wanted, voice=now.voice, emotion=now.emotion, voice_prompt=now.voice_prompt,
                       text_prompt=now.text_prompt)
        if kept != wanted:
            self.warn_once(f"prompt:{wanted.voice}:{wanted.voice_prompt}:{wanted.text_prompt}",
                           "A new voice or persona applies from your next call (it is how the call starts).")
        return kept

    def end(self, message: str) -> None:
        """The server ends the call: tell the client why (the transport then leaves, freeing the seat)."""
        self.ended = message
        self.notify("warning", message)

    def leave(self, dropped: bool) -> None:
        """The client hung up (the call ends) or its connection dropped (the call is held for it to
        resume, CallHub.drop: call from the event loop)."""
        self.left = True
        session, self.session = self.current(), None
        if session is None:
            return
        if dropped and not session.closed:
            self.hub.drop(session)
        else:
            self.hub.close_soon(session, "client left")
