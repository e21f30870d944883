"""Shared fixtures: Telugu test speech from espeak-ng, tiny models, and a live server on 127.0.0.1.

Every model here is the tiny random-weight Moshi/Mimi built from the `moshi` package's own classes,
so the real streaming code runs. A model's streaming state lives in its modules: one model backs
one engine, so each engine gets a fresh model (building one takes ~0.1 s).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported anywhere
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import SAMPLE_RATE
from agent.audio.espeak import EspeakError, espeak
from agent.audio.stream import resample
from agent.config import EngineConfig, ModelConfig, ServerConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def wait_until(condition, timeout: float = 5.0, message: str | None = None, *, every: float = 0.05):
    """Poll `condition` until it gives something truthy or `timeout` passes; its last value. With a
    `message`, a timeout fails the test with it. The one waiting helper of the tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(every)
    if not value and message is not None:
        raise AssertionError(message)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def espeak_telugu(text: str, path: Path, voice: str = "te", extra: list[str] | None = None) -> np.ndarray:
    """Telugu speech from Debian's espeak-ng, written to `path` (24 kHz mono) and returned as float32."""
    try:
        audio = espeak(text, voice, SAMPLE_RATE, extra or ())
    except EspeakError as exc:
        pytest.fail(f"{exc}; .ci/run installs it")
    sf.write(path, audio, SAMPLE_RATE)
    return audio


@pytest.fixture(scope="session")
def telugu_speech(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """About 5 s of Telugu speech at 24 kHz."""
    path = tmp_path_factory.mktemp("speech") / "telugu.wav"
    text = "నమస్కారం, మీరు ఎలా ఉన్నారు? ఈ రోజు వాతావరణం చాలా బాగుంది."
    return path, espeak_telugu(text, path)


@pytest.fixture(scope="session")
def telugu_dialogue(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Two Telugu utterances separated by 1.5 s of silence (two user turns), 24 kHz."""
    folder = tmp_path_factory.mktemp("dialogue")
    first = espeak_telugu("నమస్కారం, మీరు ఎలా ఉన్నారు?", folder / "a.wav")
    second = espeak_telugu("నాకు ఒక కప్పు కాఫీ కావాలి.", folder / "b.wav", voice="te+f3")
    audio = np.concatenate([first, np.zeros(int(1.5 * SAMPLE_RATE), np.float32), second,
                            np.zeros(int(1.0 * SAMPLE_RATE), np.float32)])
    path = folder / "dialogue.wav"
    sf.write(path, audio, SAMPLE_RATE)
    return path, audio


@pytest.fixture(scope="session")
def mic_wav(tmp_path_factory, telugu_speech) -> Path:
    _, speech = telugu_speech
    audio = np.concatenate([speech, np.zeros(SAMPLE_RATE, np.float32)])
    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    sf.write(path, resample(audio, SAMPLE_RATE, 48_000), 48_000, subtype="PCM_16")
    return path


def tiny_model(seed: int = 1234):
    from agent.models import load_model
    return load_model(ModelConfig(model="tiny", device="cpu", seed=seed))


def make_service(max_sessions: int = 3, server_config: ServerConfig | None = None, **engine_kwargs):
    from agent.service import build_service
    return build_service(ModelConfig(model="tiny", device="cpu"),
                         EngineConfig(max_sessions=max_sessions, **engine_kwargs), server_config or ServerConfig(),
                         warm_up=False)


class LiveServer:
    """The real app (page + fastrtc endpoints) served by uvicorn on 127.0.0.1."""

    def __init__(self, max_sessions: int = 3, server_config: ServerConfig | None = None, **engine_kwargs):
        from agent.web.server import BackgroundServer, build_app, build_stream
        from agent.web.ui import build_demo

        self.service = make_service(max_sessions, server_config, **engine_kwargs)
        self.demo = build_demo(self.service)
        self.stream = build_stream(self.service)
        self.port = free_port()
        self.server = BackgroundServer(build_app(self.service, self.demo, self.stream), "127.0.0.1", self.port).start()
        self.url = self.server.url
        self.ws_url = f"ws://127.0.0.1:{self.port}/websocket/offer"

    def close(self) -> None:
        self.server.stop()
        self.service.close()


def live_server_fixture(max_sessions: int = 3, server_config: ServerConfig | None = None, **engine_kwargs):
    """A module-scoped fixture serving one LiveServer with these settings to the module's tests (assign it to
    the fixture's name: `server = live_server_fixture(...)`)."""

    @pytest.fixture(scope="module")
    def serve():
        live = LiveServer(max_sessions, server_config, **engine_kwargs)
        yield live
        live.close()

    return serve


# a dropped call waits 3 s for its caller to resume it (15 s by default), so tests see seats freed soon
live_server = live_server_fixture(max_sessions=3, server_config=ServerConfig(resume_seconds=3.0))
