"""`python -m agent.train telugu-tiny`: train the toy Telugu agent end to end on a CPU.

Why it exists: the tiny model's weights are random, so its voice is noise and it never takes a turn;
nothing then shows that the pipeline teaches a model to converse, and the turn-taking and
voice-to-voice figures never measure a model that talks. This command trains one here, on our own
synthetic espeak-ng Telugu dialogues, through the same stages a real run uses, and measures it with
the evaluation harness. It is a toy: robotic espeak-ng speech, a vocabulary of a few dozen sentences,
no understanding. It is not a Telugu Moshi.

Steps (each shows its own progress bar; a rerun reuses what the stages finished, and an interrupted
codec run resumes from its last snapshot):
 1. sentences  assets/telugu_sentences.txt split: the evaluation set's questions and a few held-out
               sentences never reach training
 2. script     dialogues of whole turns (no backchannels/interruptions: a clean "listen, then answer"
               rhythm), our 4 voices x 5 emotions; those where the user speaks first are the LM's
 3. synth      espeak-ng, two channels (LEFT agent, RIGHT user), exact word timings; also those of
               the first 300 dialogues the LM does not have, as speech for the codec
 4. codec      the tiny Mimi trained as an autoencoder on every channel of the first 300 dialogues, in
               a fixed order (CODEC_ORDER_NOTE; agent.train.codec); each
               snapshot judged by Silero on training sentences, the best kept, training extended until
               one is heard as speech; then measured on held-out sentences (speech ratio, LSD)
 5. base       a Kyutai folder: the tiny LM (random) + the trained codec + the tiny tokenizer
 6. tokens     the dialogues encoded with the trained codec
 7. train      the LM on the shards (assets/train/telugu_tiny.json: LoRA at the model's full rank on
               every Linear, text layers, conditioners)
 8. export     fused, fp32, into --out (default assets/models/telugu-tiny: what `--model telugu-tiny` loads)
 9. evaluate   make-set's turn-taking samples (sentences and espeak voices it never trained on),
               run + score with the trained model and the untrained tiny one -> eval.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agent import ASSETS
from agent.train.common import UsageError

SENTENCES = ASSETS / "telugu_sentences.txt"
TRAIN_CONFIG = ASSETS / "train" / "telugu_tiny.json"
DEFAULT_OUT = ASSETS / "models" / "telugu-tiny"
CODEC_VOICES = (("lakshmi", "female"), ("sravani", "female"), ("ravi", "male"), ("kiran", "male"))
# CODEC_ORDER_NOTE: the codec reads the first 100 user-first dialogues, then the others by id: the order
# decides whether its voice turns into speech (docs/evaluation.md, "The codec is the fragile part").
CODEC_LEADING_USER_FIRST = 100


@dataclass
class TeluguTinyConfig:
    work: Path  # everything intermediate (datasets, runs); a few hundred MB
    out: Path = DEFAULT_OUT  # the shipped model folder
    dialogues: int = 600  # user-first dialogues for the LM (fewer overfit: docs/evaluation.md, "LM data")
    codec_steps: int = 4000
    codec_extra_steps: int = 4000  # at most this many more until a codec snapshot is heard as speech
    codec_dialogues: int = 300  # the codec's data: the first 300 dialogues, whoever speaks first (see below)
    lm_steps: int = 1600
    lm_config: Path = TRAIN_CONFIG
    eval_samples: int = 12  # turn-taking samples in the final evaluation
    threads: int = 1  # torch threads: on a shared 2-core machine 1 is fastest
    seed: int = 0
    quiet: bool = False
    # "small": telugu-small's codec recipe (agent.train.codec.telugu_small_codec_config: wider, mel +
    # discriminator losses, quantizer dropout); its step count is still --codec-steps
    codec_preset: str = "tiny"
    ray: str | None = None  # script, synth and tokens on a Ray cluster (`recipe --ray`); None: this process


def _sentence_split() -> tuple[list[str], list[str]]:
    """(training lines, held-out Telugu sentences): every 9th Telugu line is held out, and none of the
    evaluation set's questions is in either."""
    from agent.eval.evalset import QUESTIONS
    lines = [line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
    telugu = [line for line in lines if re.search("[\u0c00-\u0c7f]", line) and line not in QUESTIONS]
    held = telugu[4::9]
    return [line for line in lines if line not in held and line not in QUESTIONS], held


def heldout_sentences() -> list[str]:
    """The sentences no codec or LM of this recipe trains on (its codec figures are measured on them)."""
    return _sentence_split()[1]


def split_sentences(work: Path) -> tuple[Path, list[str]]:
    """Training sentences (file, with the corpus's licence beside it) and held-out Telugu sentences
    (`_sentence_split`)."""
    train, held = _sentence_split()
    folder = work / "sentences"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.txt"
    path.write_text("\n".join(train) + "\n", encoding="utf-8")
    shutil.copy(SENTENCES.with_name(SENTENCES.name + ".licence"), folder / "train.txt.licence")
    (folder / "heldout.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
    return path, held


def split_scripts(script_dir: Path, keep: int, codec_first: int) -> tuple[Path, Path, list[str]]:
    """The LM's scripts: the first `keep` whose first turn is the user's (the agent listens, then
    answers). The codec's: the first `codec_first` scripts, whoever speaks first, in the order the
    codec reads them (CODEC_ORDER_NOTE). Returns the LM's script file, a script file of the codec's
    that the LM does not have (synthesised for the codec only), and the codec's script ids in order."""
    rows = [json.loads(line) for line in (script_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
            if line]
    chosen = [r for r in rows if r["turns"] and r["turns"][0]["speaker"] == "user"][:keep]
    if not chosen:
        raise UsageError(f"{script_dir}: no script starts with the user")
    lm_ids = {r["id"] for r in chosen}
    codec_only = [r for r in rows[:codec_first] if r["id"] not in lm_ids]
    paths = script_dir.parent / "script-user-first.jsonl", script_dir.parent / "script-codec-only.jsonl"
    for path, part in zip(paths, (chosen, codec_only)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    codec_ids = {r["id"] for r in rows[:codec_first]}
    leading = [r["id"] for r in chosen[:CODEC_LEADING_USER_FIRST] if r["id"] in codec_ids]
    return *paths, leading + sorted(codec_ids - set(leading))


def spoken_clips(sentences: list[str]) -> list[np.ndarray]:
    """The sentences in the agent voices (one voice each, in turn), 24 kHz mono."""
    from agent.train.tts import EspeakBackend, Style
    items = [(text, Style(*CODEC_VOICES[i % len(CODEC_VOICES)])) for i, text in enumerate(sentences)]
    return [speech.audio for speech in EspeakBackend().synthesize(items)]


def codec_stage(config: TeluguTinyConfig, audio: list[Path], out: Path, validation_texts: list[str]):
    """The codec stage's CodecConfig and train_codec's judging arguments. The tiny preset: Silero judges
    the snapshots. telugu-small's (issue 22): the ctc recogniser's CER on the validation clips (what
    `validation_texts` say) judges them first, so the kept codec is the one whose words are heard."""
    from agent.train.codec import CodecConfig, telugu_small_codec_config
    make = telugu_small_codec_config if config.codec_preset == "small" else CodecConfig
    codec_config = make(audio=audio, out=out, steps=config.codec_steps, extra_steps=config.codec_extra_steps,
                        seed=config.seed, quiet=config.quiet)
    if config.codec_preset != "small":
        return codec_config, {}
    from agent.eval.asr import load_transcriber
    return codec_config, {"judge": load_transcriber("ctc"), "validation_texts": list(validation_texts)}


def write_base(codec_dir: Path, folder: Path, seed: int) -> Path:
    """The tiny LM (random weights from `seed`) with the trained codec, in Kyutai's folder layout."""
    import torch

    from agent.models import build_tiny, write_checkpoint_folder
    from agent.train.codec import load_mimi_folder
    from agent.train.export import RANDOM_INIT_LICENCE
    model = build_tiny(torch.device("cpu"), torch.float32, seed)
    model.mimi, mimi_config = load_mimi_folder(codec_dir)
    provenance = {"base": f"telugu-tiny-base: the tiny LM (random, seed {seed}) + the codec trained here",
                  "weights_licence": RANDOM_INIT_LICENCE}
    return write_checkpoint_folder(model, folder, model.lm_config, mimi_config, model.tokenizer_path, provenance)


def stage(argv: list[str]) -> None:
    from agent.train.__main__ import main
    if main(argv) != 0:
        raise UsageError(f"stage failed: python -m agent.train {' '.join(argv)}")


def loudness_timing(folder: Path, frame_s: float = 0.08, after_s: float = 3.0) -> dict:
    """A codec-independent look at turn-taking: the agent's output level (RMS) while the user speaks and
    in the `after_s` seconds after the user's turn ends, and when it first gets loud (an 80 ms frame
    above 4x the level it kept while the user spoke, and above -46 dBFS). Not a benchmark figure: it
    shows whether the LM stays quiet and then answers even where the codec's voice is too poor for
    Silero to call it speech."""
    from agent.audio.files import read_mono
    from agent.eval.layout import find_samples
    during, after, onsets = [], [], []
    for sample in find_samples(folder):
        out, rate = read_mono(sample.folder / "output.wav")
        start = json.loads((sample.folder / "transcription.json").read_text(encoding="utf-8"))[0]["timestamp"][0]
        end = json.loads((sample.folder / "turn_taking.json").read_text(encoding="utf-8"))[0]["timestamp"][0]
        hop = int(frame_s * rate)
        user_part, answer = out[int(start * rate):int(end * rate)], out[int(end * rate):int((end + after_s) * rate)]
        level = float(np.sqrt(np.mean(user_part ** 2))) if user_part.size else 0.0
        during.append(level)
        after.append(float(np.sqrt(np.mean(answer ** 2))) if answer.size else 0.0)
        frames = np.sqrt(np.mean(answer[:answer.size // hop * hop].reshape(-1, hop) ** 2, axis=1))
        loud = np.flatnonzero(frames > max(4 * level, 0.005))
        onsets.append(float(loud[0] * frame_s) if loud.size else None)
    found = [o for o in onsets if o is not None]
    return {"n": len(during), "rms_during_user": round(float(np.mean(during)), 5),
            "rms_after_turn_end": round(float(np.mean(after)), 5),
            "after_over_during": round(float(np.mean(after) / max(np.mean(during), 1e-9)), 2),
            "loud_within_3s": len(found), "mean_onset_s": round(float(np.mean(found)), 3) if found else None}


def evaluate(model: str, set_dir: Path, out_dir: Path, seed: int) -> dict:
    """Turn-taking TOR and latency of `model` on a copy of the set (run writes beside the inputs)."""
    from agent.eval.__main__ import main as eval_main
    from agent.eval.score import score
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(set_dir, out_dir)
    if eval_main(["run", str(out_dir), "--model", model, "--seats", "8", "--threads", "1", "--seed", str(seed)]) != 0:
        raise UsageError(f"agent.eval run failed on {model}")
    return score(out_dir, "turn-taking").summary() | {"loudness": loudness_timing(out_dir)}


def run_telugu_tiny(config: TeluguTinyConfig) -> dict:
    import torch  # here, not at the top: the stage list (`python -m agent.train --help`) loads no torch

    torch.set_num_threads(config.threads)
    w, q = config.work, ["--quiet"] if config.quiet else []
    items = [*q, *(["--ray", config.ray] if config.ray else [])]  # for the per-item stages
    w.mkdir(parents=True, exist_ok=True)
    started, figures = time.monotonic(), {}

    def step(k: int, what: str) -> None:
        print(f"[telugu-tiny {k}/9, {(time.monotonic() - started) / 60:.1f} min] {what}", file=sys.stderr, flush=True)

    step(1, "sentences")
    train_sentences, held = split_sentences(w)
    step(2, "script")
    stage(["script", "--sentences", str(train_sentences), "--out", str(w / "script"),
           "--count", str(config.dialogues * 3),
           "--seed", str(config.seed), "--turns", "2:6", "--backchannel-prob", "0", "--interrupt-prob", "0",
           "--overlap-prob", "0", "--pause-prob", "0", *items])
    lm_scripts, codec_scripts, codec_ids = split_scripts(w / "script", config.dialogues, config.codec_dialogues)
    step(3, "synth")
    stage(["synth", "--in", str(lm_scripts), "--out", str(w / "synth"), "--seed", str(config.seed), *items])
    if codec_scripts.stat().st_size:  # empty when the LM has all of the codec's dialogues
        stage(["synth", "--in", str(codec_scripts), "--out", str(w / "synth-codec"), "--seed", str(config.seed),
               *items])

    step(4, "codec")
    from agent.train.codec import (
        build_mimi,
        codec_mimi_config,
        evaluate_codec,
        load_mimi_folder,
        train_codec,
    )
    codec_dir = w / "codec"
    if not (codec_dir / "codec.json").exists() or not json.loads((codec_dir / "codec.json").read_text())["done"]:
        # Snapshots are judged on training sentences (the held-out ones stay unseen until the figures below)
        validation_texts = train_sentences.read_text(encoding="utf-8").splitlines()[:len(CODEC_VOICES)]
        validation = spoken_clips(validation_texts)
        lm_ids = {json.loads(line)["id"] for line in lm_scripts.read_text(encoding="utf-8").splitlines() if line}
        audio = [w / ("synth" if i in lm_ids else "synth-codec") / "data" / f"{i}.wav" for i in codec_ids]
        codec_config, judged = codec_stage(config, audio, codec_dir, validation_texts)
        train_codec(codec_config, validation, **judged)
    clips = spoken_clips(held)
    trained, _ = load_mimi_folder(codec_dir)
    untrained = build_mimi(codec_mimi_config(), config.seed).eval()
    log = json.loads((codec_dir / "codec.json").read_text())
    figures["codec"] = {"trained": evaluate_codec(trained, clips), "untrained": evaluate_codec(untrained, clips),
                        "heldout_sentences": held, "chosen_snapshot": log["chosen"], "passed": log["passed"]}

    step(5, "base")
    base = write_base(codec_dir, w / "base", seed=42424242)
    step(6, "tokens")
    stage(["tokens", "--in", str(w / "synth" / "manifest.jsonl"), "--out", str(w / "tokens"), "--model", str(base),
           "--tokenizer", str(base / "tokenizer.model"),
           "--device", "cpu", *items])
    step(7, "train")
    stage(["train", "--in", str(w / "tokens" / "manifest.jsonl"), "--out", str(w / "run"), "--model", str(base),
           "--tokenizer", str(base / "tokenizer.model"),
           "--config", str(config.lm_config), "--max-steps", str(config.lm_steps), "--device", "cpu", *q])
    step(8, "export")
    stage(["export", "--in", str(w / "run"), "--out", str(config.out), "--fused", "--dtype", "fp32", "--force", *q])

    step(9, "evaluate")
    from agent.eval.evalset import make_set
    set_dir = w / "eval" / "set"
    if not set_dir.exists():
        make_set(set_dir, per_task=config.eval_samples)
    figures["turn_taking"] = {
        "trained": evaluate(str(config.out), set_dir / "turn_taking", w / "eval" / "trained", config.seed),
        "untrained_tiny": evaluate("tiny", set_dir / "turn_taking", w / "eval" / "tiny", config.seed)}
    figures["minutes"] = round((time.monotonic() - started) / 60, 1)
    figures["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    (w / "eval.json").write_text(json.dumps(figures, ensure_ascii=False, indent=1), encoding="utf-8")
    (config.out / "eval.json").write_text(json.dumps(figures, ensure_ascii=False, indent=1), encoding="utf-8")
    return figures


def add_parser(stages: argparse._SubParsersAction) -> None:
    p = stages.add_parser("telugu-tiny", help="train the toy Telugu agent end to end on a CPU (codec + LM on "
                                              "synthetic espeak-ng dialogues) and measure it")
    p.add_argument("--work", type=Path, required=True, help="folder for everything intermediate")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the model folder (default {DEFAULT_OUT})")
    for name in ("dialogues", "codec_steps", "codec_extra_steps", "codec_dialogues", "lm_steps", "eval_samples",
                 "threads", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(TeluguTinyConfig, name))
    p.add_argument("--lm-config", type=Path, default=TRAIN_CONFIG)
    p.add_argument("--codec-preset", choices=("tiny", "small"), default="tiny",
                   help="the codec's recipe: tiny (default) or telugu-small's (mel + discriminator losses, wider)")
    p.add_argument("--quiet", action="store_true")


def from_args(args: argparse.Namespace) -> TeluguTinyConfig:
    return TeluguTinyConfig(work=args.work, out=args.out, dialogues=args.dialogues, codec_steps=args.codec_steps,
                            codec_extra_steps=args.codec_extra_steps, codec_dialogues=args.codec_dialogues,
                            lm_steps=args.lm_steps, lm_config=args.lm_config, eval_samples=args.eval_samples,
                            threads=args.threads, seed=args.seed, quiet=args.quiet,
                            codec_preset=args.codec_preset)
