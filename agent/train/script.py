"""Stage `script`: synthetic Telugu dialogue scripts -> script/manifest.jsonl (ScriptRecord), for `synth`.

Three sources, one output:
- `sentences`: a Telugu sentence list (one per line). Templates from assets/dialogue/scenes.json (a persona's
  greeting, a topic) open the dialogue; turns take one or two sentences drawn without repeats inside a
  dialogue; events (backchannels, interruptions, overlaps, long pauses) are drawn with the configured
  probabilities.
- `llm`: an instruction model (transformers, imported lazily; a Hub id or a local folder) writes the turns
  from a persona and a topic ("A: ..." / "U: ..." lines); events are then drawn as above. A reply without
  two speakers' lines is skipped with its reason.
- `source_jsonl` (`--from`): scripts a person wrote, one ScriptRecord-shaped JSON object per line; their
  events are kept as written.

Every dialogue names the agent's voice (the catalogue's 4, round-robin over a seeded shuffle of all
voice x emotion pairs, so `count` >= 20 covers every pair) and its persona; agent turns carry a catalogue
emotion (one per dialogue, or per turn with emotion_policy "turn"). Every script is validated (speakers,
text neither empty nor longer than `max_chars`, known voice/emotion, a backchannel short and inside the
other side's turn, an interruption or overlap only after the other side spoke); a bad one is skipped with
its reason. Dialogue i depends only on (source, settings, seed, i): reruns reuse finished items, and any
`workers` count gives the same output. Text without a licence is refused (--licence, or FILE.licence).
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any

from agent import ASSETS
from agent.train.common import StageRun, Summary, UsageError, fingerprint, parallel_map, progress, torch_threads
from agent.train.records import (
    AGENT,
    BACKCHANNEL,
    TURN,
    USER,
    RecordError,
    ScriptRecord,
    ScriptTurn,
    clean_text,
    from_dict,
    to_dict,
)
from agent.voices import Catalogue, load_catalogue

SCENES_PATH = ASSETS / "dialogue" / "scenes.json"
BACKCHANNEL_MAX_WORDS = 3


@dataclass
class ScriptConfig:
    out: Path
    sentences: Path | None = None  # a Telugu sentence list
    llm: str | None = None  # an instruction model: Hub id or local folder
    source_jsonl: Path | None = None  # --from: scripts a person wrote
    count: int | None = None  # dialogues (default 100; --from: every line)
    seed: int = 0
    licence: str | None = None  # of the text; default: FILE.licence next to --sentences/--from
    min_turns: int = 4  # main turns (backchannels not counted)
    max_turns: int = 10
    sentences_per_turn: int = 2  # at most
    max_chars: int = 400  # per turn: Indic Parler-TTS degrades past ~600 characters
    backchannel_prob: float = 0.35  # after a main turn of >= 4 words, the listener acknowledges
    interrupt_prob: float = 0.12
    overlap_prob: float = 0.12
    pause_prob: float = 0.08
    pause_ms: tuple[int, int] = (1200, 3000)
    emotion_policy: str = "dialogue"  # "dialogue": one agent emotion per dialogue; "turn": mixed
    llm_max_new_tokens: int = 400
    llm_device: str | None = None
    workers: int = 1
    ray: str | None = None  # local | auto | a Ray address (with --llm, actors each holding the model)
    num_gpus: float = 0  # per Ray actor holding the LLM
    force: bool = False
    quiet: bool = False

    def settings(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                if k not in ("out", "workers", "ray", "num_gpus", "force", "quiet", "sentences", "source_jsonl",
                             "llm_device")}


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def has_letters(text: str) -> bool:
    return any(unicodedata.category(c)[0] in "LM" for c in text)


def validate(script: ScriptRecord, catalogue: Catalogue, max_chars: int) -> ScriptRecord:
    """The script with its text cleaned (NFC, whitespace), or RecordError saying what is wrong."""
    voices, emotions = {v.id for v in catalogue.voices}, {e.id for e in catalogue.emotions}
    if script.voice not in voices:
        raise RecordError(f"unknown voice {script.voice!r} (catalogue: {sorted(voices)})")
    if not isinstance(script.persona, str) or not script.persona.strip():
        raise RecordError("no persona text")
    if not clean_text(script.licence):
        raise RecordError("no licence")
    turns: list[ScriptTurn] = []
    for n, turn in enumerate(script.turns, 1):
        where = f"turn {n}"  # said after the problem, so the report groups skips by problem
        if turn.speaker not in (AGENT, USER):
            raise RecordError(f"speaker must be 'agent' or 'user', got {turn.speaker!r} ({where})")
        if turn.kind not in (TURN, BACKCHANNEL):
            raise RecordError(f"kind must be 'turn' or 'backchannel', got {turn.kind!r} ({where})")
        text = clean_text(turn.text) if isinstance(turn.text, str) else None
        if not text or not has_letters(text):
            raise RecordError(f"empty text ({where})")
        if len(text) > max_chars:
            raise RecordError(f"text too long ({where}: {len(text)} characters, at most {max_chars})")
        if turn.speaker == AGENT and turn.emotion not in emotions:
            raise RecordError(f"unknown emotion {turn.emotion!r} ({where}; catalogue: {sorted(emotions)})")
        if turn.speaker == USER and turn.emotion is not None:
            raise RecordError(f"a user turn carries no emotion label ({where})")
        mains = [t for t in turns if t.kind == TURN]
        if turn.kind == BACKCHANNEL:
            if len(text.split()) > BACKCHANNEL_MAX_WORDS:
                raise RecordError(f"a backchannel has at most {BACKCHANNEL_MAX_WORDS} words ({where})")
            if not mains or mains[-1].speaker == turn.speaker:
                raise RecordError(f"a backchannel must follow the other side's turn ({where})")
        if turn.interrupts or turn.overlap:
            if turn.interrupts and turn.overlap:
                raise RecordError(f"either interrupts or overlap, not both ({where})")
            if turn.kind != TURN or not mains or mains[-1].speaker == turn.speaker:
                raise RecordError(f"only a turn that follows the other side's turn can cut in ({where})")
        if turn.pause_ms is not None and not (isinstance(turn.pause_ms, int) and 0 <= turn.pause_ms <= 10_000):
            raise RecordError(f"pause_ms must be an integer in 0..10000 ({where})")
        turns.append(ScriptTurn(turn.speaker, text, turn.emotion, turn.kind, bool(turn.interrupts),
                                bool(turn.overlap), turn.pause_ms))
    mains = [t for t in turns if t.kind == TURN]
    if len(mains) < 2 or {t.speaker for t in mains} != {AGENT, USER}:
        raise RecordError("needs at least two turns, by both the agent and the user")
    prompt = clean_text(script.prompt_text)
    return ScriptRecord(script.id, script.voice, script.persona.strip(), turns, clean_text(script.licence),
                        script.source, script.topic, prompt, script.seed)


# ---------------------------------------------------------------------------------------------
# Drawing dialogues
# ---------------------------------------------------------------------------------------------

def load_scenes(path: Path = SCENES_PATH) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_sentences(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"--sentences {path} does not exist")
    lines = [clean_text(line) for line in path.read_text(encoding="utf-8").splitlines()]
    sentences = list(dict.fromkeys(s for s in lines if s and has_letters(s)))
    if len(sentences) < 4:
        raise UsageError(f"--sentences {path} has {len(sentences)} usable sentences; at least 4 are needed")
    return sentences


def pairings(catalogue: Catalogue, seed: int) -> list[tuple[str, str]]:
    """Every (voice, emotion) pair once, in a seeded order: dialogue i takes pair i mod 20."""
    pairs = list(product([v.id for v in catalogue.voices], [e.id for e in catalogue.emotions]))
    random.Random(f"pairs/{seed}").shuffle(pairs)
    return pairs


@dataclass
class Frame:
    """What dialogue i is about before its turns are written."""

    index: int
    id: str
    voice: str
    emotion: str
    persona: str
    greeting: str
    topic: str
    topic_te: str


def frame(i: int, config: ScriptConfig, catalogue: Catalogue, scenes: dict, prefix: str) -> Frame:
    rng = random.Random(f"frame/{config.seed}/{i}")
    voice_id, emotion = pairings(catalogue, config.seed)[i % (len(catalogue.voices) * len(catalogue.emotions))]
    voice = catalogue.voice(voice_id)
    persona, topic = rng.choice(scenes["personas"]), rng.choice(scenes["topics"])
    return Frame(i, f"{prefix}-{config.seed}-{i:06d}", voice_id, emotion,
                 persona["persona"].format(name=voice.name_en) + f" Today's topic: {topic['topic']}.",
                 persona["greeting"].format(name_te=voice.name_te), topic["topic"], topic["topic_te"])


def _emotion(rng: random.Random, frame_: Frame, emotions: list[str], policy: str) -> str:
    if policy == "turn" and rng.random() < 0.5:
        return rng.choice(emotions)
    return frame_.emotion


def add_events(lines: list[tuple[str, str]], frame_: Frame, config: ScriptConfig, emotions: list[str],
               backchannels: list[str], rng: random.Random) -> list[ScriptTurn]:
    """(speaker, text) main turns -> ScriptTurns with emotions, and events drawn with the config's odds."""
    turns: list[ScriptTurn] = []
    for n, (speaker, text) in enumerate(lines):
        emotion = _emotion(rng, frame_, emotions, config.emotion_policy) if speaker == AGENT else None
        turn = ScriptTurn(speaker, text, emotion)
        if n > 0 and lines[n - 1][0] != speaker:
            roll = rng.random()
            if roll < config.interrupt_prob and len(lines[n - 1][1].split()) >= 4:
                turn.interrupts = True
            elif roll < config.interrupt_prob + config.overlap_prob:
                turn.overlap = True
            elif roll < config.interrupt_prob + config.overlap_prob + config.pause_prob:
                turn.pause_ms = rng.randint(*config.pause_ms)
        turns.append(turn)
        if len(text.split()) >= 4 and rng.random() < config.backchannel_prob:
            listener = USER if speaker == AGENT else AGENT
            turns.append(ScriptTurn(listener, rng.choice(backchannels),
                                    frame_.emotion if listener == AGENT else None, BACKCHANNEL))
    return turns


