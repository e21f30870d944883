"""Stage 6, tokens: encode every aligned dialogue once with Mimi and lay its words on the 12.5 Hz
text stream -> tokens/codes/<id>.safetensors + tokens/manifest.jsonl (TokenRecord) + tokens/tokens.json.

Training then reads small integer tensors instead of decoding and encoding audio every epoch. Each
shard holds "audio" int16 [2K, T] (the agent's K codebooks from the LEFT channel, then the user's K
from the RIGHT, the order `LMModel.forward` expects after the text row) and "text" int32 [T].

The text stream follows moshi-finetune's Interleaver (keep_main_only=True), so a model trained here
sees what a model trained there sees: only SPEAKER_MAIN words count; a word's tokens start at the
frame holding its start time and follow one per frame; a word arriving while the previous one is still
being written replaces the remainder; frames without a token are text padding (3), and the padding
frame just before a word becomes end-of-padding (0). Shards depend on the tokenizer (stage 5, or the
base model's own) and on the codec of `model`; tokens.json records both and the trainer checks them.
A dialogue with a PersonaPlex-style prompt (synth's persona and voice clip) keeps it: the persona in its
record, the clip copied to tokens/prompts/<id>.wav, for prompted training (`train --prompts`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from safetensors.torch import save_file

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.config import TINY_MODEL, TINY_PERSONAPLEX_MODEL, ModelConfig
from agent.errors import ModelLoadError
from agent.models import TEXT_PADDING_ID, load_mimi, resolve_device, tiny_tokenizer_path
from agent.train.align import MAIN_SPEAKER
from agent.train.common import (
    ItemReport,
    StageRun,
    Summary,
    UsageError,
    atomic_write_json,
    fingerprint,
    parallel_map,
    progress,
    read_audio_checked,
    torch_threads,
)
from agent.train.records import AlignedRecord, TokenRecord, from_dict, to_dict
from agent.voices import EMOTION, SPEAKER, load_catalogue

FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 Hz
TEXT_PADDING, END_OF_PADDING = TEXT_PADDING_ID, 0  # Moshi's text_padding_token_id and end_of_text_padding_id
INFO = "tokens.json"


@dataclass
class TokensConfig:
    inp: Path  # align's manifest.jsonl
    out: Path
    model: str = "tiny"  # whose Mimi encodes: a repo id, a Kyutai folder, or "tiny"
    tokenizer: Path | None = None  # stage 5's tokenizer.model; None: the base model's own
    device: str | None = None
    seed: int = ModelConfig.seed  # the tiny model's weights come from it
    workers: int = 1  # processes, each holding its own Mimi
    # torch threads per encode: the codes follow it (a float sum split over threads rounds differently and
    # can flip a code), so it is fixed, the same in every process, and part of the settings; scale with
    # --workers or --ray instead
    threads: int = 1
    ray: str | None = None  # local | auto | a Ray address: encode on a Ray cluster's actors
    num_gpus: float = 0  # per Ray actor (1 puts one Mimi on each GPU)
    force: bool = False
    quiet: bool = False


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def text_stream(words: list[tuple[list[int], float]], frames: int) -> list[int]:
    """moshi-finetune's Interleaver.build_token_stream for (tokens, start seconds) words, sorted by start."""
    stream = [TEXT_PADDING] * frames
    pending: deque[int] = deque()
    i = 0
    for t in range(frames):
        while i < len(words) and words[i][1] * FRAME_RATE < t + 1:
            pending = deque(words[i][0])  # a new word cuts what is left of the previous one
            i += 1
        if pending:
            if t > 0 and stream[t - 1] == TEXT_PADDING:
                stream[t - 1] = END_OF_PADDING
            stream[t] = pending.popleft()
    return stream


@functools.cache
def known_conditions() -> dict[str, frozenset[str]]:
    """The catalogue's voice and emotion ids, read once per process (not once per item)."""
    catalogue = load_catalogue()
    return {SPEAKER: frozenset(v.id for v in catalogue.voices), EMOTION: frozenset(e.id for e in catalogue.emotions)}


