"""TTS plug-ins for tests/test_synth_script.py (loaded by `synth --tts synth_helpers:Class`): the real
espeak-ng backend with one fault injected, to prove how the stage handles it."""

from __future__ import annotations

import time

from agent.train.tts import EspeakBackend, Speech, Style, TTSError

FAIL_WORD = "విఫలం"  # "failure": a turn holding this word fails in FailingEspeak


class FailingEspeak(EspeakBackend):
    """espeak-ng, except that a turn containing FAIL_WORD fails like an engine error would."""

    def synthesize(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        out = super().synthesize(items)
        return [TTSError("engine crashed (injected)") if FAIL_WORD in text else result
                for (text, _), result in zip(items, out)]


class SlowEspeak(EspeakBackend):
    """espeak-ng taking 0.4 s more per dialogue, so a test can kill a run in its middle."""

    def synthesize(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        time.sleep(0.4)
        return super().synthesize(items)
