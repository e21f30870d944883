"""python -m agent.eval: Full-Duplex-Bench-style evaluation of the agent (docs/evaluation.md).

    python -m agent.eval run DIR [DIR ...] --model kyutai/moshiko-pytorch-bf16 [--seats 16] [--greedy]
    python -m agent.eval score DIR --task turn-taking|pause|interruption|backchannel|all [--json FILE] [--asr SPEC]
    python -m agent.eval asr DIR [DIR ...] --asr whisper [--json FILE]
    python -m agent.eval make-set OUT [--per-task 3]
    python -m agent.eval codec [--codec assets/models/telugu-tiny] --asr ctc [--generated 40]
                         [--voices te,te+m8] [--json FILE]

Exit status: 0 done, 2 bad input or settings (a clear message on stderr naming the file or value).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("agent.eval")


def _score(args: argparse.Namespace) -> int:
    from agent.eval.score import format_table, score, score_all, write_json
    transcriber = None
    if args.asr:
        from agent.eval.asr import load_transcriber
        transcriber = load_transcriber(args.asr, device=args.device)
    gt = json.loads(args.gt_distribution.read_text(encoding="utf-8")) if args.gt_distribution else None
    if args.task == "all":
        results = score_all(args.dir, transcriber, gt)
        print("\n\n".join(format_table(r, label=name) for name, r in results.items()))
        if args.json:
            data = {name: r.to_json() for name, r in results.items()}
            args.json.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        return 0
    result = score(args.dir, args.task, transcriber, gt)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def _make_set(args: argparse.Namespace) -> int:
    from agent.eval.evalset import make_set
    for task, folder in make_set(args.out, args.per_task).items():
        print(f"{task:<18} {args.per_task} samples in {folder}")
    return 0


def _asr(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from agent.eval.asr import load_transcriber
    from agent.eval.intelligibility import format_table, transcribe_set
    from agent.eval.layout import find_samples
    samples = [s for folder in args.dirs for s in find_samples(folder)]
    result = transcribe_set(samples, load_transcriber(args.asr, device=args.device, language=args.language))
    print(format_table(result))
    if args.json:
        data = {"intelligibility": {**asdict(result.rates), "asr": result.backend},
                "samples": [asdict(t) for t in result.samples]}
        args.json.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


def _codec(args: argparse.Namespace) -> int:
    from agent.eval.asr import load_transcriber
    from agent.eval.codec_cer import codec_cer
    from agent.train.codec import load_mimi_folder
    transcriber = load_transcriber(args.asr, device=args.device)
    if args.sentences:
        sentences = [s.strip() for s in args.sentences.read_text(encoding="utf-8").splitlines() if s.strip()]
    else:  # telugu-tiny's held-out sentences, and generated ones neither the codec nor a ctc recogniser heard
        from agent.train.telugu_tiny import heldout_sentences
        shipped = args.codec / "eval.json"  # a snapshot folder has none: the recipe's own split
        sentences = (list(json.loads(shipped.read_text(encoding="utf-8"))["codec"]["heldout_sentences"])
                     if shipped.is_file() else heldout_sentences())
        if args.generated:
            from agent.eval.ctc.sentences import unseen
            training = getattr(transcriber, "recipe", {}).get("training", {})
            sentences += unseen(args.generated, 7, training.get("train_sentences", 0), training.get("seed", 0))
    mimi, _ = load_mimi_folder(args.codec)
    voices = tuple(v for v in (args.voices or "").split(",") if v) or None
    result = codec_cer(mimi.eval(), transcriber, sentences, voices)
    heard_in = ", ".join(voices) if voices else "the agent voices"
    print(f"{result['n']} sentences in {heard_in}, ASR {result['asr']}\n"
          f"clean espeak-ng:   CER {result['clean']['cer']:.3f}  WER {result['clean']['wer']:.3f}\n"
          f"codec round trip:  CER {result['round_trip']['cer']:.3f}  WER {result['round_trip']['wer']:.3f}")
    for voice, rates in result.get("voices", {}).items():
        print(f"  {voice:<12} clean CER {rates['clean']['cer']:.3f}  round trip CER {rates['round_trip']['cer']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def _run(args: argparse.Namespace) -> int:
    from agent.config import ModelConfig, SamplingConfig
    from agent.eval.layout import find_samples
    from agent.eval.runner import RunConfig, SeatOptions, run_set
    from agent.models import load_model
    from agent.voices import load_catalogue
    samples = [s for folder in args.dirs for s in find_samples(folder)]
    load_catalogue().settings(args.voice, args.emotion)  # an unknown voice fails before the model loads
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    sampling = SamplingConfig(temp=args.temp, temp_text=args.temp_text, top_k=args.top_k,
                              top_k_text=args.top_k_text, use_sampling=not args.greedy)
    model = load_model(ModelConfig(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                                   sampling=sampling))
    config = RunConfig(seats=args.seats, sampling=sampling, seed=args.seed, output_rate=args.output_rate,
                       prefix=args.prefix, skip_existing=args.skip_existing)
    report = run_set(model, samples, SeatOptions(voice=args.voice, emotion=args.emotion), config)
    print(f"{report.samples} samples ({report.audio_s:.1f} s of audio) in {report.wall_s:.1f} s "
          f"({report.realtime_factor:.1f}x real time, {config.seats} seats, {report.steps} batched steps); "
          f"{report.skipped} skipped (output present)")
    if model.random_weights:
        print(f"note: {model.name} has RANDOM weights: its outputs are noise, not speech")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from agent.config import ModelConfig, SamplingConfig
    from agent.eval.score import TASKS
    p = argparse.ArgumentParser(prog="python -m agent.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="write output.wav beside every input.wav, through the live engine")
    r.add_argument("dirs", type=Path, nargs="+", help="task folders (one folder per sample) or sample folders")
    r.add_argument("--model", default=None, help="HF repo id, a local checkpoint folder, 'tiny' or "
                   "'moshi-7b-random' (default: kyutai/moshiko-pytorch-bf16 on a GPU, tiny on a CPU)")
    r.add_argument("--device", default=None, help="cuda, cpu (default: cuda if present)")
    r.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on GPU, fp32 on CPU)")
    r.add_argument("--seats", type=int, default=8, help="samples stepped together in one batch (default 8)")
    r.add_argument("--voice", default=None, help="a voice id from assets/catalogue.json")
    r.add_argument("--emotion", default=None, help="an emotion id from assets/catalogue.json")
    r.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    r.add_argument("--temp", type=float, default=SamplingConfig.temp, help="audio temperature")
    r.add_argument("--temp-text", type=float, default=SamplingConfig.temp_text, help="text temperature")
    r.add_argument("--top-k", type=int, default=SamplingConfig.top_k, help="audio top-k")
    r.add_argument("--top-k-text", type=int, default=SamplingConfig.top_k_text, help="text top-k")
    r.add_argument("--seed", type=int, default=ModelConfig.seed, help="sampling seed (and tiny-model weights)")
    r.add_argument("--output-rate", type=int, default=None,
                   help="output.wav's rate (default: the input's; FDB's backchannel scorer assumes 16000)")
    r.add_argument("--prefix", default="", choices=["", "clean_"],
                   help="v1.5: 'clean_' runs clean_input.wav into clean_output.wav")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; on a busy CPU 1 can be several times faster)")
    r.add_argument("--skip-existing", action="store_true", help="keep outputs already there (resume)")
    r.set_defaults(func=_run)

    s = sub.add_parser("score", help="score input.wav/output.wav pairs as Full-Duplex-Bench does")
    s.add_argument("dir", type=Path, help="a task folder (one folder per sample) or one sample folder; "
                   "with --task all, a set's root (each task folder scored as its name says)")
    s.add_argument("--task", required=True, choices=[*TASKS, "all"])
    s.add_argument("--json", type=Path, default=None, help="write the figures and per-sample rows here")
    s.add_argument("--asr", default=None, help="word timings from an ASR backend (whisper[:MODEL], "
                   "faster-whisper[:MODEL], nemo[:MODEL]), also written as output.json; default: an "
                   "output.json already there, else Silero VAD segments")
    s.add_argument("--device", default=None, help="the ASR's device (default: cuda if present)")
    s.add_argument("--gt-distribution", type=Path, default=None,
                   help="backchannel: FDB's icc_gt_distribution.json, for the JSD")
    s.set_defaults(func=_score)

    a = sub.add_parser("asr", help="CER/WER of the agent's speech (output.wav) against its reference text")
    a.add_argument("dirs", type=Path, nargs="+", help="task folders or sample folders with output.wav")
    a.add_argument("--asr", required=True, help="whisper[:MODEL], faster-whisper[:MODEL], nemo[:MODEL], "
                   "ctc[:FOLDER] (trained here on espeak-ng Telugu; hears espeak-like speech only), "
                   "whisper:tiny-random (noise; for smoke runs)")
    a.add_argument("--device", default=None, help="the ASR's device (default: cuda if present)")
    a.add_argument("--language", default="te", help="the ASR's language (default te)")
    a.add_argument("--json", type=Path, default=None, help="write the figures and each transcript here")
    a.set_defaults(func=_asr)

    c = sub.add_parser("codec", help="CER of an ASR on espeak-ng speech before and after a codec's round trip")
    c.add_argument("--codec", type=Path, default=Path("assets/models/telugu-tiny"),
                   help="a folder with mimi.safetensors + mimi_config.json (and eval.json's held-out sentences)")
    c.add_argument("--asr", default="ctc", help="an ASR spec as for `asr` (default ctc)")
    c.add_argument("--sentences", type=Path, default=None, help="a Telugu sentence per line (default: the codec's "
                   "held-out sentences plus --generated ones)")
    c.add_argument("--generated", type=int, default=40, help="generated sentences no model heard (default 40)")
    c.add_argument("--voices", default=None, help="espeak-ng voices, comma-separated (e.g. te,te+m8: voices the codec "
                   "never trained on); every sentence in each (default: the agent voices, one each in turn)")
    c.add_argument("--device", default=None)
    c.add_argument("--json", type=Path, default=None)
    c.set_defaults(func=_codec)

    m = sub.add_parser("make-set", help="write a small generated Telugu set (espeak-ng) in FDB's layout")
    m.add_argument("out", type=Path)
    m.add_argument("--per-task", type=int, default=3, help="samples per task (default 3)")
    m.set_defaults(func=_make_set)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from agent.errors import CatalogueError, ModelLoadError
    from agent.eval.asr import AsrError
    from agent.eval.layout import EvalDataError
    from agent.eval.speech import SpeechError
    from agent.eval.transcript import TranscriptError
    try:
        return args.func(args)
    except (EvalDataError, TranscriptError, AsrError, SpeechError, ModelLoadError, CatalogueError, OSError,
            ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