def _conditions(record: AlignedRecord, known: dict[str, frozenset[str]], report: ItemReport) -> dict[str, str | None]:
    """The agent's speaker/emotion as conditioner values; anything the catalogue lacks trains unconditioned."""
    given = dict(record.text_conditions or {})
    wanted = {SPEAKER: given.get(SPEAKER, record.agent_voice), EMOTION: given.get(EMOTION, record.emotion)}
    out: dict[str, str | None] = {}
    for name, value in wanted.items():
        if value is not None and value not in known[name]:
            report.note(record.id, record.path, f"{name} {value!r} is not in the catalogue: trained without one "
                                                f"(map data speakers to voices with dialogues --agent-voice)")
            value = None
        out[name] = value
    return out


def _copy_voice_prompt(record: AlignedRecord, in_dir: Path, out: Path, report: ItemReport) -> Path | None:
    """The dialogue's voice-prompt clip copied to prompts/<id>.wav, so the tokens folder is all a prompted
    training run (train --prompts) reads; the trainer encodes it once per run with the serving code."""
    if not record.voice_prompt:
        return None
    source = in_dir / record.voice_prompt
    if not source.is_file():
        report.note(record.id, record.path, f"voice prompt {record.voice_prompt} is missing: trained without one")
        return None
    target = out / "prompts" / f"{record.id}{source.suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


def encode_record(record: AlignedRecord, in_dir: Path, mimi, tokenizer: sentencepiece.SentencePieceProcessor,
                  device: torch.device) -> tuple[torch.Tensor, list[int], int, int]:
    """(audio codes [2K, T], text stream [T], words placed, text tokens placed); ValueError for bad data."""
    audio = read_audio_checked(in_dir / record.path, SAMPLE_RATE, 2)
    try:
        alignments = json.loads((in_dir / record.alignment).read_text(encoding="utf-8"))["alignments"]
        words = sorted(((str(w), float(span[0])) for w, span, who in alignments if who == MAIN_SPEAKER
                        and float(span[1]) > float(span[0])), key=lambda x: x[1])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable alignment {record.alignment}: {exc}") from exc
    frames = math.ceil(audio.shape[0] / FRAME_SIZE)
    padded = np.zeros((2, frames * FRAME_SIZE), np.float32)
    padded[:, :audio.shape[0]] = audio.T  # LEFT (agent) and RIGHT (user) as a batch of two
    with torch.no_grad():
        codes = mimi.encode(torch.from_numpy(padded)[:, None].to(device))  # [2, K, T]
    codes = codes[..., :frames].reshape(-1, frames).to(torch.int16).cpu()
    tokenized = [(tokenizer.encode(w), start) for w, start in words]
    stream = text_stream([(t, s) for t, s in tokenized if t], frames)
    placed = sum(1 for x in stream if x not in (TEXT_PADDING, END_OF_PADDING))
    return codes, stream, len(words), placed


_CODECS: dict[tuple, tuple] = {}


def codec_for(config: TokensConfig) -> tuple:
    """(Mimi, tokenizer, device), loaded once per process (this one, a worker, or a Ray actor)."""
    key = (config.model, config.device, config.seed, str(config.tokenizer))
    if key not in _CODECS:
        device = resolve_device(config.device)
        try:
            with torch_threads(config.threads):  # the tiny Mimi fits its codebooks by k-means as it loads
                mimi, _ = load_mimi(config.model, device, config.seed)
        except ModelLoadError as exc:
            raise UsageError(str(exc)) from exc
        _CODECS[key] = mimi, sentencepiece.SentencePieceProcessor(str(config.tokenizer)), device
    return _CODECS[key]