def sentence_script(i: int, config: ScriptConfig, catalogue: Catalogue, scenes: dict,
                    sentences: list[str], licence: str) -> ScriptRecord:
    frame_ = frame(i, config, catalogue, scenes, "sent")
    rng = random.Random(f"turns/{config.seed}/{i}")
    n_turns = rng.randint(config.min_turns, config.max_turns)
    pool = rng.sample(sentences, len(sentences))
    speaker = rng.choice([AGENT, USER])
    lines: list[tuple[str, str]] = []
    for n in range(n_turns):
        k = rng.randint(1, config.sentences_per_turn)
        text = " ".join(pool.pop() for _ in range(min(k, len(pool) - 1))) if len(pool) > 1 else rng.choice(sentences)
        if n == 0 and speaker == AGENT:
            text = frame_.greeting  # the agent opens in its persona
        lines.append((speaker, text))
        speaker = USER if speaker == AGENT else AGENT
    prompt = pool.pop() if pool else rng.choice(sentences)
    turns = add_events(lines, frame_, config, [e.id for e in catalogue.emotions], scenes["backchannels"], rng)
    return ScriptRecord(frame_.id, frame_.voice, frame_.persona, turns, licence, f"sentences:{config.sentences}",
                        frame_.topic, prompt, config.seed)


