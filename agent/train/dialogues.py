"""Stage 3, dialogues: stereo 24 kHz conversations, LEFT = the agent, RIGHT = the user, as
moshi-finetune reads them -> dialogues/manifest.jsonl (DialogueRecord with per-turn labels).

Three roads, chosen by configuration (`road`), not by different code paths for the later stages:
- "conversation": a two-speaker recording (ingested with `agent_channel`) is already a dialogue; its
  turns come from the VAD regions of each channel (pauses under `turn_gap_ms` stay inside a turn).
- "assembled": turn-taking dialogues built from single-speaker utterances. Per dialogue one agent
  speaker (round-robin over the agent speakers) and one user speaker (another speaker, seeded choice);
  the agent keeps one emotion per dialogue (emotion_policy "dialogue", matching the per-file
  conditioning moshi-finetune applies) or mixes them ("turn"). Between one side's last voiced instant
  and the other's first: a gap drawn from `gap_ms`, or with `overlap_prob` an overlap from `overlap_ms`
  (a user barge-in, or the agent starting before the user finishes). During a long turn the other side
  may add a short backchannel (an utterance of at most `backchannel_max_s`). Agent turns need a
  transcript (the text stream is trained on them); user turns need none. Every utterance of a pool is
  used once before any repeats.
- "monologue" (only when asked for; "auto" never picks it): for Telugu adaptation on single-speaker
  speech. One agent speaker per file, its utterances back to back on the LEFT with a pause drawn from
  `monologue_gap_ms` between one's last voiced instant and the next's first; the RIGHT channel is
  exact digital silence. No utterance appears twice in a file; a file ends before an utterance that
  would take it (with `tail_s`) past `max_seconds` (`min_turns`/`max_turns` do not apply). The emotion policy is the
  assembled road's: one agent emotion per file ("dialogue") or mixed ("turn"). With `count` unset,
  every agent utterance with a transcript is used exactly once; with `count`, files take the agent
  speakers round-robin (and rotate emotions) and each pool is used once before any repeats. Turns are
  all role "agent", so align, tokens and training read these files like any other dialogue.
- "auto" (default): each input record takes the road its kind calls for (assembled or conversation).
Everything random comes from `random.Random(seed)`: the same input and seed give the same dialogues.
Turn start/end are the first and last voiced instants of the turn (from the segment stage's VAD).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent import SAMPLE_RATE
from agent.errors import CatalogueError
from agent.train.common import (
    Report,
    StageRun,
    Summary,
    UsageError,
    atomic_write_wav,
    fingerprint,
    link_or_copy,
    progress,
    read_audio_checked,
)
from agent.train.records import (
    AGENT,
    CONVERSATION,
    ROAD_ASSEMBLED,
    ROAD_CONVERSATION,
    ROAD_MONOLOGUE,
    USER,
    UTTERANCE,
    DialogueRecord,
    SegmentRecord,
    Span,
    Turn,
    Word,
    to_dict,
)
from agent.voices import load_catalogue

ROADS = ("auto", ROAD_ASSEMBLED, ROAD_CONVERSATION, ROAD_MONOLOGUE)


@dataclass
class DialogueConfig:
    inp: Path  # segment's manifest.jsonl
    out: Path
    road: str = "auto"
    seed: int = 0
    count: int | None = None  # assembled/monologue files; None: each agent utterance about once (monologue: exactly)
    min_turns: int = 4
    max_turns: int = 10
    max_seconds: float = 120.0  # no turn starts that would end after this (moshi-finetune chunks longer files)
    gap_ms: tuple[int, int] = (150, 700)
    overlap_prob: float = 0.15
    overlap_ms: tuple[int, int] = (100, 500)
    backchannel_prob: float = 0.3  # per turn of at least 1.5 s
    backchannel_max_s: float = 1.2
    lead_in_s: tuple[float, float] = (0.2, 0.8)
    tail_s: float = 0.5
    user_first_prob: float = 0.6
    # data speaker -> catalogue voice; if set, only these are agents
    agent_voices: dict[str, str] = field(default_factory=dict)
    emotion_policy: str = "dialogue"  # "dialogue": one agent emotion per dialogue; "turn": any per turn
    turn_gap_ms: int = 800  # conversation road: a pause this long on one channel ends that side's turn
    backchannel_turn_s: float = 1.0  # conversation road: a shorter turn inside the other side's turn is a backchannel
    monologue_gap_ms: tuple[int, int] = (300, 900)  # monologue road: pause between one utterance and the next
    force: bool = False
    quiet: bool = False

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in ("road", "seed", "count", "min_turns", "max_turns", "max_seconds",
                                              "gap_ms", "overlap_prob", "overlap_ms", "backchannel_prob",
                                              "backchannel_max_s", "lead_in_s", "tail_s", "user_first_prob",
                                              "agent_voices", "emotion_policy", "turn_gap_ms", "backchannel_turn_s",
                                              "monologue_gap_ms")}


@dataclass
class Placement:
    role: str
    segment: SegmentRecord
    start: float  # where the segment file starts in the dialogue
    backchannel: bool = False
    overlap: float = 0.0

    @property
    def voiced(self) -> tuple[float, float]:
        speech = self.segment.speech or [[0.0, self.segment.duration]]
        return self.start + speech[0][0], self.start + speech[-1][1]


class Cycler:
    """Hands out a pool's items in shuffled rounds: each is used once before any repeats."""

    def __init__(self, items: list[SegmentRecord], rng: random.Random):
        self.items, self.rng, self.queue = list(items), rng, []

    def next(self) -> SegmentRecord:
        if not self.queue:
            self.queue = list(self.items)
            self.rng.shuffle(self.queue)
        return self.queue.pop()

    def peek(self) -> SegmentRecord:
        """The item next() will hand out (starting a new round if needed, exactly as next() would)."""
        if not self.queue:
            self.queue = list(self.items)
            self.rng.shuffle(self.queue)
        return self.queue[-1]

    @property
    def left_in_round(self) -> int:
        return len(self.queue)


