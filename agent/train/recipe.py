"""`python -m agent.train recipe telugu --scale tiny|7b --work W`: the whole way in one command, from an
empty folder to a model folder `python app.py --model FOLDER` loads, in order, from a recipe file
(assets/recipes/telugu.json), resumable: every stage reuses what it finished, so rerunning the same command
after a crash goes on where it stopped.

- `--scale tiny` runs here on a CPU, through telugu-tiny's chain (agent/train/telugu_tiny.py: script ->
  synth -> codec -> base -> tokens -> train -> export -> evaluate) with the recipe's settings; `--smoke` is
  the CI size. The tiny model keeps its own tokenizer (its text layers are sized for it) and needs its
  codec trained, because the tiny Mimi is random.
- `--scale 7b` is the GPU run: script -> synth (Indic Parler-TTS) -> tokenizer (32k SentencePiece) ->
  tokens (Kyutai's Mimi, frozen) -> the train stages of a route (`--route seed`: the three LoRA stages;
  `human1`: Human-1's full fine-tune after re-initialising the text layers) each followed by its fused
  export -> evaluation. The tokenizer comes before tokens because tokens writes its text stream in the
  tokenizer's pieces. `--plan` prints the commands (and writes them to W/plan.sh) and runs nothing;
  without it they run one after another, a finished one recorded in W/recipe.json and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from agent import ASSETS
from agent.train.common import UsageError

RECIPES = ASSETS / "recipes"
TRAIN_CONFIGS = ASSETS / "train"
PROGRESS_FILE = "recipe.json"


@dataclass
class GpuRecipe:
    """The 7b scale's settings (the "7b" block of a recipe file)."""

    base: str = "kyutai/moshiko-pytorch-bf16"
    sentences: str = "telugu_sentences.txt"  # script's source unless `llm` writes the turns (paths: under assets/)
    llm: str | None = None  # an instruction model for script (needs transformers)
    text_licence: str | None = None  # required with llm: the licence of its output
    dialogues: int = 28800
    tts: str = "parler"
    tts_batch_size: int = 16
    vocab_size: int = 32000
    tokenizer_text: list[str] = field(default_factory=lambda: ["telugu_sentences.txt"])
    gpus_per_node: int = 8
    eval_samples: int = 12
    routes: dict[str, list[str]] = field(default_factory=dict)  # route -> train stage configs, in order


@dataclass
class Step:
    name: str  # unique within a plan; what W/recipe.json records as done
    argv: list[str]

    def line(self) -> str:
        return shlex.join(self.argv)


def load_recipe(name: str, path: Path | None = None) -> dict:
    path = path or RECIPES / f"{name}.json"
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read recipe {path}: {exc}") from exc