LINE = re.compile(r"^\s*[*\-]*\s*(A|U|Agent|User|AGENT|USER|ఏజెంట్|వినియోగదారు)\s*[:：]\s*(.+?)\s*$")


def parse_llm_dialogue(reply: str) -> list[tuple[str, str]]:
    """'A: ...' / 'U: ...' lines (or Agent:/User:) of a model's reply -> (speaker, text); others ignored."""
    lines = []
    for raw in reply.splitlines():
        match = LINE.match(raw)
        if match and has_letters(match.group(2)):
            who = AGENT if match.group(1) in ("A", "Agent", "AGENT", "ఏజెంట్") else USER
            lines.append((who, match.group(2)))
    return lines


class LLMWriter:
    """An instruction model writing dialogue turns (transformers, loaded on first use)."""

    def __init__(self, model_id: str, device: str | None, max_new_tokens: int):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise UsageError("--llm needs the `transformers` package (pip install transformers)") from exc
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id)
            self.model = AutoModelForCausalLM.from_pretrained(model_id)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load --llm {model_id}: {exc}") from exc
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.torch, self.max_new_tokens, self.model_id = torch, max_new_tokens, model_id
        self.version = f"transformers {__import__('transformers').__version__}"

    @staticmethod
    def prompt(frame_: Frame, n_turns: int) -> list[dict]:
        return [{"role": "system", "content": frame_.persona},
                {"role": "user", "content": (
                    f"Write a natural Telugu phone conversation about {frame_.topic} ({frame_.topic_te}) between "
                    f"you (the agent, lines starting 'A:') and a caller (lines starting 'U:'), {n_turns} lines "
                    f"in all, one short line per turn, in Telugu script only, nothing else.")}]

    def write(self, frame_: Frame, n_turns: int, seed: str) -> str:
        messages = self.prompt(frame_, n_turns)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        inputs = self.tokenizer(text, return_tensors="pt", return_token_type_ids=False).to(self.device)
        self.torch.manual_seed(int(fingerprint(seed)[:8], 16))
        with self.torch.no_grad(), torch_threads(1):  # the sampled words must not follow the process's threads
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=True, top_p=0.9,
                                      temperature=0.8, pad_token_id=self.tokenizer.pad_token_id
                                      or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def llm_script(i: int, config: ScriptConfig, catalogue: Catalogue, scenes: dict, writer: LLMWriter,
               licence: str) -> ScriptRecord:
    frame_ = frame(i, config, catalogue, scenes, "llm")
    rng = random.Random(f"turns/{config.seed}/{i}")
    n_turns = rng.randint(config.min_turns, config.max_turns)
    reply = writer.write(frame_, n_turns, f"llm/{config.seed}/{i}")
    lines = parse_llm_dialogue(reply)
    if len(lines) < 2:
        raise RecordError(f"the model's reply has no 'A:'/'U:' dialogue lines ({len(reply)} characters: "
                          f"{reply[:80]!r})")
    prompt = rng.choice(lines)[1]  # the voice prompt reads one of the model's lines in another context
    turns = add_events(lines, frame_, config, [e.id for e in catalogue.emotions], scenes["backchannels"], rng)
    return ScriptRecord(frame_.id, frame_.voice, frame_.persona, turns, licence, f"llm:{config.llm}", frame_.topic,
                        prompt, config.seed)


