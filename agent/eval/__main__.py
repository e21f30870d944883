"""python -m agent.eval: Full-Duplex-Bench-style evaluation of the agent (docs/evaluation.md).

    python -m agent.eval score DIR --task turn-taking|pause|interruption|backchannel [--json FILE]

Exit status: 0 done, 2 bad input (a clear message on stderr, nothing half-written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("agent.eval")


def _score(args: argparse.Namespace) -> int:
    from agent.eval.score import format_table, score, write_json
    transcriber = None
    gt = json.loads(args.gt_distribution.read_text(encoding="utf-8")) if args.gt_distribution else None
    result = score(args.dir, args.task, transcriber, gt)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from agent.eval.score import TASKS
    p = argparse.ArgumentParser(prog="python -m agent.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score input.wav/output.wav pairs as Full-Duplex-Bench does")
    s.add_argument("dir", type=Path, help="a task folder (one folder per sample) or one sample folder")
    s.add_argument("--task", required=True, choices=TASKS)
    s.add_argument("--json", type=Path, default=None, help="write the figures and per-sample rows here")
    s.add_argument("--gt-distribution", type=Path, default=None,
                   help="backchannel: FDB's icc_gt_distribution.json, for the JSD")
    s.set_defaults(func=_score)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from agent.eval.asr import AsrError
    from agent.eval.layout import EvalDataError
    from agent.eval.transcript import TranscriptError
    try:
        return args.func(args)
    except (EvalDataError, TranscriptError, AsrError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
