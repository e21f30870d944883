"""Stage `synth`: dialogue scripts (stage `script`) -> stereo 24 kHz conversations with exact labels, in the
layout `tokens` reads from `align` (data/<id>.wav + data/<id>.json + manifest.jsonl), so the approximate
aligner is skipped for synthetic data. Also prompts/<id>.wav (the agent's voice on another sentence, for
PersonaPlex-style voice prompting) and the dataset card (README.md + card.json).

Per dialogue:
1. Every turn is rendered by the TTS backend (agent.train.tts): agent turns in the script's catalogue voice
   and each turn's emotion, user turns in one of the backend's many user voices (seeded choice per
   dialogue). A turn the backend fails on skips the dialogue with the reason; the others go on.
2. Turns are placed in time. Speaker changes take a floor-transfer offset drawn from a normal distribution
   (mean 200 ms, sd 250 ms, clipped to -500..1200 ms; a negative offset is a short overlap): conversation's
   gaps are "of the order of 200 ms" (Levinson & Torreira 2015, Front. Psychol. 6:731) with the mode of
   response offsets at 0-200 ms across ten languages (Stivers et al. 2009, PNAS 106:10587). A scripted
   `overlap` starts before the other side ends by a log-normal duration (median 350 ms, clipped
   100-1000 ms; overlap durations are roughly log-normal: Laskowski, Heldner & Edlund, Interspeech 2012);
   the other side finishes. An `interrupts` turn starts 35-75 % into the other side's turn, which stops a
   reaction time (100-300 ms) later with a 20 ms fade: its words after the cut are not in the labels. A
   scripted `pause_ms` replaces the drawn gap. A backchannel sits on the listener's channel 35-75 % into
   the other side's turn and does not take the floor. Nobody overlaps themselves.
3. Channels: LEFT = agent, RIGHT = user (as the `dialogues` stage). Optional noise (pink, SNR drawn) and room
   (a synthetic exponential-decay reverb) on the user channel only. Each channel is loudness-normalised
   with pyloudnorm (ITU-R BS.1770): the agent at `agent_lufs`, the user at a level drawn from `user_lufs`,
   peaks kept under -1 dBFS.
Labels: every agent word with its exact time (the TTS engine's word events for espeak-ng; see tts.py for
Parler) as SPEAKER_MAIN, user words as SPEAKER_OTHER, `text_conditions` {speaker: voice, emotion}; the
manifest line (SynthRecord) adds persona, per-turn role/kind/emotion/start/end/words, user voice, events.
Everything random comes from (seed, dialogue id): reruns reuse finished dialogues, any `workers` count gives
the same files.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agent import SAMPLE_RATE
from agent.train.align import MAIN_SPEAKER, OTHER_SPEAKER
from agent.train.common import (
    PIPELINE_VERSION,
    StageRun,
    Summary,
    UsageError,
    atomic_write_json,
    atomic_write_text,
    atomic_write_wav,
    fingerprint,
    parallel_map,
    progress,
)
from agent.train.records import (
    AGENT,
    BACKCHANNEL,
    USER,
    RecordError,
    ScriptRecord,
    SynthRecord,
    Word,
    from_dict,
    to_dict,
)
from agent.train.script import validate
from agent.train.tts import Backend, Speech, Style, TTSError, load_backend
from agent.voices import EMOTION, GENDERS, SPEAKER, load_catalogue

CARD, CARD_JSON, PROMPTS, GENERATOR = "README.md", "card.json", "prompts", "generator.json"
SHARE_ALIKE = ("-SA", "SHARE-ALIKE", "SHAREALIKE", "BY-SA", "GPL")  # licences whose derivatives keep them
PROMPT_TEXT = "నమస్కారం, నేను {name} మాట్లాడుతున్నాను."  # a voice prompt's words, when the script gives none


@dataclass
class SynthConfig:
    inp: Path  # the script stage's folder or its manifest.jsonl
    out: Path
    tts: str = "espeak"  # espeak | parler | module:Class
    seed: int = 0
    workers: int = 1
    ray: str | None = None  # local | auto | a Ray address (Parler: actors each holding the model)
    num_gpus: float = 0  # per Ray actor holding Parler
    # timing (see the module docstring for the sources)
    offset_ms: tuple[float, float] = (200.0, 250.0)  # floor-transfer offset: mean, sd
    offset_clip_ms: tuple[float, float] = (-500.0, 1200.0)
    overlap_median_ms: float = 350.0
    same_speaker_gap_ms: tuple[int, int] = (300, 900)
    lead_in_ms: tuple[int, int] = (300, 800)
    tail_ms: int = 500
    # levels and the user's acoustics
    agent_lufs: float = -23.0
    user_lufs: tuple[float, float] = (-27.0, -20.0)
    user_noise_prob: float = 0.0
    noise_snr_db: tuple[float, float] = (15.0, 35.0)
    user_room_prob: float = 0.0
    room_rt60_s: tuple[float, float] = (0.2, 0.6)
    max_chars: int = 400
    # Parler-TTS
    parler_model: str = "ai4bharat/indic-parler-tts"
    batch_size: int = 8
    device: str | None = None
    force: bool = False
    quiet: bool = False

    def settings(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                if k not in ("inp", "out", "workers", "ray", "num_gpus", "force", "quiet", "device", "batch_size")}

    def backend_options(self) -> dict:
        return {"model": self.parler_model, "device": self.device, "batch_size": self.batch_size,
                "seed": self.seed} if self.tts == "parler" else {}


# ---------------------------------------------------------------------------------------------
# Placing turns in time
# ---------------------------------------------------------------------------------------------

@dataclass
class Placed:
    index: int  # in the script
    role: str
    kind: str
    start: float
    speech: Speech
    cut: float | None = None  # seconds into the clip where an interruption stopped it

    @property
    def length(self) -> float:
        full = self.speech.audio.size / SAMPLE_RATE
        return full if self.cut is None else min(self.cut, full)

    @property
    def end(self) -> float:
        return self.start + self.length

    def words(self) -> list[Word]:
        """Dialogue-time words actually spoken (a word cut by an interruption is left out)."""
        return [w.shifted(self.start) for w in self.speech.words if self.cut is None or w.end <= self.cut]


def place(script: ScriptRecord, speech: list[Speech], config: SynthConfig, rng: random.Random) -> list[Placed]:
    """Each turn's start in the dialogue (and the cut of an interrupted turn), per the module docstring."""
    placed: list[Placed] = []
    floor: Placed | None = None  # the last main turn
    channel_end = {AGENT: 0.0, USER: 0.0}
    for n, (turn, clip) in enumerate(zip(script.turns, speech)):
        item = Placed(n, turn.speaker, turn.kind, 0.0, clip)
        if turn.kind == BACKCHANNEL and floor is not None:
            at = floor.start + rng.uniform(0.35, 0.75) * floor.length
            item.start = max(at, channel_end[turn.speaker] + 0.05)
        elif floor is None:
            item.start = rng.uniform(*config.lead_in_ms) / 1000
        elif floor.role == turn.speaker:
            item.start = floor.end + rng.uniform(*config.same_speaker_gap_ms) / 1000
        elif turn.interrupts:
            item.start = floor.start + rng.uniform(0.35, 0.75) * floor.length
        elif turn.overlap:
            overlap = min(max(rng.lognormvariate(math.log(config.overlap_median_ms / 1000), 0.5), 0.1), 1.0)
            item.start = floor.end - min(overlap, 0.5 * floor.length)
        elif turn.pause_ms is not None:
            item.start = floor.end + turn.pause_ms / 1000
        else:
            mean, sd = config.offset_ms
            low, high = config.offset_clip_ms
            offset = min(max(rng.gauss(mean, sd), low), high) / 1000
            item.start = floor.end + max(offset, -0.5 * floor.length)
        item.start = round(max(item.start, channel_end[turn.speaker] + (0.05 if channel_end[turn.speaker] else 0)), 4)
        if turn.interrupts and floor is not None and floor.role != turn.speaker and item.start < floor.end:
            # the interrupted side stops a reaction time after the other starts
            floor.cut = round(item.start - floor.start + rng.uniform(0.1, 0.3), 4)
            if floor.cut >= floor.length:
                floor.cut = None
            else:
                channel_end[floor.role] = floor.end
        if turn.kind != BACKCHANNEL or floor is None:
            floor = item
        placed.append(item)
        channel_end[turn.speaker] = item.start + clip.audio.size / SAMPLE_RATE
    return placed


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------