def encode_item(job: tuple[dict, TokensConfig]) -> tuple[str, object]:
    """One dialogue -> ("ok", {"record", "files", "notes"}) with its shard (and voice prompt) written, or
    ("skip", reason). Runs wherever parallel_map puts it; the config's tokenizer is resolved already."""
    record_dict, config = job
    record = from_dict(AlignedRecord, record_dict)
    mimi, tokenizer, device = codec_for(config)
    in_dir, out, notes = Path(config.inp).parent, Path(config.out), ItemReport()
    try:
        with torch_threads(config.threads):
            codes, stream, n_words, n_tokens = encode_record(record, in_dir, mimi, tokenizer, device)
    except ValueError as exc:
        return "skip", str(exc)
    if n_tokens == 0:
        return "skip", "no text tokens: every agent word encoded to nothing"
    shard = out / "codes" / f"{record.id}.safetensors"
    shard.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard.with_name(f".{shard.name}.tmp")
    save_file({"audio": codes.contiguous(), "text": torch.tensor(stream, dtype=torch.int32)}, str(tmp))
    tmp.replace(shard)
    voice_prompt = _copy_voice_prompt(record, in_dir, out, notes)
    result = TokenRecord(
        id=record.id, path=f"codes/{record.id}.safetensors", frames=codes.shape[-1], duration=record.duration,
        agent_speaker=record.agent_speaker, agent_voice=record.agent_voice, emotion=record.emotion,
        licences=record.licences, n_words=n_words, n_text_tokens=n_tokens,
        conditions=_conditions(record, known_conditions(), notes), persona=record.persona,
        voice_prompt=str(voice_prompt.relative_to(out)) if voice_prompt else None)
    files = [result.path, *([result.voice_prompt] if result.voice_prompt else [])]
    return "ok", {"record": to_dict(result), "files": files, "notes": list(notes)}


def run_tokens(config: TokensConfig) -> Summary:
    run = StageRun("tokens", config.out, config.force, config.quiet)
    out, report = run.out, run.report
    aligned = run.read(config.inp, AlignedRecord)
    tokenizer_path = Path(config.tokenizer) if config.tokenizer else None
    if tokenizer_path is None:
        if config.model not in (TINY_MODEL, TINY_PERSONAPLEX_MODEL):
            raise UsageError("--tokenizer is required unless --model is tiny (stage 5 writes tokenizer.model; "
                             "for Kyutai's own English tokenizer pass its tokenizer_spm_32k_3.model)")
        tokenizer_path = tiny_tokenizer_path()
    if not tokenizer_path.is_file():
        raise UsageError(f"tokenizer {tokenizer_path} does not exist (run the tokenizer stage first)")
    config = replace(config, tokenizer=tokenizer_path)
    mimi, tokenizer, _ = codec_for(config)  # here too: the settings name its codebooks and vocabulary
    info = {"model": config.model, "seed": config.seed if config.model == "tiny" else None,
            "tokenizer": str(tokenizer_path.resolve()), "tokenizer_sha": file_digest(tokenizer_path),
            "text_vocab": tokenizer.vocab_size(), "num_codebooks": int(mimi.num_codebooks),
            "frame_rate": FRAME_RATE, "text_padding": TEXT_PADDING, "end_of_padding": END_OF_PADDING,
            "threads": config.threads}
    settings = {k: v for k, v in info.items() if k != "tokenizer"}
    jobs = []
    for record in aligned:
        signature = fingerprint(to_dict(record), settings)
        if not run.reuse(record.id, signature, TokenRecord):
            jobs.append((record, signature))
    results = parallel_map(encode_item, [(to_dict(r), config) for r, _ in jobs], config.workers, ray=config.ray,
                           actors=True, num_gpus=config.num_gpus)
    for (record, signature), (status, value) in progress(zip(jobs, results), "tokens", total=len(jobs),
                                                          quiet=config.quiet):
        if status == "skip":
            report.skip(record.id, record.path, str(value))
            continue
        run.start_item()
        ItemReport(value["notes"]).replay(report)
        run.keep(record.id, signature, from_dict(TokenRecord, value["record"]), [out / f for f in value["files"]])
    order = {r.id: n for n, r in enumerate(aligned)}
    run.records.sort(key=lambda r: order[r.id])  # the input's order, however many were reused
    atomic_write_json(out / INFO, info)
    return run.finish()
