"""The hub every transport opens and ends calls through: admission (draining, call ids, the
per-client cap), routing by voice, resuming dropped calls, and the few threads call set-up runs on.

Built explicitly (agent.service does): the policy, the cap and the call-setup pool are passed in;
`stop()` stops the pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.calls.cap import CallCap
from agent.calls.registry import SessionRegistry
from agent.calls.session import Session
from agent.calls.vad import VadHub
from agent.engine import FrameEngine
from agent.engine.prompts import PromptSpec
from agent.errors import (
    CallRefused,
    CatalogueError,
    ConditionError,
    EngineStoppedError,
    PromptError,
    ResumeFailed,
    SamplingError,
    SeatsFullError,
)
from agent.voices import CallSettings, Catalogue

log = logging.getLogger(__name__)

# Opening and ending calls (a seat, conditioning rows, the VAD's last judgement) runs on these few
# threads, never on the event loop and never on a thread per call.
CALL_SETUP_WORKERS = 4
MAX_PENDING_OFFERS = 1024  # WebRTC offers whose call has not opened yet (their client, for the cap)
OFFER_PENDING_S = 30.0  # an offer whose call has not opened by then no longer counts against its client


@dataclass(frozen=True)
class CallPolicy:
    """How every call runs, whatever its transport."""

    silence_ms: int = 300  # the caller's pause that ends a turn (turn latency)
    max_call_seconds: float | None = None
    resume_seconds: float = 0.0  # how long a dropped call's seat waits for its caller (0: closed at once)


class CallSetupPool:
    """The call-setup threads: coroutines await work there, sync callers on the loop submit it."""

    def __init__(self, workers: int = CALL_SETUP_WORKERS):
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="call-setup")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any, failure: str) -> None:
        """Run `fn` there and return at once; if it raises, `failure` is logged with the exception."""
        def done(future: Future) -> None:
            if future.exception() is not None:
                log.error("%s", failure, exc_info=future.exception())
        self._executor.submit(fn, *args).add_done_callback(done)

    def stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)


class CallHub:
    """What every transport (fastrtc handler, Kyutai's /api/chat) shares to open and end calls.
    With several models loaded (e.g. Kyutai's Moshiko and Moshika), each call goes to the engine
    whose model has the voice it asks for."""

    def __init__(self, engines: list[FrameEngine], registry: SessionRegistry, catalogue: Catalogue,
                 policy: CallPolicy, cap: CallCap, setup: CallSetupPool, vad: VadHub | None = None,
                 on_turn_latency: Callable[[float], None] | None = None):
        """`vad` judges every call's audio in one batch (None: each call on its own)."""
        self.engines = engines
        self.registry = registry
        self.catalogue = catalogue
        self.policy = policy
        self.cap = cap
        self.vad = vad
        self.on_turn_latency = on_turn_latency
        self.draining = False
        self._setup = setup
        self._admit = threading.Lock()  # check-then-add of the cap and the call id is one step
        # WebRTC call id -> (the address that offered it, when), oldest first
        self._offers: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._by_token: dict[str, Session] = {}  # resume token -> live call

    @property
    def resume_seconds(self) -> float:
        return self.policy.resume_seconds

    def route(self, settings: CallSettings) -> FrameEngine:
        """The engine whose model has this voice; the first engine if none has it."""
        for engine in self.engines:
            support = self.catalogue.voice_support(engine.model.name, engine.condition_values,
                                                   engine.prompt_presets())
            if support[settings.voice].supported:
                return engine
        return self.engines[0]

    def note_offer(self, call_id: str, client: str | None) -> str | None:
        """A WebRTC offer for `call_id` came from `client`: its call counts against that address
        (WebRTC calls open later, on the media path, where the address is not known). The refusal
        to answer it with when that address has too many offers whose calls have not opened (a flood
        of offers that never speak; calls.cap); None when it is noted."""
        if not client:
            return None
        now = time.monotonic()
        with self._admit:
            while self._offers and next(iter(self._offers.values()))[1] < now - OFFER_PENDING_S:
                self._offers.popitem(last=False)
            pending = sum(1 for offered_by, _ in self._offers.values() if offered_by == client)
            if not self.cap.admits_connection(client, pending):
                return self.cap.flood_refusal
            self._offers[call_id] = (client, now)
            self._offers.move_to_end(call_id)
            while len(self._offers) > MAX_PENDING_OFFERS:
                self._offers.popitem(last=False)
        return None

    def open(self, call_id: str, settings: CallSettings, client: str | None = None,
             resume_token: str | None = None) -> Session:
        """A new call on a free seat, or CallRefused with a message for the caller. `client` is the
        caller's address (for a WebRTC call, the one that sent its offer, see note_offer). With the
        resume token of a call whose connection dropped, that same call (its seat, its conversation)
        if it is still held; ResumeFailed if not (the caller may then start a new call)."""
        if resume_token:
            return self._resume(resume_token, call_id)
        engine = self.route(settings)
        prompt = self.prompt(engine, settings)
        with self._admit:
            session = self._admit_call(engine, call_id, settings, client or self._offers.pop(call_id, (None, 0))[0])
        if prompt is not None:  # outside the admission lock: a new voice prompt is encoded here
            try:
                session.start_from_prompt(prompt)
            except PromptError as exc:
                self.close(session, "prompt refused")
                raise CallRefused(f"That voice or persona prompt cannot be used: {exc}") from exc
        return session

    def _admit_call(self, engine: FrameEngine, call_id: str, settings: CallSettings, client: str | None) -> Session:
        """Admission and the seat, under the admission lock."""
        if self.draining:
            raise CallRefused("The server is restarting; please reconnect in a moment.")
        if self.registry.is_live(call_id):  # never end or take over a live call by its id
            raise CallRefused("A call with this id is already live on this server.")
        if not self.cap.admits(client, self.registry.calls_from(client) if client else 0):
            raise CallRefused(self.cap.refusal)
        policy = self.policy
        try:
            session = Session(engine, call_id, settings, policy.silence_ms, policy.max_call_seconds,
                              self.on_turn_latency, self.vad, client=client)
        except (SeatsFullError, EngineStoppedError) as exc:
            raise CallRefused(str(exc)) from exc
        except ConditionError as exc:
            raise CallRefused(f"That voice or emotion is not available on this model: {exc}") from exc
        except SamplingError as exc:
            raise CallRefused(f"Those sampling settings are not allowed: {exc}") from exc
        self.registry.add(session)
        self._by_token[session.resume_token] = session
        return session

    def prompt(self, engine: FrameEngine, settings: CallSettings) -> PromptSpec | None:
        """The voice/text prompt a call runs on, if its model takes prompts (CallRefused if the
        caller named a voice that is not offered; a model without prompts ignores them)."""
        presets = engine.prompt_presets()
        if presets is None:
            return None
        try:
            return PromptSpec(self.catalogue.prompt_voice(settings, presets), self.catalogue.prompt_text(settings))
        except CatalogueError as exc:
            raise CallRefused(f"That voice or persona prompt cannot be used: {exc}") from exc

    def close(self, session: Session, reason: str) -> None:
        with self._admit:
            if self._by_token.get(session.resume_token) is session:
                del self._by_token[session.resume_token]
        session.close(reason)
        self.registry.remove(session)

    def drop(self, session: Session) -> None:
        """The caller's connection dropped without a hang-up: hold the call for `resume_seconds`
        (its seat frozen), then close it unless the caller came back with its resume token. Call
        from the event loop (the expiry is scheduled there; no thread waits)."""
        if not self.resume_seconds or session.closed or self.draining:
            self.close_soon(session, "connection dropped")
            return
        with self._admit:
            session.hold()
            dropped_at = session.dropped_at
        asyncio.get_running_loop().call_later(self.resume_seconds, self._expire, session, dropped_at)

    def _expire(self, session: Session, dropped_at: float | None) -> None:
        with self._admit:
            if session.dropped_at != dropped_at:
                return  # resumed (and maybe dropped again since: that drop has its own expiry)
        self.close_soon(session, f"connection dropped and not resumed within {self.resume_seconds:g} s")

    def _resume(self, token: str, connection_id: str) -> Session:
        with self._admit:
            session = self._by_token.get(token)
            if session is None or session.closed:
                raise ResumeFailed("That call can no longer be resumed (it ended, or its time to reconnect ran out).")
            session.resume()
            self.registry.link(connection_id, session)
        return session

    async def open_async(self, call_id: str, settings: CallSettings, client: str | None = None,
                         resume_token: str | None = None) -> Session:
        """`open` on the call-setup threads, so the event loop never waits for it."""
        return await self._setup.run(self.open, call_id, settings, client, resume_token)

    async def close_async(self, session: Session, reason: str) -> None:
        await self._setup.run(self.close, session, reason)

    def close_soon(self, session: Session, reason: str) -> None:
        """`close` on the call-setup threads; returns at once (sync callers on the event loop)."""
        self._setup.submit(self.close, session, reason, failure=f"call {session.call_id} did not close cleanly")

    def stop(self) -> None:
        self._setup.stop()
