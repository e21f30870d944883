"""Telugu fine-tuning pipeline, first half: data preparation for moshi-finetune.

    python -m agent.train ingest    --out W/ingest    --manifest rows.jsonl --folder clips/ ...
    python -m agent.train segment   --in W/ingest/manifest.jsonl    --out W/segments
    python -m agent.train dialogues --in W/segments/manifest.jsonl  --out W/dialogues --seed 0
    python -m agent.train align     --in W/dialogues/manifest.jsonl --out W/align

Each stage reads the previous stage's manifest.jsonl, writes its own (records in `records.py`),
report.jsonl (one line per skipped item or note) and summary.json, resumes where it stopped, and
never stops on bad data. `W/align/train.jsonl` + `W/align/data/` is a moshi-finetune dataset.
Stages 5-8 (tokenizer, tokens, train, export) are not built yet: see docs/training.md.
"""

from agent.train.align import AlignConfig, Aligner, ProportionalAligner, run_align
from agent.train.dialogues import DialogueConfig, run_dialogues
from agent.train.ingest import IngestConfig, run_ingest
from agent.train.segment import SegmentConfig, run_segment

__all__ = ["AlignConfig", "Aligner", "DialogueConfig", "IngestConfig", "ProportionalAligner", "SegmentConfig",
           "run_align", "run_dialogues", "run_ingest", "run_segment"]