def jsonl_scripts(config: ScriptConfig, licence: str | None) -> list[tuple[str, Any]]:
    """(key, line-or-error) per non-blank line of --from."""
    path = Path(config.source_jsonl)
    if not path.is_file():
        raise UsageError(f"--from {path} does not exist")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            items.append((f"line-{number:06d}", (number, line)))
    return items[:config.count] if config.count else items


def parse_jsonl_line(number: int, line: str, config: ScriptConfig, licence: str | None) -> ScriptRecord:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordError("not a JSON object")
    data.setdefault("id", f"jsonl-{number:06d}")
    data.setdefault("licence", licence)
    data.setdefault("source", f"jsonl:{config.source_jsonl}:{number}")
    data.setdefault("persona", "")
    if not isinstance(data["id"], str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", data["id"]):
        raise RecordError(f"id {data['id']!r} must be 1-80 letters, digits, '_', '-' or '.'")
    return from_dict(ScriptRecord, data)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def _licence(config: ScriptConfig, path: Path | None) -> str | None:
    if config.licence:
        return config.licence
    for suffix in (".licence", ".license", ".LICENSE"):
        side = Path(f"{path}{suffix}") if path else None
        if side is not None and side.is_file():
            return clean_text(side.read_text(encoding="utf-8"))
    return None


_WRITERS: dict[tuple, LLMWriter] = {}


def _writer(config: ScriptConfig) -> LLMWriter:
    """One instruction model per process, loaded when the first dialogue needs it."""
    key = (config.llm, config.llm_device, config.llm_max_new_tokens)
    if key not in _WRITERS:
        _WRITERS[key] = LLMWriter(*key)
    return _WRITERS[key]


def _make(job: tuple) -> tuple[str, Any]:
    """Worker: dialogue i from the sentences (or, with none, the LLM) -> ("ok", record dict), ("skip", reason)
    or ("fatal", why the run cannot go on)."""
    i, config, sentences, licence = job
    catalogue, scenes = load_catalogue(), load_scenes()
    try:
        script = (sentence_script(i, config, catalogue, scenes, sentences, licence) if sentences is not None
                  else llm_script(i, config, catalogue, scenes, _writer(config), licence))
        return "ok", to_dict(validate(script, catalogue, config.max_chars))
    except RecordError as exc:
        return "skip", str(exc)
    except UsageError as exc:
        return "fatal", str(exc)


def run_script(config: ScriptConfig) -> Summary:
    sources = [x for x in (config.sentences, config.llm, config.source_jsonl) if x]
    if len(sources) != 1:
        raise UsageError("give exactly one of --sentences FILE, --llm HF_ID or --from JSONL")
    if not 1 <= config.min_turns <= config.max_turns:
        raise UsageError("--turns MIN:MAX needs 1 <= MIN <= MAX")
    if config.emotion_policy not in ("dialogue", "turn"):
        raise UsageError("--emotion-policy is 'dialogue' or 'turn'")
    catalogue = load_catalogue()
    run = StageRun("script", config.out, config.force, config.quiet)
    settings = config.settings()
    if config.source_jsonl:
        licence = _licence(config, Path(config.source_jsonl))
        for key, (number, line) in progress(jsonl_scripts(config, licence), "script", quiet=config.quiet):
            signature = fingerprint(line, licence, settings)
            if run.reuse(key, signature, ScriptRecord):
                continue
            try:
                script = validate(parse_jsonl_line(number, line, config, licence), catalogue, config.max_chars)
            except RecordError as exc:
                run.report.skip(key, f"{config.source_jsonl}:{number}", str(exc))
                continue
            run.keep(key, signature, script, [])
        return run.finish()

    path = Path(config.sentences) if config.sentences else None
    licence = _licence(config, path)
    if not licence:
        raise UsageError("the text has no licence: pass --licence (e.g. 'CC-BY-4.0') or put it in "
                         f"{path or 'FILE'}.licence; sources without a licence are refused")
    count = 100 if config.count is None else config.count
    sentences = read_sentences(path) if config.sentences else None
    source_key = fingerprint(sentences) if sentences else config.llm
    jobs = [(f"dialogue-{i:06d}", fingerprint(source_key, licence, settings, i), i) for i in range(count)]
    todo = [(key, sig, i) for key, sig, i in jobs if not run.reuse(key, sig, ScriptRecord)]
    made = parallel_map(_make, [(i, config, sentences, licence) for _, _, i in todo], config.workers, ray=config.ray,
                        actors=sentences is None, num_gpus=config.num_gpus)
    source = str(path) if sentences else f"llm:{config.llm}"
    for (key, sig, _), (status, value) in progress(zip(todo, made), "script", total=len(todo), quiet=config.quiet):
        if status == "fatal":
            raise UsageError(value)
        if status == "skip":
            run.report.skip(key, source, value)
        else:
            run.keep(key, sig, from_dict(ScriptRecord, value), [])
    run.records.sort(key=lambda r: r.id)
    return run.finish()
