"""`python -m agent.train <stage> ...`: the pipeline's command line (see agent/train/__init__.py).

Every option can also come from `--config FILE.json` (keys = the stage config's field names, e.g.
{"road": "assembled", "gap_ms": [150, 700]}); flags given on the command line win. A road or a corpus
recipe is thus a small JSON file, not a code change.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from agent.train.common import UsageError


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from exc
    if a > b:
        raise argparse.ArgumentTypeError(f"MIN must not exceed MAX in {text!r}")
    return a, b


def _mapping(items: list[str] | None, what: str) -> dict[str, str] | None:
    if items is None:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _flag(parser: argparse.ArgumentParser, *names: str, defaults: tuple[str, ...] | None = None,
          **kwargs: Any) -> None:
    """A stage flag; its help ends with the config dataclass's default for field `dest` (or the
    `defaults` fields, joined MIN:MAX). Default None here: "not given" must be distinguishable so
    --config values survive."""
    if kwargs.get("action") == "store_true":
        kwargs.update(action="store_const", const=True)
    kwargs.setdefault("help", DEFAULT_ONLY)
    action = parser.add_argument(*names, default=None, **kwargs)
    action.config_fields = defaults or (action.dest,)  # type: ignore[attr-defined]


DEFAULT_ONLY = "default"  # the help of a flag that needs no words beyond its default


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ":".join(_shown(v) for v in value)
    return str(value)


class _StageHelp(argparse.HelpFormatter):
    """Help that reads each flag's default from the stage's config dataclass when it is shown, so listing
    the stages (`python -m agent.train --help`) imports no stage module."""

    config = ""  # "module:Class" of the stage's settings

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = "" if action.help == DEFAULT_ONLY else action.help or ""
        names = getattr(action, "config_fields", None)
        if not self.config or not names or action.nargs == 0:
            return text  # a switch is off unless given
        module, _, name = self.config.partition(":")
        known = {f.name: f for f in fields(getattr(importlib.import_module(module), name))}
        if not all(n in known and known[n].default is not MISSING for n in names):
            return text
        values = [known[n].default for n in names]
        if any(v is None for v in values) and text:
            return text  # the flag's own help says what "not given" means
        shown = _shown(values[0] if len(values) == 1 else tuple(values)).replace("%", "%%")
        return f"{text} (default {shown})" if text else f"default {shown}"


def _stage(stages: argparse._SubParsersAction, name: str, config: str, help: str) -> argparse.ArgumentParser:
    """A stage's parser whose flag help shows the defaults of `config` ("module:Class")."""
    formatter = type("StageHelp", (_StageHelp,), {"config": config})
    return stages.add_parser(name, help=help, formatter_class=formatter)


def _common(parser: argparse.ArgumentParser, needs_input: bool = True) -> None:
    if needs_input:
        _flag(parser, "--in", dest="inp", type=Path, metavar="MANIFEST", help="the previous stage's manifest.jsonl")
    _flag(parser, "--out", type=Path, metavar="FOLDER", help="output folder of this stage")
    _flag(parser, "--config", type=Path, help="JSON file of this stage's settings (flags override it)")
    _flag(parser, "--force", action="store_true", help="redo every item even if an earlier run finished it")
    _flag(parser, "--quiet", action="store_true", help="no progress bar, no per-item lines on stderr")


