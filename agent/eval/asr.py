"""Telugu ASR backends that give word timings: one protocol, lazily imported implementations.

Contract: a `Transcriber` has a `name` and `words(audio, rate, offset_s=0.0) -> list[Word]`: the
words heard in mono float `audio` at `rate`, times in seconds plus `offset_s`. `load_transcriber(spec)`
builds one from a spec string; the heavy package behind each backend is imported only then:

| spec | package | model (default) |
|---|---|---|
| `whisper[:MODEL]` | transformers | `vasista22/whisper-telugu-large-v2` |
| `faster-whisper[:MODEL]` | faster-whisper | `large-v3` |
| `nemo[:MODEL]` | nemo_toolkit[asr] | `ai4bharat/indicconformer_stt_te_hybrid_rnnt_large` |

MODEL may be a local folder. None of these packages is a requirement of the project: install the one
you use (docs/evaluation.md). Tests build a tiny random Whisper from transformers' own classes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from agent.eval.transcript import Word


class AsrError(RuntimeError):
    """A backend that cannot be loaded or run; the message says what to install or fix."""


class Transcriber(Protocol):
    name: str

    def words(self, audio: np.ndarray, rate: int, offset_s: float = 0.0) -> list[Word]: ...