def _other(role: str) -> str:
    return USER if role == AGENT else AGENT


def _shift_spans(spans: list[Span], offset: float) -> list[Span]:
    return [[round(a + offset, 3), round(b + offset, 3)] for a, b in spans]


# ---------------------------------------------------------------------------------------------- assembled

@dataclass
class Plan:
    id: str
    agent: str
    user: str | None  # None on the monologue road
    emotion: str | None
    placements: list[Placement]
    road: str = ROAD_ASSEMBLED


def _by_speaker(segments: list[SegmentRecord]) -> dict[str, list[SegmentRecord]]:
    by_speaker: dict[str, list[SegmentRecord]] = defaultdict(list)
    for u in sorted((s for s in segments if s.kind == UTTERANCE), key=lambda s: s.id):
        by_speaker[u.speaker].append(u)
    return by_speaker


def _agents(by_speaker: dict[str, list[SegmentRecord]], config: DialogueConfig, report: Report) -> list[str]:
    """The agent speakers (those of agent_voices if set), keeping only those with a transcribed utterance."""
    if config.agent_voices:
        agents = [s for s in sorted(config.agent_voices) if by_speaker.get(s)]
        for s in sorted(set(config.agent_voices) - set(agents)):
            report.note(s, "agent_voices", f"agent speaker {s!r} has no utterances in the input")
    else:
        agents = sorted(by_speaker)
    return [a for a in agents if any(u.transcript for u in by_speaker[a])]