def _ray_flag(parser: argparse.ArgumentParser, gpus: bool = True) -> None:
    _flag(parser, "--ray", metavar="local|auto|ADDRESS",
          help="run the items on a Ray cluster: local starts one here, auto or HOST:PORT joins one (needs .[scale])")
    if gpus:
        _flag(parser, "--num-gpus", type=float, help="GPUs per Ray worker holding a model (default 0; 1: one per GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent.train", description=(
        "Telugu fine-tuning pipeline for Moshi: ingest, segment, dialogues, align, tokenizer, tokens, train, "
        "export; script and synth make synthetic dialogues (synth's folder goes straight to tokens). Each stage "
        "reads the previous one's output folder and resumes where it stopped."))
    stages = parser.add_subparsers(dest="stage", required=True)

    p = _stage(stages, "ingest", "agent.train.ingest:IngestConfig",
               help="audio folders/manifests/datasets -> 24 kHz normalised WAVs + manifest")
    _common(p, needs_input=False)
    _flag(p, "--manifest", dest="manifests", action="append", type=Path,
          help="JSONL/CSV/TSV rows: path, speaker, emotion, transcript, licence [, words, segments, agent_channel, "
               "user_speaker, user_transcript, gender, id] (repeatable)")
    _flag(p, "--folder", dest="folders", action="append", type=Path,
          help="a folder of audio files, x.txt next to x.wav as its transcript (repeatable)")
    _flag(p, "--hf-dataset", dest="hf_datasets", action="append", type=Path,
          help="a Hugging Face dataset saved with save_to_disk (needs the `datasets` package) (repeatable)")
    _flag(p, "--hf-column", dest="hf_columns", action="append", metavar="LABEL=COLUMN",
          help="which dataset column holds a label, e.g. transcript=raw_transcription (repeatable)")
    _flag(p, "--url", dest="urls", action="append", help="media URL to download with yt-dlp (repeatable)")
    _flag(p, "--i-have-the-rights", dest="i_have_the_rights", action="store_true",
          help="required with --url: you confirm you hold the rights to train on the downloaded media")
    _flag(p, "--speaker", help="speaker for sources without a speaker column")
    _flag(p, "--emotion", help="emotion (catalogue id) for sources without an emotion column")
    _flag(p, "--licence", "--license", dest="licence", help="licence for sources without a licence column")
    _flag(p, "--target-dbfs", type=float, help="RMS of the voiced part after normalisation")
    _flag(p, "--peak-dbfs", type=float, help="peak ceiling after normalisation")
    _flag(p, "--min-duration", type=float, help="seconds")
    _flag(p, "--max-duration", type=float, help="seconds")
    _flag(p, "--min-source-rate", type=int, help="lowest accepted source sample rate in Hz")
    _flag(p, "--silence-dbfs", type=float, help="a file whose loudest 20 ms is below this is silent")

    p = _stage(stages, "segment", "agent.train.segment:SegmentConfig",
               help="Silero VAD -> utterances (two-speaker recordings pass through)")
    _common(p)
    _flag(p, "--min-duration", type=float, help="seconds")
    _flag(p, "--max-duration", type=float, help="seconds")
    _flag(p, "--pad-ms", type=int, help="silence kept around each utterance")
    _flag(p, "--utterance-gap-ms", type=int, help="a pause this long ends an utterance")
    _flag(p, "--threshold", type=float, help="Silero speech probability")
    _flag(p, "--workers", type=int, help="processes, each holding a Silero VAD")
    _ray_flag(p, gpus=False)

    p = _stage(stages, "dialogues", "agent.train.dialogues:DialogueConfig",
               help="stereo conversations, LEFT = agent, RIGHT = user")
    _common(p)
    _flag(p, "--road", choices=["auto", "assembled", "conversation", "monologue"],
          help="auto: by each input's kind")
    _flag(p, "--seed", type=int)
    _flag(p, "--count", type=int, help="assembled dialogues to make (default: about one use per agent utterance)")
    _flag(p, "--turns", type=_pair, metavar="MIN:MAX", help="turns per assembled dialogue",
          defaults=("min_turns", "max_turns"))
    _flag(p, "--max-seconds", type=float, help="assembled dialogue length limit")
    _flag(p, "--gap-ms", type=_pair, metavar="MIN:MAX", help="pause between turns")
    _flag(p, "--overlap-prob", type=float, help="chance a turn starts before the other ends")
    _flag(p, "--overlap-ms", type=_pair, metavar="MIN:MAX", help="overlap length")
    _flag(p, "--backchannel-prob", type=float, help="chance of a backchannel in a turn of >= 1.5 s")
    _flag(p, "--agent-voice", dest="agent_voices", action="append", metavar="SPEAKER=VOICE",
          help="data speaker -> catalogue voice id; when given, only these speakers are agents (repeatable)")
    _flag(p, "--emotion-policy", choices=["dialogue", "turn"],
          help="one agent emotion per dialogue or per turn")

    p = _stage(stages, "align", "agent.train.align:AlignConfig",
               help="moshi-finetune word alignments (agent words, SPEAKER_MAIN)")
    _common(p)
    _flag(p, "--aligner", help="'proportional' (an approximation) or module:Class implementing Aligner")
    _flag(p, "--include-user-words", action="store_true", help="also write user words, labelled SPEAKER_OTHER")
    _flag(p, "--text-conditions", action="store_true",
          help="add {speaker, emotion} as text_conditions to each alignment JSON (for a conditioned model)")
    _flag(p, "--workers", type=int, help="processes")
    _ray_flag(p, gpus=False)

    p = _stage(stages, "tokenizer", "agent.train.tokenizer:TokenizerConfig",
               help="SentencePiece on Telugu (+English) text, Moshi's special ids")
    _common(p)
    _flag(p, "--text", dest="text_files", action="append", type=Path,
          help="plain-text corpus, one sentence per line (repeatable; --in is then optional)")
    _flag(p, "--vocab-size", type=int, help="a small corpus gives fewer; tokenizer.json says how many")
    _flag(p, "--model-type", choices=["unigram", "bpe", "char", "word"])
    _flag(p, "--base-tokenizer", type=Path, help="the base model's tokenizer, for the overlap statistics only")
    _flag(p, "--seed", type=int)

    p = _stage(stages, "tokens", "agent.train.tokens:TokensConfig",
               help="Mimi codes + the 12.5 Hz text stream per dialogue, encoded once")
    _common(p)
    _flag(p, "--model", help="whose Mimi encodes: a repo id, a Kyutai folder, or tiny")
    _flag(p, "--tokenizer", type=Path, help="stage 5's tokenizer.model (default: the tiny model's own)")
    _flag(p, "--device", help="cpu or cuda (default: cuda when present)")
    _flag(p, "--seed", type=int, help="the tiny model's weights seed (must match training and the app)")
    _flag(p, "--workers", type=int, help="processes, each holding a Mimi")
    _flag(p, "--threads", type=int, help="torch threads per encode (default 1; the codes depend on it)")
    _ray_flag(p)

    p = _stage(stages, "script", "agent.train.script:ScriptConfig",
               help="synthetic dialogue scripts: agent voice, persona, turns with emotions "
                                         "and full-duplex events (for synth)")
    _common(p, needs_input=False)
    _flag(p, "--sentences", type=Path, help="a Telugu sentence list, one per line: templates + sampling")
    _flag(p, "--llm", help="an instruction model (Hub id or folder; needs transformers) writes the turns")
    _flag(p, "--from", dest="source_jsonl", type=Path, metavar="JSONL", help="scripts a person wrote, one per line")
    _flag(p, "--count", type=int, help="dialogues to make (default 100; --from: every line)")
    _flag(p, "--seed", type=int)
    _flag(p, "--licence", "--license", dest="licence", help="licence of the text (default: FILE.licence)")
    _flag(p, "--turns", type=_pair, metavar="MIN:MAX", help="main turns per dialogue",
          defaults=("min_turns", "max_turns"))
    _flag(p, "--max-chars", type=int, help="longest turn text")
    _flag(p, "--backchannel-prob", type=float)
    _flag(p, "--interrupt-prob", type=float)
    _flag(p, "--overlap-prob", type=float)
    _flag(p, "--pause-prob", type=float)
    _flag(p, "--emotion-policy", choices=["dialogue", "turn"],
          help="one agent emotion per dialogue or per turn")
    _flag(p, "--llm-device", help="cpu or cuda (default: cuda when present)")
    _flag(p, "--workers", type=int, help="processes (with --llm each loads the model)")
    _ray_flag(p)

    p = _stage(stages, "synth", "agent.train.synth:SynthConfig",
               help="scripts -> stereo dialogues (LEFT agent) with exact word timings, "
                                        "voice prompts and a dataset card; tokens reads its folder")
    _common(p)
    _flag(p, "--tts",
          help="espeak (offline, CPU), parler (Indic Parler-TTS; needs parler-tts), or module:Class")
    _flag(p, "--seed", type=int)
    _flag(p, "--workers", type=int, help="processes")
    _ray_flag(p)
    _flag(p, "--user-noise-prob", type=float, help="chance of pink noise on the user channel")
    _flag(p, "--user-room-prob", type=float, help="chance of a synthetic room on the user channel")
    _flag(p, "--parler-model")
    _flag(p, "--batch-size", type=int, help="Parler-TTS turns per batch")
    _flag(p, "--device", help="cpu or cuda (Parler-TTS; default: cuda when present)")

    from agent.train.trainer.config import TrainConfig
    p = _stage(stages, "train", "agent.train.trainer.config:TrainConfig",
               help="LoRA + text embeddings + speaker/emotion conditioners on the shards "
                                        "(torchrun for several processes)")
    _common(p)
    _dataclass_flags(p, TrainConfig, skip={"inp", "out", "force", "quiet"})

    p = _stage(stages, "export", "agent.train.export:ExportConfig",
               help="a checkpoint -> a folder `python app.py --model FOLDER` loads")
    _flag(p, "--in", dest="inp", type=Path, metavar="RUN",
          help="a training run folder (latest checkpoint) or a step-N folder")
    _flag(p, "--out", type=Path, metavar="FOLDER", help="the model folder to write")
    _flag(p, "--config", type=Path, help="JSON file of this stage's settings (flags override it)")
    _flag(p, "--fused", action="store_true", help="fold the LoRA into the weights (default: a separate adapter)")
    _flag(p, "--dtype", choices=["bf16", "fp16", "fp32"], help="of the weights written")
    _flag(p, "--force", action="store_true", help="overwrite a non-empty --out")
    _flag(p, "--quiet", action="store_true", help="no progress lines")

    from agent.train.telugu_tiny import add_parser as add_telugu_tiny
    add_telugu_tiny(stages)
    from agent.train.recipe import add_parser as add_recipe
    add_recipe(stages)

    p = _stage(stages, "asr", "agent.eval.ctc.train:AsrTrainConfig",
               help="a small Telugu CTC recogniser on espeak-ng speech (agent.eval asr --asr ctc:OUT/model)")
    _flag(p, "--out", type=Path, metavar="FOLDER", help="data, checkpoints, recipe.json and model/ (resumes there)")
    _flag(p, "--config", type=Path, help="JSON file of this stage's settings (flags override it)")
    _flag(p, "--quiet", action="store_true", help="no progress bar")
    for name in ("train_sentences", "heldout_sentences", "unseen_voice_sentences", "steps", "batch_size", "warmup",
                 "eval_every", "seed", "threads", "workers"):
        _flag(p, "--" + name.replace("_", "-"), dest=name, type=int)
    _flag(p, "--lr", type=float)
    _flag(p, "--noise-share", type=float)
    _flag(p, "--no-project-check", dest="project_check", action="store_const", const=False,
          help="do not score the project's own sentences at the end")
    return parser