def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import lfilter
    # Paul Kellett's economy pink filter: 1/f within about 1 dB above 10 Hz
    b, a = [0.049922035, -0.095993537, 0.050612699, -0.004408786], [1, -2.494956002, 2.017265875, -0.522189400]
    return lfilter(b, a, rng.standard_normal(n))


def room(x: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: direct sound plus exponentially decaying noise reaching -60 dB at rt60."""
    from scipy.signal import fftconvolve
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    ir = rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60) * 0.3
    ir[0] = 1.0
    return fftconvolve(x, ir)[:x.size]


def normalise(x: np.ndarray, lufs: float) -> np.ndarray:
    """To `lufs` integrated loudness (pyloudnorm), peaks under -1 dBFS."""
    import pyloudnorm
    try:
        loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(x)
    except ValueError:  # shorter than one 400 ms gating block
        loudness = 20 * math.log10(max(float(np.sqrt(np.mean(x ** 2))), 1e-9))
    if not math.isfinite(loudness):
        return x
    y = x * 10 ** ((lufs - loudness) / 20)
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    return y * (0.89 / peak) if peak > 0.89 else y


def mix(placed: list[Placed], config: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(stereo float32 [T, 2], what was done to the user channel)."""
    duration = max(p.end for p in placed) + config.tail_ms / 1000
    n = int(math.ceil(duration * SAMPLE_RATE))
    channels = {AGENT: np.zeros(n), USER: np.zeros(n)}
    fade = int(0.02 * SAMPLE_RATE)
    for p in placed:
        clip = p.speech.audio[:int(round(p.length * SAMPLE_RATE))].astype(np.float64)
        if p.cut is not None and clip.size > fade:
            clip[-fade:] *= np.linspace(1, 0, fade)
        at = int(round(p.start * SAMPLE_RATE))
        channels[p.role][at:at + clip.size] += clip[:n - at]
    user, acoustics = channels[USER], {}
    if rng.random() < config.user_room_prob:
        acoustics["room_rt60_s"] = round(float(rng.uniform(*config.room_rt60_s)), 3)
        user = room(user, acoustics["room_rt60_s"], rng)
    if rng.random() < config.user_noise_prob:
        acoustics["noise_snr_db"] = round(float(rng.uniform(*config.noise_snr_db)), 1)
        noise = pink_noise(n, rng)
        speech_power = np.mean(user[np.abs(user) > 1e-4] ** 2) if np.any(np.abs(user) > 1e-4) else 1e-6
        user = user + noise * math.sqrt(speech_power / np.mean(noise ** 2) / 10 ** (acoustics["noise_snr_db"] / 10))
    acoustics["user_lufs"] = round(float(rng.uniform(*config.user_lufs)), 1)
    stereo = np.stack([normalise(channels[AGENT], config.agent_lufs), normalise(user, acoustics["user_lufs"])], 1)
    return stereo.astype(np.float32), acoustics


def f0_median(x: np.ndarray, fmin: float = 60.0, fmax: float = 400.0) -> float | None:
    """Median pitch (Hz) of the clearly voiced 60 ms frames by autocorrelation (unbiased; of the peaks within
    15 % of the best, the shortest lag, against octave errors); None when nothing is voiced."""
    frame, hop = int(0.06 * SAMPLE_RATE), int(0.02 * SAMPLE_RATE)
    lo, hi = int(SAMPLE_RATE / fmax), int(SAMPLE_RATE / fmin)
    level = np.sqrt(np.mean(x ** 2)) if x.size else 0.0
    values = []
    for start in range(0, x.size - frame, hop):
        f = x[start:start + frame] - np.mean(x[start:start + frame])
        if np.sqrt(np.mean(f ** 2)) < level:
            continue  # quieter than the clip's average: not clearly voiced
        ac = np.correlate(f, f, "full")[frame - 1:] / (frame - np.arange(frame))
        seg = ac[lo:hi]
        if seg.max() <= 0.3 * ac[0]:
            continue
        peaks = np.flatnonzero((seg[1:-1] >= seg[:-2]) & (seg[1:-1] >= seg[2:]) & (seg[1:-1] >= 0.85 * seg.max()))
        lag = lo + (int(peaks[0]) + 1 if peaks.size else int(np.argmax(seg)))
        values.append(SAMPLE_RATE / lag)
    return round(float(np.median(values)), 1) if values else None


# ---------------------------------------------------------------------------------------------
# One dialogue (runs in a worker process)
# ---------------------------------------------------------------------------------------------

_BACKEND: dict[str, Backend] = {}


def backend_for(config: SynthConfig) -> Backend:
    """One backend per process (espeak-ng's engine is per process; Parler loads once)."""
    if config.tts not in _BACKEND:
        _BACKEND[config.tts] = load_backend(config.tts, **config.backend_options())
    return _BACKEND[config.tts]


def labels(script: ScriptRecord, placed: list[Placed], agent: str, user: str) -> tuple[list, list[dict]]:
    """(moshi-finetune alignments sorted by start, per-turn label rows) of the placed turns."""
    alignments, rows = [], []
    for p in placed:
        turn, words = script.turns[p.index], p.words()
        alignments.extend([w.text, [w.start, w.end], MAIN_SPEAKER if p.role == AGENT else OTHER_SPEAKER]
                          for w in words)
        row = {"role": p.role, "kind": p.kind, "start": round(p.start, 4), "end": round(p.end, 4), "text": turn.text,
               "emotion": turn.emotion, "voice": agent if p.role == AGENT else user,
               "interrupted": p.cut is not None, "words": [[w.text, w.start, w.end] for w in words]}
        if p.role == AGENT:  # acoustic figures per label, for the card
            clip = p.speech.audio[:int(p.length * SAMPLE_RATE)]
            row["rms_db"] = round(20 * math.log10(max(float(np.sqrt(np.mean(clip ** 2))), 1e-9)), 2)
            row["words_per_s"] = round(len(words) / max(p.length, 1e-3), 3)
            row["f0_hz"] = f0_median(clip)
        rows.append(row)
    return sorted(alignments, key=lambda a: a[1][0]), rows


def count_events(script: ScriptRecord, placed: list[Placed]) -> dict[str, float]:
    events: Counter = Counter()
    for turn in script.turns:
        events["backchannels"] += turn.kind == BACKCHANNEL
        events["interruptions"] += bool(turn.interrupts)
        events["overlaps"] += bool(turn.overlap)
        events["pauses"] += turn.pause_ms is not None
    both = [(a, b) for a in placed for b in placed if a.role == AGENT and b.role != AGENT]
    events["overlapping_seconds"] = round(sum(max(0.0, min(a.end, b.end) - max(a.start, b.start)) for a, b in both), 3)
    return dict(events)


def synth_dialogue(job: tuple[dict, SynthConfig]) -> tuple[str, object]:
    """("ok", {"record": SynthRecord dict, "generator": about}) with its files written, ("skip", reason), or
    ("fatal", why no dialogue can be made)."""
    script_dict, config = job
    script = from_dict(ScriptRecord, script_dict)
    out = Path(config.out)
    try:
        backend = backend_for(config)
    except TTSError as exc:
        return "fatal", str(exc)
    voice = load_catalogue().voice(script.voice)
    rng = random.Random(f"synth/{config.seed}/{script.id}")
    np_rng = np.random.default_rng(int(fingerprint("synth", config.seed, script.id)[:12], 16))
    gender = rng.choice(GENDERS)
    user = rng.choice([s for s in backend.user_styles() if s.gender == gender] or backend.user_styles())
    styles = [Style(voice.id, voice.gender, t.emotion or "neutral") if t.speaker == AGENT else user
              for t in script.turns]
    prompt_text = script.prompt_text or PROMPT_TEXT.format(name=voice.name_te)
    items = [(t.text, s) for t, s in zip(script.turns, styles)] + [(prompt_text, Style(voice.id, voice.gender))]
    rendered = backend.synthesize(items)
    for n, (turn, result) in enumerate(zip(script.turns, rendered), 1):
        if isinstance(result, TTSError):
            return "skip", f"tts failed (turn {n}, {turn.speaker}): {result}"
    if isinstance(rendered[-1], TTSError):
        return "skip", f"tts failed (the voice prompt): {rendered[-1]}"
    speech: list[Speech] = rendered[:-1]  # type: ignore[assignment]
    placed = place(script, speech, config, rng)
    stereo, acoustics = mix(placed, config, np_rng)
    alignments, turns = labels(script, placed, voice.id, user.voice)
    emotions = {t.emotion for t in script.turns if t.speaker == AGENT}
    conditions = {SPEAKER: voice.id, **({EMOTION: next(iter(emotions))} if len(emotions) == 1 else {})}
    wav, js, prompt = (out / "data" / f"{script.id}.wav", out / "data" / f"{script.id}.json",
                       out / PROMPTS / f"{script.id}.wav")
    atomic_write_wav(wav, stereo, SAMPLE_RATE)
    atomic_write_wav(prompt, normalise(rendered[-1].audio.astype(np.float64), config.agent_lufs), SAMPLE_RATE)
    atomic_write_json(js, {"alignments": alignments, "text_conditions": conditions})
    about = backend.about()
    record = SynthRecord(
        id=script.id, path=str(wav.relative_to(out)), alignment=str(js.relative_to(out)),
        duration=round(stereo.shape[0] / SAMPLE_RATE, 4), agent_speaker=voice.id, agent_voice=voice.id,
        emotion=conditions.get(EMOTION), licences=[script.licence],
        n_words=sum(1 for a in alignments if a[2] == MAIN_SPEAKER), methods={speech[0].method: len(alignments)},
        text_conditions=conditions, persona=script.persona, user_voice=user.voice,
        voice_prompt=str(prompt.relative_to(out)), tts=f"{about['name']} {about.get('version', '')}".strip(),
        source=script.source, seed=script.seed, events=count_events(script, placed), turns=turns,
        acoustics=acoustics)
    return "ok", {"record": to_dict(record), "generator": about}


# ---------------------------------------------------------------------------------------------
# The stage and its dataset card
# ---------------------------------------------------------------------------------------------

def share_alike(licence: str) -> bool:
    upper = licence.upper()
    return any(mark in upper for mark in SHARE_ALIKE) or "SLR66" in upper


def _manifest_path(inp: Path) -> Path:
    return inp / "manifest.jsonl" if inp.is_dir() else inp


def run_synth(config: SynthConfig) -> Summary:
    manifest = _manifest_path(Path(config.inp))
    run = StageRun("synth", config.out, config.force, config.quiet)
    catalogue = load_catalogue()
    scripts = run.read(manifest, ScriptRecord)
    generator_file = run.out / GENERATOR
    about: dict = json.loads(generator_file.read_text()) if generator_file.is_file() else {}
    jobs = []
    for script in scripts:
        try:
            script = validate(script, catalogue, config.max_chars)
        except RecordError as exc:
            run.report.skip(script.id, str(manifest), f"bad script: {exc}")
            continue
        if share_alike(script.licence):
            run.report.note(script.id, script.source, f"licence {script.licence!r} is share-alike: the data made "
                                                      "from it must carry the same licence")
        signature = fingerprint(to_dict(script), config.settings())
        if not run.reuse(script.id, signature, SynthRecord):
            jobs.append((script, signature))
    results = parallel_map(synth_dialogue, [(to_dict(s), config) for s, _ in jobs], config.workers,
                           ray=config.ray, actors=config.tts == "parler", num_gpus=config.num_gpus)
    for (script, signature), (status, value) in progress(zip(jobs, results), "synth", total=len(jobs),
                                                          quiet=config.quiet):
        if status == "fatal":
            raise UsageError(str(value))
        if status == "skip":
            run.report.skip(script.id, script.source, str(value))
            continue
        record = from_dict(SynthRecord, value["record"])
        if value["generator"] != about:
            about = value["generator"]
            atomic_write_json(generator_file, about)
        run.keep(script.id, signature, record, [run.out / record.path, run.out / record.alignment,
                                                run.out / record.voice_prompt])
    run.records.sort(key=lambda r: r.id)
    summary = run.finish()
    write_card(run.out, run.records, config, about, summary)
    return summary


ACOUSTIC_KEYS = ("f0_hz", "rms_db", "words_per_s")


def emotion_effects(records: list[SynthRecord]) -> dict[str, dict[str, float | None]]:
    """Per emotion, how the agent's turns differ from the same voice's neutral turns (medians per voice,
    then the mean over voices that have both): F0 and speaking rate as ratios, level in dB. Measured on the
    audio, so it says whether an emotion setting (espeak) or description (Parler) changes the speech."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in records:
        for t in r.turns:
            if t["role"] == AGENT and t["kind"] != BACKCHANNEL and t.get("emotion"):
                cell = values.setdefault((t["voice"], t["emotion"]), {k: [] for k in ACOUSTIC_KEYS})
                for key in ACOUSTIC_KEYS:
                    if t.get(key) is not None:
                        cell[key].append(float(t[key]))
    median = {k: {key: (float(np.median(v)) if v else None) for key, v in cell.items()} for k, cell in values.items()}
    effects: dict[str, dict[str, float | None]] = {}
    for emotion in sorted({e for _, e in median}):
        out: dict[str, float | None] = {}
        for key, name in (("f0_hz", "f0_ratio"), ("words_per_s", "rate_ratio"), ("rms_db", "level_db")):
            diffs = []
            for (voice, e), m in median.items():
                base = median.get((voice, "neutral"), {}).get(key)
                if e == emotion and m[key] is not None and base:
                    diffs.append(m[key] - base if key == "rms_db" else m[key] / base)
            out[name] = round(float(np.mean(diffs)), 3) if diffs else None
        effects[emotion] = out
    return effects


def card_data(records: list[SynthRecord], config: SynthConfig, about: dict, summary: Summary) -> dict:
    voices, emotions, turns_by, events, sources, licences = Counter(), Counter(), Counter(), Counter(), Counter(), \
        Counter()
    users = set()
    for r in records:
        voices[r.agent_voice] += 1
        users.add(r.user_voice)
        sources[r.source.split(":")[0]] += 1
        for lic in r.licences:
            licences[lic] += 1
        for k, v in r.events.items():
            events[k] += v
        for t in r.turns:
            turns_by[t["role"]] += 1
            if t["role"] == AGENT and t["emotion"]:
                emotions[t["emotion"]] += 1
    return {
        "dialogues": len(records), "hours": round(sum(r.duration for r in records) / 3600, 4),
        "turns": dict(turns_by), "agent_voices": dict(sorted(voices.items())),
        "agent_turns_per_emotion": dict(sorted(emotions.items())), "user_voices": len(users),
        "events": {k: round(v, 3) for k, v in sorted(events.items())}, "sources": dict(sources),
        "licences": dict(licences), "share_alike": sorted(lic for lic in licences if share_alike(lic)),
        "emotion_effects": emotion_effects(records),
        "generator": {"tts": about, "pipeline_version": PIPELINE_VERSION, "synth_seed": config.seed,
                      "script_seeds": sorted({r.seed for r in records if r.seed is not None}),
                      "settings": config.settings()},
        "skipped": summary.skipped, "skip_reasons": summary.reasons,
    }


def write_card(out: Path, records: list[SynthRecord], config: SynthConfig, about: dict, summary: Summary) -> None:
    data = card_data(records, config, about, summary)
    atomic_write_json(out / CARD_JSON, data)
    licences = ", ".join(f"{k} ({v} dialogues)" for k, v in data["licences"].items()) or "none"
    flagged = ("\n**Share-alike:** " + ", ".join(data["share_alike"]) + " — data made from these must keep "
               "their licence.\n") if data["share_alike"] else ""
    effects = data["emotion_effects"]
    emo = "\n".join(f"| {e} | {n} | " + " | ".join(str(effects.get(e, {}).get(k)) for k in
                                                  ("f0_ratio", "level_db", "rate_ratio")) + " |"
                    for e, n in data["agent_turns_per_emotion"].items())
    text = f"""---
language: [te]
license: other
task_categories: [audio-to-audio, text-to-speech]
tags: [synthetic, full-duplex, moshi, telugu]
---
# Synthetic Telugu two-channel dialogues

Made by `python -m agent.train synth` (this repository) from `script` stage dialogues. LEFT channel = the
agent, RIGHT = the user, 24 kHz PCM-16; `data/<id>.json` holds moshi-finetune alignments with exact word
times; `prompts/<id>.wav` is the agent's voice on another sentence. **Every voice here is synthetic.**

| | |
|---|---|
| dialogues | {data['dialogues']} |
| hours | {data['hours']} |
| turns | {json.dumps(data['turns'])} |
| agent voices (dialogues) | {json.dumps(data['agent_voices'])} |
| user voices | {data['user_voices']} |
| events | {json.dumps(data['events'])} |
| skipped | {data['skipped']} {json.dumps(data['skip_reasons'])} |

## Agent emotions: turns, and what each does to the audio against the same voice's neutral turns

Medians per voice, then the mean over voices: F0 and speaking rate as ratios, level in dB (before the
channel's loudness normalisation). Values near 1 (and 0 dB) mean the emotion did not change the speech.

| emotion | turns | F0 vs neutral | level vs neutral (dB) | rate vs neutral |
|---|---|---|---|---|
{emo}

## Sources and licences
Text sources: {json.dumps(data['sources'])}. Licences: {licences}. Sources without a licence were refused.
{flagged}
## Generator
TTS: {about.get('name', '?')} {about.get('version', '')} ({about.get('licence', '?')}). Pipeline version
{PIPELINE_VERSION}; synth seed {config.seed}; script seeds {data['generator']['script_seeds']}. Timing: floor-transfer
offsets N({config.offset_ms[0]:.0f} ms, {config.offset_ms[1]:.0f} ms) (Stivers et al. 2009; Levinson & Torreira 2015),
log-normal overlaps (Laskowski, Heldner & Edlund 2012). All settings are in card.json.
"""
    atomic_write_text(out / CARD, text)
