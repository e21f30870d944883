"""A small generated Telugu evaluation set in Full-Duplex-Bench's layout, for CPU smoke runs.

Contract: `make_set(out, per_task)` writes four task folders, `per_task` samples each, one folder per
sample, every input.wav the user side only (espeak-ng Telugu, several voices) followed by silence
for the agent, and the benchmark's json beside it with the *known* times (speech is placed, not
detected):

| folder | input | json |
|---|---|---|
| `turn_taking/N` | a question, 16 kHz | `turn_taking.json`: [{"text": "[TURN-TAKING]", "timestamp": [turn end, turn end]}] |
| `pause_handling/N` | a sentence, a 1.2-2 s pause, its continuation; 48 kHz (FDB's pause inputs are) | `pause.json`: [{"text": "[PAUSE]", "timestamp": [pause start, pause end]}] |
| `user_interruption/N` | a question, silence for the answer, then an interruption; 16 kHz | `interrupt.json`: [{"context", "interrupt", "timestamp": [start, end]}]; also context.wav, interrupt.wav |
| `backchannel/N` | a monologue of sentences with short pauses, 16 kHz | none (FDB's ICC samples have no timing json) |

Each sample also has `transcription.json` ([{"text", "timestamp": [start, end]}] per user utterance).
The set is synthetic speech, far from real conversation: it checks the harness, not the model.
"""  # noqa: E501 - a Markdown table

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from agent.eval.speech import place, speak

QUESTIONS = [
    "నమస్కారం, మీరు ఎలా ఉన్నారు?",
    "ఈ రోజు వాతావరణం ఎలా ఉంది?",
    "హైదరాబాద్ లో మంచి హోటల్ ఏది?",
    "నాకు ఒక మంచి పుస్తకం చెప్పగలరా?",
]
PAUSED = [  # (before the pause, after it)
    ("నేను రేపు ఉదయం", "బస్సులో విజయవాడ వెళ్తున్నాను."),
    ("మా అమ్మ చేసిన", "పులిహోర చాలా రుచిగా ఉంటుంది."),
    ("నాకు కావలసింది", "ఒక కప్పు వేడి కాఫీ."),
]
INTERRUPTIONS = [
    "ఆగండి, వేరే విషయం మాట్లాడదాం.",
    "క్షమించండి, మళ్ళీ చెప్పగలరా?",
    "వద్దు, నాకు సినిమాల గురించి చెప్పండి.",
]
MONOLOGUE = [
    "నిన్న నేను మార్కెట్ కి వెళ్ళాను.",
    "అక్కడ చాలా రద్దీగా ఉంది.",
    "కూరగాయల ధరలు బాగా పెరిగాయి.",
    "చివరికి కొన్ని టమాటాలు మాత్రమే కొన్నాను.",
]
VOICES = ["te", "te+f3", "te+m3", "te+f2"]
ANSWER_ROOM_S = 4.0  # silence after the user for the agent to answer in
TASK_FOLDERS = ("turn_taking", "pause_handling", "user_interruption", "backchannel")


def _write(folder: Path, audio: np.ndarray, rate: int, utterances: list[tuple[str, float, float]],
           meta: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(str(folder / "input.wav"), audio, rate, subtype="PCM_16")
    transcription = [{"text": text, "timestamp": [round(s, 3), round(e, 3)]} for text, s, e in utterances]
    (folder / "transcription.json").write_text(json.dumps(transcription, ensure_ascii=False, indent=2),
                                               encoding="utf-8")
    for name, data in meta.items():
        (folder / name).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _turn_taking(folder: Path, i: int, rate: int = 16_000) -> None:
    text, start = QUESTIONS[i % len(QUESTIONS)], 0.5 + 0.1 * (i % 3)
    q = speak(text, VOICES[i % len(VOICES)], rate)
    end = start + q.size / rate
    _write(folder, place(end + ANSWER_ROOM_S, rate, [(start, q)]), rate, [(text, start, end)],
           {"turn_taking.json": [{"text": "[TURN-TAKING]", "timestamp": [round(end, 3), round(end, 3)]}]})


def _pause(folder: Path, i: int, rate: int = 48_000) -> None:
    (before, after), voice = PAUSED[i % len(PAUSED)], VOICES[(i + 1) % len(VOICES)]
    a, b = speak(before, voice, rate), speak(after, voice, rate)
    pause_s = 1.2 + 0.4 * (i % 3)
    t0 = 0.5
    pause_start = t0 + a.size / rate
    pause_end = pause_start + pause_s
    end = pause_end + b.size / rate
    _write(folder, place(end + ANSWER_ROOM_S, rate, [(t0, a), (pause_end, b)]), rate,
           [(before, t0, pause_start), (after, pause_end, end)],
           {"pause.json": [{"text": "[PAUSE]", "timestamp": [round(pause_start, 3), round(pause_end, 3)]}]})


def _interruption(folder: Path, i: int, rate: int = 16_000) -> None:
    context, interrupt = QUESTIONS[(i + 1) % len(QUESTIONS)], INTERRUPTIONS[i % len(INTERRUPTIONS)]
    voice = VOICES[(i + 2) % len(VOICES)]
    c, x = speak(context, voice, rate), speak(interrupt, voice, rate)
    t0 = 0.5
    context_end = t0 + c.size / rate
    start = context_end + 3.0  # the agent has been answering for 3 s when the user cuts in
    end = start + x.size / rate
    _write(folder, place(end + ANSWER_ROOM_S, rate, [(t0, c), (start, x)]), rate,
           [(context, t0, context_end), (interrupt, start, end)],
           {"interrupt.json": [{"context": context, "interrupt": interrupt,
                                "timestamp": [round(start, 3), round(end, 3)]}]})
    sf.write(str(folder / "context.wav"), c, rate, subtype="PCM_16")
    sf.write(str(folder / "interrupt.wav"), x, rate, subtype="PCM_16")


def _backchannel(folder: Path, i: int, rate: int = 16_000) -> None:
    voice, t, clips, utterances = VOICES[(i + 3) % len(VOICES)], 0.5, [], []
    for k in range(3):
        text = MONOLOGUE[(i + k) % len(MONOLOGUE)]
        clip = speak(text, voice, rate)
        clips.append((t, clip))
        utterances.append((text, t, t + clip.size / rate))
        t += clip.size / rate + 0.7  # a pause where a listener says "ఊ"
    _write(folder, place(t + 1.0, rate, clips), rate, utterances, {})


BUILDERS = dict(zip(TASK_FOLDERS, (_turn_taking, _pause, _interruption, _backchannel)))


def make_set(out: Path, per_task: int = 3) -> dict[str, Path]:
    """Write the set under `out`; returns task folder name -> its path."""
    if per_task < 1:
        raise ValueError("per_task must be at least 1")
    folders = {}
    for task, build in BUILDERS.items():
        folders[task] = Path(out) / task
        for i in range(per_task):
            build(folders[task] / str(i), i)
    return folders
