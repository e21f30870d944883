"""Full-Duplex-Bench's folder layout: one folder per sample, the user side in `input.wav`.

Contract:
- `find_samples(root)` -> every sample folder under `root` (a folder holding `input.wav`; `root`
  itself when it is one), in the benchmark's order (numeric names numerically), with what its json
  files say: the end of the user's turn (`turn_taking.json` timestamp[0]) and the interruption window
  (`interrupt.json` timestamp; v1.5's `metadata.json` timestamps).
- `read_audio(path)` -> (mono float32, rate), any WAV rate/channels/sample format.
- `write_output(folder, pcm, rate)` writes `output.wav`: mono 16-bit PCM at `rate`, the agent's
  audio time-aligned with the input and exactly as long (FDB's scripts assume both). A stale
  `output.json` (a transcript of an earlier output) is removed with it.

Bad files raise `EvalDataError` with the file's name; nothing is guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from agent.audio.files import read_mono
from agent.audio.stream import resample

INPUT = "input.wav"
OUTPUT = "output.wav"
TRANSCRIPT = "output.json"  # the benchmark's time-aligned transcript of output.wav


class EvalDataError(ValueError):
    """A sample folder or file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Sample:
    folder: Path
    turn_end_s: float | None = None  # where the user's turn ends (turn_taking.json)
    interrupt_s: tuple[float, float] | None = None  # the user's interruption (interrupt.json)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def input(self) -> Path:
        return self.folder / INPUT

    @property
    def output(self) -> Path:
        return self.folder / OUTPUT

    @property
    def transcript(self) -> Path:
        return self.folder / TRANSCRIPT


def _sort_key(folder: Path) -> tuple[int, int | str]:
    return (0, int(folder.name)) if folder.name.isdigit() else (1, folder.name)


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalDataError(f"{path}: unreadable JSON ({exc})") from exc


def _timestamp(path: Path) -> list[float]:
    """timestamp of the first entry of a list-of-dicts json (turn_taking.json, interrupt.json)."""
    data = _json(path)
    try:
        stamp = [float(t) for t in data[0]["timestamp"]]
        if not stamp:
            raise ValueError("empty timestamp")
        return stamp
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise EvalDataError(f"{path}: expected [{{\"timestamp\": [start, end], ...}}] ({exc})") from exc


def read_sample(folder: Path) -> Sample:
    turn_end = interrupt = None
    if (folder / "turn_taking.json").exists():
        turn_end = _timestamp(folder / "turn_taking.json")[0]
    if (folder / "interrupt.json").exists():
        stamp = _timestamp(folder / "interrupt.json")
        interrupt = (stamp[0], stamp[-1])
    elif (folder / "metadata.json").exists():  # v1.5: the overlap window
        meta = _json(folder / "metadata.json")
        stamps = meta.get("timestamps") if isinstance(meta, dict) else None
        if stamps:
            try:
                flat = np.asarray(stamps, float).ravel()
                interrupt = (float(flat[0]), float(flat[-1]))
            except (TypeError, ValueError) as exc:
                raise EvalDataError(f"{folder / 'metadata.json'}: bad timestamps ({exc})") from exc
    return Sample(folder, turn_end, interrupt)


def find_samples(root: Path) -> list[Sample]:
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a folder")
    if (root / INPUT).exists():
        return [read_sample(root)]
    folders = sorted((f for f in root.iterdir() if (f / INPUT).is_file()), key=_sort_key)
    if not folders:
        raise EvalDataError(f"{root}: no sample folders (a folder per sample with {INPUT})")
    return [read_sample(f) for f in folders]


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the file's rate. NaN/Inf samples are an error, not silence."""
    try:
        mono, rate = read_mono(path)
    except (sf.SoundFileError, RuntimeError) as exc:
        raise EvalDataError(f"{path}: not a readable audio file ({exc})") from exc
    if not np.isfinite(mono).all():
        raise EvalDataError(f"{path}: contains NaN or Inf samples")
    return mono, rate


def fit_length(audio: np.ndarray, n: int) -> np.ndarray:
    """`audio` cut or zero-padded to exactly n samples."""
    out = np.zeros(n, np.float32)
    out[:min(n, audio.size)] = audio[:n]
    return out


def write_output(folder: Path, pcm: np.ndarray, pcm_rate: int, rate: int, n_samples: int,
                 name: str = OUTPUT) -> Path:
    """Write the agent's audio as `name` (output.wav) at `rate`, exactly `n_samples` long; the
    transcript of an earlier output (output.json) no longer describes it and is removed."""
    audio = fit_length(resample(pcm, pcm_rate, rate), n_samples)
    path = folder / name
    sf.write(str(path), np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16")
    path.with_suffix(".json").unlink(missing_ok=True)
    return path
