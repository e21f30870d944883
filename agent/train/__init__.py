"""Telugu fine-tuning pipeline for Moshi: raw audio in, a model folder the app loads out.

    python -m agent.train ingest    --out W/ingest    --manifest rows.jsonl --folder clips/ ...
    python -m agent.train segment   --in W/ingest/manifest.jsonl    --out W/segments
    python -m agent.train dialogues --in W/segments/manifest.jsonl  --out W/dialogues --seed 0
    python -m agent.train align     --in W/dialogues/manifest.jsonl --out W/align
    python -m agent.train tokenizer --in W/align/manifest.jsonl     --out W/tokenizer --text extra.txt
    python -m agent.train tokens    --in W/align/manifest.jsonl     --out W/tokens --tokenizer W/tokenizer/tokenizer.model
    python -m agent.train train     --in W/tokens/manifest.jsonl    --out W/run --tokenizer ... --config assets/train/X.json
    python -m agent.train export    --in W/run                      --out models/telugu [--fused]
    python -m agent.train script    --sentences FILE | --llm HF_ID | --from JSONL --count N --seed S --out W/script
    python -m agent.train synth     --in W/script --tts espeak|parler --out W/synth   (then tokens --in W/synth/...)

Stages 1-6 read the previous stage's manifest.jsonl, write their own (records in `records.py`),
report.jsonl (one line per skipped item or note) and summary.json, resume where they stopped, and never
stop on bad data. `W/align/train.jsonl` + `W/align/data/` is also a moshi-finetune dataset. Training
checkpoints and resumes exactly (trainer/); `torchrun` runs it on several processes. Export writes
Kyutai's folder layout: `python app.py --model models/telugu`. See docs/training.md.
"""  # noqa: E501 - aligned command lines

from importlib import import_module

# name -> the module that defines it; imported on first use, so `python -m agent.train --help` loads no torch.
_EXPORTS = {
    "AlignConfig": "align", "Aligner": "align", "ProportionalAligner": "align", "run_align": "align",
    "DialogueConfig": "dialogues", "run_dialogues": "dialogues",
    "IngestConfig": "ingest", "run_ingest": "ingest",
    "SegmentConfig": "segment", "run_segment": "segment",
    "TokenizerConfig": "tokenizer", "resize_text_vocab": "tokenizer", "run_tokenizer": "tokenizer",
    "TokensConfig": "tokens", "run_tokens": "tokens",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