def gpu_recipe(block: dict) -> GpuRecipe:
    known = {f.name for f in fields(GpuRecipe)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise UsageError(f"recipe 7b: unknown settings {unknown}; known: {sorted(known)}")
    return GpuRecipe(**block)


def _asset(path: str) -> str:
    """A recipe's file: absolute, or under assets/ (so a recipe works from any folder)."""
    return path if Path(path).is_absolute() else str(ASSETS / path)


def gpu_plan(recipe: GpuRecipe, work: Path, out: Path, route: str, item_flags: tuple[str, ...] = ()) -> list[Step]:
    """The 7b run as commands. `item_flags` go to the per-item stages (script, synth, tokens): `--ray ...`
    when those stages run on a Ray cluster (`recipe --ray`)."""
    if route not in recipe.routes:
        raise UsageError(f"recipe 7b: no route {route!r}; known: {sorted(recipe.routes)}")
    stage = [sys.executable, "-m", "agent.train"]
    gpu_actor = ("--num-gpus", "1")  # on Ray, each worker holding a model (LLM, Parler, Mimi) takes a GPU
    tokenizer = str(work / "tokenizer" / "tokenizer.model")
    source = (["--llm", recipe.llm, "--licence", recipe.text_licence or ""] if recipe.llm
              else ["--sentences", _asset(recipe.sentences)])
    if recipe.llm and not recipe.text_licence:
        raise UsageError("recipe 7b: `llm` needs `text_licence` (the licence of the text it writes)")
    steps = [
        Step("script", [*stage, "script", *source, "--count", str(recipe.dialogues), "--seed", "0",
                        "--out", str(work / "script"), *(gpu_actor if recipe.llm else ()), *item_flags]),
        Step("synth", [*stage, "synth", "--in", str(work / "script" / "manifest.jsonl"), "--out", str(work / "synth"),
                       "--tts", recipe.tts, "--batch-size", str(recipe.tts_batch_size), "--device", "cuda",
                       *gpu_actor, *item_flags]),
        Step("tokenizer", [*stage, "tokenizer", "--in", str(work / "synth" / "manifest.jsonl"),
                           *[x for t in recipe.tokenizer_text for x in ("--text", _asset(t))],
                           "--vocab-size", str(recipe.vocab_size), "--out", str(work / "tokenizer")]),
        Step("tokens", [*stage, "tokens", "--in", str(work / "synth" / "manifest.jsonl"), "--out", str(work / "tokens"),
                        "--model", recipe.base, "--tokenizer", tokenizer, "--device", "cuda", *gpu_actor,
                        *item_flags]),
    ]
    previous = recipe.base
    names = recipe.routes[route]
    for i, name in enumerate(names):
        config = TRAIN_CONFIGS / f"{name}.json"
        if not config.is_file():
            raise UsageError(f"recipe 7b route {route}: no stage config {config}")
        model_dir = out if i == len(names) - 1 else work / "models" / name
        steps.append(Step(f"train:{name}", [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(recipe.gpus_per_node), "-m", "agent.train", "train", "--in", str(work / "tokens" / "manifest.jsonl"),
            "--out", str(work / "runs" / name), "--model", previous, "--tokenizer", tokenizer,
            "--config", str(config)]))
        steps.append(Step(f"export:{name}", [*stage, "export", "--in", str(work / "runs" / name),
                                             "--out", str(model_dir), "--fused", "--force"]))
        previous = str(model_dir)
    from agent.eval.evalset import BUILDERS
    evaluation, tasks = [sys.executable, "-m", "agent.eval"], [str(work / "eval" / "set" / t) for t in BUILDERS]
    steps += [
        Step("eval:set", [*evaluation, "make-set", str(work / "eval" / "set"), "--per-task", str(recipe.eval_samples)]),
        Step("eval:run", [*evaluation, "run", *tasks, "--model", str(out), "--seats", "16"]),
        Step("eval:score", [*evaluation, "score", str(work / "eval" / "set"), "--task", "all",
                            "--json", str(work / "eval.json")]),
    ]
    return steps


def run_plan(steps: list[Step], work: Path, quiet: bool) -> list[str]:
    """Runs the steps not yet recorded as done in W/recipe.json; returns the names it ran."""
    progress = work / PROGRESS_FILE
    done = json.loads(progress.read_text())["done"] if progress.is_file() else []
    ran = []
    for k, step in enumerate(steps, 1):
        if step.name in done:
            continue
        if not quiet:
            print(f"[recipe {k}/{len(steps)}] {step.name}: {step.line()}", file=sys.stderr, flush=True)
        if subprocess.run(step.argv).returncode != 0:
            raise UsageError(f"recipe step {step.name} failed; rerun the same command to go on from there")
        done.append(step.name)
        progress.write_text(json.dumps({"done": done}, indent=1))
        ran.append(step.name)
    return ran


def run_tiny(recipe: dict, work: Path, out: Path, smoke: bool, quiet: bool, ray: str | None = None) -> dict:
    from agent.train.telugu_tiny import TeluguTinyConfig, run_telugu_tiny
    block = recipe["tiny"]
    settings = block.get("settings", {}) | (block.get("smoke", {}) if smoke else {})
    known = {f.name for f in fields(TeluguTinyConfig)} - {"work", "out", "quiet"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"recipe tiny: unknown settings {unknown}; known: {sorted(known)}")
    if "lm_config" in settings:
        settings["lm_config"] = Path(settings["lm_config"])
    return run_telugu_tiny(TeluguTinyConfig(work=work, out=out, quiet=quiet, ray=ray, **settings))


def add_parser(stages: argparse._SubParsersAction) -> None:
    p = stages.add_parser("recipe", help="the whole way in one command: script -> synth -> tokenizer -> tokens -> "
                                         "train stages -> export -> eval, from assets/recipes/NAME.json, resumable")
    p.add_argument("name", help="the recipe (assets/recipes/NAME.json), e.g. telugu")
    p.add_argument("--scale", choices=["tiny", "7b"], required=True,
                   help="tiny: runs here on a CPU; 7b: the GPU run (--plan prints it)")
    p.add_argument("--work", type=Path, required=True, help="folder for everything intermediate")
    p.add_argument("--out", type=Path, help="the model folder to write (default WORK/model)")
    p.add_argument("--recipe", type=Path, help="a recipe file instead of assets/recipes/NAME.json")
    p.add_argument("--route", default="seed", help="7b: which train stages (the recipe's routes: seed, human1)")
    p.add_argument("--plan", action="store_true", help="7b: print the commands and write WORK/plan.sh; run nothing")
    p.add_argument("--smoke", action="store_true", help="tiny: the recipe's smoke size (CI)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help="run the per-item stages (script, synth, tokens) on a Ray cluster (needs .[scale])")


def run_from_args(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.name, args.recipe)
    out = args.out or args.work / "model"
    if args.scale == "tiny":
        if args.plan:
            raise UsageError("--plan is for --scale 7b; the tiny scale runs here")
        figures = run_tiny(recipe, args.work, out, args.smoke, args.quiet, args.ray)
        print(json.dumps({"model": str(out), "minutes": figures["minutes"],
                          "turn_taking": figures["turn_taking"]}, ensure_ascii=False))
        print(f"python app.py --model {out}")
        return 0
    steps = gpu_plan(gpu_recipe(recipe["7b"]), args.work, out, args.route,
                     item_flags=("--ray", args.ray) if args.ray else ())
    if args.plan:
        args.work.mkdir(parents=True, exist_ok=True)
        script = "#!/usr/bin/env bash\nset -euo pipefail\n" + "".join(f"{s.line()}\n" for s in steps)
        (args.work / "plan.sh").write_text(script)
        for step in steps:
            print(f"# {step.name}\n{step.line()}")
        return 0
    run_plan(steps, args.work, args.quiet)
    print(f"python app.py --model {out}")
    return 0