def _dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    """--kebab-case flags for a config dataclass's fields (the help shows each default); the field
    comments in its module explain them."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            action = parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                         help=DEFAULT_ONLY)
        else:
            caster = int if kind.startswith("int") else float if kind.startswith("float") else \
                Path if kind.startswith("Path") else str
            action = parser.add_argument(flag, dest=f.name, default=None, type=caster, help=DEFAULT_ONLY)
        action.config_fields = (f.name,)  # type: ignore[attr-defined]


def _config(cls: type, args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    names = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read --config {args.config}: {exc}") from exc
        loaded = {k: v for k, v in loaded.items() if not k.startswith("_")}  # "_about" etc.: comments
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            raise UsageError(f"--config {args.config}: unknown settings {unknown}; known: {sorted(names)}")
        values.update(loaded)
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values.update(given)
    values.update({k: v for k, v in extra.items() if v is not None})
    for key in ("inp", "out"):
        optional = key == "inp" and values.get("text_files")  # the tokenizer can learn from text alone
        if key in names and values.get(key) is None and not optional:
            raise UsageError(f"--{'in' if key == 'inp' else key} is required")
        if values.get(key) is not None:
            values[key] = Path(values[key])
    for key in ("sentences", "source_jsonl"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    for key in ("manifests", "folders", "hf_datasets", "text_files"):
        if key in values:
            values[key] = [Path(v) for v in values[key]]
    for key in ("gap_ms", "overlap_ms", "lead_in_s", "pause_ms", "offset_ms", "offset_clip_ms", "same_speaker_gap_ms",
                "lead_in_ms", "user_lufs", "noise_snr_db", "room_rt60_s"):
        if key in values:
            values[key] = tuple(values[key])
    return cls(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.stage == "recipe":
            from agent.train.recipe import run_from_args
            return run_from_args(args)
        if args.stage == "telugu-tiny":
            from agent.train.telugu_tiny import from_args, run_telugu_tiny
            figures = run_telugu_tiny(from_args(args))
            print(json.dumps({k: figures[k] for k in ("codec", "turn_taking", "minutes")}, ensure_ascii=False))
            return 0
        if args.stage == "asr":
            from agent.eval.ctc.train import AsrTrainConfig, train_asr
            figures = train_asr(_config(AsrTrainConfig, args, {}))
            shown = ("heldout_clean", "unseen_voices", "minutes")
            print(json.dumps({k: figures[k] for k in shown}, ensure_ascii=False))
            return 0
        if args.stage == "ingest":
            from agent.train.ingest import IngestConfig, run_ingest
            summary = run_ingest(_config(IngestConfig, args, {"hf_columns": _mapping(args.hf_columns, "--hf-column")}))
        elif args.stage == "segment":
            from agent.train.segment import SegmentConfig, run_segment
            summary = run_segment(_config(SegmentConfig, args, {}))
        elif args.stage == "dialogues":
            from agent.train.dialogues import DialogueConfig, run_dialogues
            turns = args.turns
            extra = {"agent_voices": _mapping(args.agent_voices, "--agent-voice"),
                     "min_turns": int(turns[0]) if turns else None, "max_turns": int(turns[1]) if turns else None}
            summary = run_dialogues(_config(DialogueConfig, args, extra))
        elif args.stage == "align":
            from agent.train.align import AlignConfig, run_align
            summary = run_align(_config(AlignConfig, args, {}))
        elif args.stage == "tokenizer":
            from agent.train.tokenizer import TokenizerConfig, run_tokenizer
            summary = run_tokenizer(_config(TokenizerConfig, args, {}))
        elif args.stage == "tokens":
            from agent.train.tokens import TokensConfig, run_tokens
            summary = run_tokens(_config(TokensConfig, args, {}))
        elif args.stage == "script":
            from agent.train.script import ScriptConfig, run_script
            turns = args.turns
            extra = {"min_turns": int(turns[0]) if turns else None, "max_turns": int(turns[1]) if turns else None}
            summary = run_script(_config(ScriptConfig, args, extra))
        elif args.stage == "synth":
            from agent.train.synth import SynthConfig, run_synth
            summary = run_synth(_config(SynthConfig, args, {}))
        elif args.stage == "train":
            from agent.train.trainer import TrainConfig, run_train
            summary = run_train(_config(TrainConfig, args, {}))
        else:
            from agent.train.export import ExportConfig, run_export
            summary = run_export(_config(ExportConfig, args, {}))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per torchrun process
        print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