def plan_assembled(segments: list[SegmentRecord], config: DialogueConfig, report: Report) -> list[Plan]:
    by_speaker = _by_speaker(segments)
    if not by_speaker:
        return []
    speakers = sorted(by_speaker)
    agents = _agents(by_speaker, config, report)
    if len(speakers) < 2:
        report.skip("assembled", str(config.inp), "assembled dialogues need at least two speakers, found "
                    f"{speakers}")
        return []
    if not agents:
        report.skip("assembled", str(config.inp), "no agent speaker has an utterance with a transcript "
                    "(agent turns are trained as text)")
        return []
    rng = random.Random(config.seed)
    cyclers: dict[tuple, Cycler] = {}

    def pick(key: tuple, pool: list[SegmentRecord]) -> SegmentRecord:
        if key not in cyclers:
            cyclers[key] = Cycler(pool, rng)
        return cyclers[key].next()

    n_agent = sum(1 for a in agents for u in by_speaker[a] if u.transcript)
    count = config.count or max(1, math.ceil(n_agent / max(1.0, (config.min_turns + config.max_turns) / 4)))
    plans = []
    for d in range(count):
        agent = agents[d % len(agents)]
        user = rng.choice([s for s in speakers if s != agent])
        agent_pool = [u for u in by_speaker[agent] if u.transcript]
        emotion = None
        if config.emotion_policy == "dialogue":
            emotions = sorted({u.emotion for u in agent_pool})
            emotion = emotions[(d // len(agents)) % len(emotions)]  # rotate so every emotion gets dialogues
            agent_pool = [u for u in agent_pool if u.emotion == emotion]
        pools = {AGENT: agent_pool, USER: by_speaker[user]}
        main = {role: [u for u in pool if u.duration > config.backchannel_max_s] or pool
                for role, pool in pools.items()}
        short = {role: [u for u in pool if u.duration <= config.backchannel_max_s] for role, pool in pools.items()}
        speaker_of = {AGENT: agent, USER: user}

        placements: list[Placement] = []
        free = {AGENT: 0.0, USER: 0.0}  # where each channel's last audio ends
        first = USER if rng.random() < config.user_first_prob else AGENT
        n_turns = rng.randint(config.min_turns, config.max_turns)
        prev: Placement | None = None
        for k in range(n_turns):
            role = first if k % 2 == 0 else _other(first)
            seg = pick((role, speaker_of[role], emotion if role == AGENT else None, "main"), main[role])
            lead = seg.speech[0][0] if seg.speech else 0.0
            overlap = 0.0
            if prev is None:
                start = rng.uniform(*config.lead_in_s)
            else:
                p_start, p_end = prev.voiced
                if rng.random() < config.overlap_prob:
                    voiced_start = p_end - min(rng.uniform(*config.overlap_ms) / 1000, 0.5 * (p_end - p_start))
                else:
                    voiced_start = p_end + rng.uniform(*config.gap_ms) / 1000
                start = max(voiced_start - lead, free[role] + 0.05)  # never on top of this channel's own audio
                overlap = max(0.0, p_end - (start + lead))
            if start + seg.duration > config.max_seconds and k >= 2:
                break
            placement = Placement(role, seg, round(start, 3), False, round(overlap, 3))
            placements.append(placement)
            free[role] = start + seg.duration
            prev = placement
            other = _other(role)
            v_start, v_end = placement.voiced
            if short[other] and v_end - v_start >= 1.5 and rng.random() < config.backchannel_prob:
                b = pick((other, speaker_of[other], emotion if other == AGENT else None, "short"), short[other])
                b_lead = b.speech[0][0] if b.speech else 0.0
                b_len = (b.speech[-1][1] if b.speech else b.duration) - b_lead
                earliest = max(v_start + 0.5, free[other] + 0.05 + b_lead)
                latest = v_end - b_len - 0.3
                if latest > earliest:
                    b_start = rng.uniform(earliest, latest) - b_lead
                    placements.append(Placement(other, b, round(b_start, 3), True, 0.0))
                    free[other] = b_start + b.duration
        plans.append(Plan(f"dlg-s{config.seed}-{d:05d}", agent, user, emotion, placements))
    return plans


def _plan_key(plan: Plan) -> dict:
    return {"id": plan.id, "road": plan.road, "agent": plan.agent, "user": plan.user, "emotion": plan.emotion,
            "placements": [[p.role, p.segment.id, fingerprint(to_dict(p.segment)), p.start, p.backchannel, p.overlap]
                           for p in plan.placements]}


def render_assembled(plan: Plan, in_dir: Path, config: DialogueConfig) -> DialogueRecord:
    """Mix the plan (assembled or monologue) into a stereo WAV; ValueError if a source segment cannot be read."""
    end = max(p.start + p.segment.duration for p in plan.placements) + config.tail_s
    stereo = np.zeros((int(math.ceil(end * SAMPLE_RATE)), 2), np.float32)
    turns = []
    for p in plan.placements:
        audio = read_audio_checked(in_dir / p.segment.path, SAMPLE_RATE, 1)[:, 0]
        a = int(round(p.start * SAMPLE_RATE))
        channel = 0 if p.role == AGENT else 1  # LEFT = the agent (moshi-finetune's layout), RIGHT = the user
        stereo[a:a + audio.size, channel] += audio
        v_start, v_end = p.voiced
        seg = p.segment
        turns.append(Turn(
            role=p.role, start=round(v_start, 3), end=round(v_end, 3), speaker=seg.speaker, emotion=seg.emotion,
            transcript=seg.transcript, source=seg.id, speech=_shift_spans(seg.speech, p.start),
            words=[w.shifted(p.start) for w in seg.words] if seg.words else None,
            backchannel=p.backchannel, overlap=p.overlap))
    turns.sort(key=lambda t: t.start)
    rel = f"audio/{plan.id}.wav"
    atomic_write_wav(Path(config.out) / rel, stereo, SAMPLE_RATE)
    agent_emotions = {t.emotion for t in turns if t.role == AGENT}
    return DialogueRecord(
        id=plan.id, path=rel, duration=round(stereo.shape[0] / SAMPLE_RATE, 4), road=plan.road,
        agent_speaker=plan.agent, agent_voice=config.agent_voices.get(plan.agent),
        emotion=agent_emotions.pop() if len(agent_emotions) == 1 else None,
        licences=sorted({p.segment.licence for p in plan.placements}),
        sources=sorted({p.segment.id for p in plan.placements}), turns=turns,
        user_speakers=[plan.user] if plan.user else [],
        seed=config.seed)


# ---------------------------------------------------------------------------------------------- monologue

def plan_monologue(segments: list[SegmentRecord], config: DialogueConfig, report: Report) -> list[Plan]:
    """One agent speaker per file, utterances back to back on the LEFT, nothing on the RIGHT."""
    by_speaker = _by_speaker(segments)
    if not by_speaker:
        return []
    agents = _agents(by_speaker, config, report)
    if not agents:
        report.skip("monologue", str(config.inp), "no agent speaker has an utterance with a transcript "
                    "(agent turns are trained as text)")
        return []
    rng = random.Random(config.seed)
    cyclers: dict[tuple, Cycler] = {}
    pools: dict[str, dict[str | None, list[SegmentRecord]]] = {}
    for agent in agents:
        transcribed = [u for u in by_speaker[agent] if u.transcript]
        if config.emotion_policy == "dialogue":
            pools[agent] = {e: [u for u in transcribed if u.emotion == e]
                            for e in sorted({u.emotion for u in transcribed})}
        else:
            pools[agent] = {None: transcribed}

    def fill(d: int, agent: str, emotion: str | None, round_only: bool) -> Plan:
        key = (agent, emotion)
        if key not in cyclers:
            cyclers[key] = Cycler(pools[agent][emotion], rng)
        cycler = cyclers[key]
        placements: list[Placement] = []
        used: set[str] = set()
        free = 0.0
        while True:
            if round_only and placements and cycler.left_in_round == 0:
                break  # every utterance of the pool is in a file: no repeats when count is unset
            seg = cycler.peek()
            if seg.id in used:
                break  # the pool is smaller than a file could hold: no utterance twice in one file
            lead = seg.speech[0][0] if seg.speech else 0.0
            if not placements:
                start = rng.uniform(*config.lead_in_s)
            else:
                voiced_start = placements[-1].voiced[1] + rng.uniform(*config.monologue_gap_ms) / 1000
                start = max(voiced_start - lead, free)  # never on top of the previous utterance's audio
                if start + seg.duration + config.tail_s > config.max_seconds:
                    break  # the file, its tail included, stays within max_seconds
            cycler.next()
            used.add(seg.id)
            placements.append(Placement(AGENT, seg, round(start, 3)))
            free = start + seg.duration
        return Plan(f"mono-s{config.seed}-{d:05d}", agent, None, emotion, placements, ROAD_MONOLOGUE)

    plans: list[Plan] = []
    if config.count is None:  # each transcribed agent utterance exactly once
        for agent in agents:
            for emotion, pool in pools[agent].items():
                taken = 0
                while taken < len(pool):
                    plans.append(fill(len(plans), agent, emotion, round_only=True))
                    taken += len(plans[-1].placements)
        return plans
    for d in range(config.count):
        agent = agents[d % len(agents)]
        emotions = list(pools[agent])
        plans.append(fill(d, agent, emotions[(d // len(agents)) % len(emotions)], round_only=False))
    return plans


# ---------------------------------------------------------------------------------------------- conversation

def _merge(regions: list[Span], gap: float) -> list[Span]:
    merged: list[Span] = []
    for a, b in regions:
        if merged and a - merged[-1][1] < gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return merged


def build_conversation(seg: SegmentRecord, in_dir: Path, config: DialogueConfig) -> DialogueRecord:
    read_audio_checked(in_dir / seg.path, SAMPLE_RATE, 2)  # stereo, 24 kHz, readable
    gap = config.turn_gap_ms / 1000
    sides = {AGENT: (seg.speech, seg.speaker), USER: (seg.user_speech or [], seg.user_speaker or "unknown")}
    spans = {role: _merge([list(r) for r in regions], gap) for role, (regions, _) in sides.items()}
    turns = []
    for role, (regions, speaker) in sides.items():
        for a, b in spans[role]:
            words: list[Word] | None = None
            if role == AGENT and seg.words:
                words = [w for w in seg.words if a - 0.05 <= w.mid <= b + 0.05] or None
            inside = [[max(x, a), min(y, b)] for x, y in regions if min(y, b) > max(x, a)]
            other = spans[_other(role)]
            backchannel = (b - a) < config.backchannel_turn_s and any(x <= a and b <= y for x, y in other)
            turns.append(Turn(role=role, start=round(a, 3), end=round(b, 3), speaker=speaker,
                              emotion=seg.emotion if role == AGENT else None,
                              transcript=" ".join(w.text for w in words) if words else None, source=seg.id,
                              speech=inside, words=words, backchannel=backchannel))
    turns.sort(key=lambda t: t.start)
    for i, turn in enumerate(turns):
        previous = [t for t in turns[:i] if t.role != turn.role and not t.backchannel]
        if previous:
            turn.overlap = round(max(0.0, previous[-1].end - turn.start), 3) if not turn.backchannel else 0.0
    dialogue_id = f"conv-{seg.parent_id}"
    rel = f"audio/{dialogue_id}.wav"
    link_or_copy(in_dir / seg.path, Path(config.out) / rel)
    return DialogueRecord(
        id=dialogue_id, path=rel, duration=seg.duration, road=ROAD_CONVERSATION, agent_speaker=seg.speaker,
        agent_voice=config.agent_voices.get(seg.speaker), emotion=seg.emotion, licences=[seg.licence],
        sources=[seg.id], turns=turns, user_speakers=[seg.user_speaker or "unknown"],
        agent_transcript=seg.transcript if not seg.words else None)


# ---------------------------------------------------------------------------------------------- stage

def _check_config(config: DialogueConfig, segments: list[SegmentRecord], report: Report) -> None:
    if config.road not in ROADS:
        raise UsageError(f"road must be one of {ROADS}, got {config.road!r}")
    if config.emotion_policy not in ("dialogue", "turn"):
        raise UsageError(f"emotion_policy must be 'dialogue' or 'turn', got {config.emotion_policy!r}")
    if not 2 <= config.min_turns <= config.max_turns:
        raise UsageError("need 2 <= min_turns <= max_turns (a dialogue has both sides)")
    try:
        low, high = (float(x) for x in config.monologue_gap_ms)
    except (TypeError, ValueError):
        low = high = -1.0
    if not 0 <= low <= high:
        raise UsageError(f"monologue_gap_ms must be [MIN, MAX] with 0 <= MIN <= MAX, got {config.monologue_gap_ms!r}")
    config.monologue_gap_ms = tuple(config.monologue_gap_ms)  # a JSON --config gives a list
    catalogue = load_catalogue()
    genders = {s.speaker: s.gender for s in segments if s.gender}
    for speaker, voice_id in config.agent_voices.items():
        try:
            voice = catalogue.voice(voice_id)
        except CatalogueError as exc:
            raise UsageError(f"agent voice for {speaker!r}: {exc}") from exc
        if genders.get(speaker) and genders[speaker] != voice.gender:
            report.note(speaker, "agent_voices", f"speaker is labelled {genders[speaker]} but trains voice "
                        f"{voice.id!r} ({voice.gender})")


def run_dialogues(config: DialogueConfig) -> Summary:
    run = StageRun("dialogues", config.out, config.force, config.quiet)
    out, report = run.out, run.report
    segments = run.read(config.inp, SegmentRecord)
    _check_config(config, segments, report)
    in_dir = Path(config.inp).parent
    conversations = [s for s in segments if s.kind == CONVERSATION]
    utterances = [s for s in segments if s.kind == UTTERANCE]
    if config.road in (ROAD_ASSEMBLED, ROAD_MONOLOGUE) and conversations:
        report.note("conversation", str(config.inp),
                    f"road {config.road!r}: {len(conversations)} two-speaker recordings ignored")
        conversations = []
    if config.road == ROAD_CONVERSATION and utterances:
        report.note("assembled", str(config.inp), f"road 'conversation': {len(utterances)} utterances ignored")
        utterances = []
    jobs: list[tuple[str, dict, object]] = []
    for seg in conversations:
        jobs.append((f"conv-{seg.parent_id}", {"segment": to_dict(seg)}, seg))
    planner = plan_monologue if config.road == ROAD_MONOLOGUE else plan_assembled
    for plan in planner(utterances, config, report):
        jobs.append((plan.id, _plan_key(plan), plan))
    for key, plan_key, job in progress(jobs, "dialogues", quiet=config.quiet):
        signature = fingerprint(plan_key, config.settings())
        if run.reuse(key, signature, DialogueRecord):
            continue
        source = job.source if isinstance(job, SegmentRecord) else f"{len(job.placements)} segments"
        try:
            record = (build_conversation(job, in_dir, config) if isinstance(job, SegmentRecord)
                      else render_assembled(job, in_dir, config))
        except ValueError as exc:
            report.skip(key, source, f"source segment: {exc}")
            continue
        if not any(t.role == AGENT for t in record.turns):
            report.skip(key, source, "no agent speech in the dialogue")
            continue
        run.keep(key, signature, record, [out / record.path])
    return run.finish()
