"""The training half of the pipeline (agent/train stages 5-8) on the tiny model, end to end through the CLI:
an espeak-ng Telugu corpus -> ingest -> segment -> dialogues -> align -> tokenizer -> tokens -> train ->
export -> the app's loader. Training loss must fall clearly, a killed run must resume to the same
weights as an uninterrupted one, two torchrun processes must train, and the exported folder must load
and change what the model says.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agent.config import ModelConfig, SamplingConfig
from agent.models import load_model
from agent.tools.infer import infer
from agent.train.__main__ import main
from agent.train.tokens import END_OF_PADDING, TEXT_PADDING, text_stream
from agent.voices import EMOTION, SPEAKER
from conftest import espeak_telugu
from train_helpers import train_cli

ROOT = Path(__file__).resolve().parent.parent
_cli = functools.partial(train_cli, quiet=False)  # each call says --quiet itself where it wants it
CONFIGS = ROOT / "assets" / "train"
HAPPY, SAD = ["-p", "75", "-s", "190"], ["-p", "25", "-s", "130"]
SPEAKERS = {"kiran_te": ("te", "kiran"), "lakshmi_f3": ("te+f3", "lakshmi")}
# Small and fast: windows of 6 s, a LoRA of rank 8, a high learning rate.
FAST = ["--duration-sec", "6", "--batch-size", "4", "--lora-rank", "8", "--lr", "3e-3", "--quiet",
        "--no-gradient-checkpointing"]


def _metrics(run: Path, split: str = "train") -> list[dict]:
    import csv
    with (run / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Stages 1-6 on 16 Telugu utterances by two espeak voices in three emotions."""
    src, work = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("work")
    sentences = [line.strip() for line in (ROOT / "assets/telugu_sentences.txt").read_text(encoding="utf-8")
                 .splitlines() if line.strip()]
    rows = []
    for i, text in enumerate(sentences[:16]):
        speaker = list(SPEAKERS)[i % 2]
        emotion, flags = [("neutral", []), ("happy", HAPPY), ("sad", SAD)][i % 3]
        espeak_telugu(text, src / f"u{i}.wav", voice=SPEAKERS[speaker][0], extra=flags)
        rows.append({"path": f"u{i}.wav", "speaker": speaker, "emotion": emotion, "transcript": text,
                     "licence": "CC-BY-4.0 (synthetic test speech)"})
    (src / "corpus.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    (src / "extra.txt").write_text("\n".join(sentences[16:] + ["hello, how are you?", "the weather is nice"]),
                                   encoding="utf-8")
    voices = [x for s, (_, v) in SPEAKERS.items() for x in ("--agent-voice", f"{s}={v}")]
    _cli("ingest", "--out", str(work / "ingest"), "--manifest", str(src / "corpus.jsonl"), "--quiet")
    _cli("segment", "--in", str(work / "ingest/manifest.jsonl"), "--out", str(work / "segments"), "--quiet")
    _cli("dialogues", "--in", str(work / "segments/manifest.jsonl"), "--out", str(work / "dialogues"),
         "--count", "8", "--turns", "4:6", "--seed", "3", *voices, "--quiet")
    _cli("align", "--in", str(work / "dialogues/manifest.jsonl"), "--out", str(work / "align"), "--quiet")
    _cli("tokenizer", "--in", str(work / "align/manifest.jsonl"), "--text", str(src / "extra.txt"),
         "--out", str(work / "tokenizer"), "--vocab-size", "300", "--quiet")
    _cli("tokens", "--in", str(work / "align/manifest.jsonl"), "--out", str(work / "tokens"),
         "--tokenizer", str(work / "tokenizer/tokenizer.model"), "--quiet")
    return work


def _train(work: Path, out: Path, steps: int, *extra: str) -> Path:
    _cli("train", "--in", str(work / "tokens/manifest.jsonl"), "--out", str(out), "--tokenizer",
         str(work / "tokenizer/tokenizer.model"), "--max-steps", str(steps), "--log-every", "1", *FAST, *extra)
    return out


def test_text_stream_follows_moshi_finetune():
    # Word A (2 tokens) at 0.0 s, word B (3 tokens) at 0.4 s = frame 5, word C at 0.5 s = frame 6 cuts B short.
    stream = text_stream([([10, 11], 0.0), ([20, 21, 22], 0.4), ([30], 0.5)], 10)
    P, E = TEXT_PADDING, END_OF_PADDING
    assert stream == [10, 11, P, P, E, 20, 30, P, P, P]
    assert text_stream([], 4) == [P] * 4


@pytest.mark.slow
def test_tokens_hold_codes_text_and_conditions(data):
    info = json.loads((data / "tokens/tokens.json").read_text())
    records = [json.loads(x) for x in (data / "tokens/manifest.jsonl").read_text().splitlines()]
    assert len(records) == 8 and info["num_codebooks"] == 8
    for record in records:
        shard = load_file(str(data / "tokens" / record["path"]))
        assert shard["audio"].shape == (16, record["frames"]) and shard["text"].shape == (record["frames"],)
        assert abs(record["frames"] - record["duration"] * 12.5) <= 1
        text = shard["text"].tolist()
        assert sum(t not in (TEXT_PADDING, END_OF_PADDING) for t in text) == record["n_text_tokens"] > 0
        assert max(text) < info["text_vocab"]
        assert record["conditions"][SPEAKER] in ("kiran", "lakshmi")
        assert record["conditions"][EMOTION] in ("neutral", "happy", "sad")
        # The user channel is encoded too (a different voice speaks there), not copied from the agent's.
        assert not torch.equal(shard["audio"][:8], shard["audio"][8:])


@pytest.mark.slow
def test_train_loss_falls_and_export_loads_into_the_app(data, tmp_path, telugu_speech):
    run = _train(data, tmp_path / "run", 40, "--checkpoint-every", "20", "--eval-fraction", "0.2",
                 "--eval-every", "20")
    rows = _metrics(run)
    first, last = float(rows[0]["loss"]), np.mean([float(r["loss"]) for r in rows[-5:]])
    assert last < 0.6 * first, (first, last)
    evals = _metrics(run, "eval")
    assert len(evals) == 2 and float(evals[-1]["loss"]) < float(evals[0]["loss"]) * 1.05
    info = json.loads((run / "run.json").read_text())
    assert any("text vocabulary" in note for note in info["notes"])  # the Telugu tokenizer resized the LM

    _cli("export", "--in", str(run), "--out", str(tmp_path / "adapter"), "--dtype", "fp32", "--quiet")
    _cli("export", "--in", str(run), "--out", str(tmp_path / "fused"), "--fused", "--dtype", "fp32", "--quiet")
    config = json.loads((tmp_path / "adapter/config.json").read_text())
    assert config["lora"] is True and config["lora_name"] == "lora.safetensors"
    assert "lora" not in json.loads((tmp_path / "fused/config.json").read_text())
    provenance = json.loads((tmp_path / "adapter/training.json").read_text())
    assert provenance["data_licences"] == ["CC-BY-4.0 (synthetic test speech)"]
    # Trained from the random tiny model: no Kyutai weights inside, so not their licence
    assert provenance["weights_licence"].startswith("MIT") and "Kyutai)" not in provenance["weights_licence"]
    assert config["model_id"]["weights_licence"] == provenance["weights_licence"]  # carried to the next fine-tune

    _, audio = telugu_speech
    greedy = SamplingConfig(use_sampling=False)
    base = load_model(ModelConfig(model="tiny", device="cpu", dtype="float32"))
    adapter = load_model(ModelConfig(model=str(tmp_path / "adapter"), device="cpu", dtype="float32"))
    fused = load_model(ModelConfig(model=str(tmp_path / "fused"), device="cpu", dtype="float32"))
    assert adapter.lm.text_card == fused.lm.text_card == adapter.tokenizer.vocab_size() != base.lm.text_card
    assert adapter.condition_values[SPEAKER] == base.condition_values[SPEAKER]
    assert adapter.random_weights  # fine-tuned from the random tiny model: the UI must still say so
    conditions = {SPEAKER: "lakshmi", EMOTION: "happy"}
    out_base = infer(base, audio, greedy, conditions)
    out_adapter = infer(adapter, audio, greedy, conditions)
    out_fused = infer(fused, audio, greedy, conditions)
    assert out_adapter.text_tokens == out_fused.text_tokens  # folding the LoRA in changes nothing
    assert out_adapter.text_tokens != out_base.text_tokens or not np.allclose(out_adapter.pcm, out_base.pcm)
    # What the app loaded is the trained model: on a training dialogue its loss is the trained loss, far
    # below where training started (a loader that dropped the LoRA or the new text layers would not be).
    record = json.loads((data / "tokens/manifest.jsonl").read_text().splitlines()[0])
    losses = [_teacher_forced_loss(m.lm, data / "tokens" / record["path"], record["conditions"])
              for m in (adapter, fused)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert losses[0] < 0.7 * first, (losses, first)

    # The app's own command line accepts the folder.
    import app
    models, _, _ = app.configs(app.parse_args(["--model", str(tmp_path / "adapter")]))
    assert models[0].model == str(tmp_path / "adapter")


def _teacher_forced_loss(lm, shard_path: Path, conditions: dict) -> float:
    from agent.train.trainer import LossModule, TrainConfig
    shard = load_file(str(shard_path))
    codes = torch.cat([shard["text"][None, :75].long(), shard["audio"][:, :75].long()])[None]
    with torch.no_grad():
        return float(LossModule(lm, TrainConfig(inp=Path("-"), out=Path("-")))(codes, [conditions])["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 20])
def test_short_runs_train_whatever_their_length(data, tmp_path, steps):
    """OneCycleLR divides by its warm-up length minus one step: with pct_start 0.05, a 20-step run
    raised ZeroDivisionError; a 1-step run has no room for a warm-up at all."""
    run = _train(data, tmp_path / "run", steps)
    rows = _metrics(run)
    assert len(rows) == steps and all(np.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["lr"]) > 0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(data, tmp_path):
    steps = 16
    whole = _train(data, tmp_path / "whole", steps, "--checkpoint-every", "2")
    command = [sys.executable, "-m", "agent.train", "train", "--in", str(data / "tokens/manifest.jsonl"),
               "--out", str(tmp_path / "killed"), "--tokenizer", str(data / "tokenizer/tokenizer.model"),
               "--max-steps", str(steps), "--log-every", "1", "--checkpoint-every", "2", *FAST]
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed/checkpoints/step-000002").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (tmp_path / "killed/checkpoints").glob("step-*"))
    assert f"step-{steps:06d}" not in done, "the run finished before it could be killed"
    subprocess.run(command, cwd=ROOT, env=_env(), check=True, capture_output=True)
    a = load_file(str(whole / f"checkpoints/step-{steps:06d}/trainable.safetensors"))
    b = load_file(str(tmp_path / f"killed/checkpoints/step-{steps:06d}/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("step", "loss", "text_loss", "audio_loss", "lr", "grad_norm")
    assert [{k: r[k] for k in keep} for r in _metrics(whole)] == \
           [{k: r[k] for k in keep} for r in _metrics(tmp_path / "killed")]


def _torchrun(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "agent.train",
         "train", "--in", str(data / "tokens/manifest.jsonl"), "--out", str(out), "--tokenizer",
         str(data / "tokenizer/tokenizer.model"), "--max-steps", "8", "--log-every", "1", "--device", "cpu",
         *FAST, *extra], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_ddp_and_fsdp(data, tmp_path):
    """gloo on CPU: DDP (replicas) and FSDP (sharded) train the same model; a sharded run resumes exactly."""
    runs = {"ddp": (), "fsdp": ("--fsdp",)}
    for name, extra in runs.items():
        result = _torchrun(data, tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("train: step 8") == 1  # one summary line, from rank 0
        rows = _metrics(tmp_path / name)
        assert [int(r["step"]) for r in rows] == list(range(1, 9))  # one writer
        assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    ddp, fsdp = (load_file(str(tmp_path / n / "checkpoints/step-000008/trainable.safetensors")) for n in runs)
    assert ddp.keys() == fsdp.keys()
    assert max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp) < 1e-3  # same maths, other reduction order
    assert _torchrun(data, tmp_path / "paused", "--fsdp", "--stop-after", "3").returncode == 0
    assert _torchrun(data, tmp_path / "paused", "--fsdp").returncode == 0
    resumed = load_file(str(tmp_path / "paused/checkpoints/step-000008/trainable.safetensors"))
    assert all(torch.equal(fsdp[k], resumed[k]) for k in fsdp)


@pytest.mark.slow
def test_stage_configs_chain_adaptation_to_voices(data, tmp_path):
    """The three shipped stage configs run in order, each starting from the previous stage's fused export."""
    previous = "tiny"
    for name in ("telugu_adaptation", "conversation", "voice_emotion"):
        run = _train(data, tmp_path / name, 4, "--config", str(CONFIGS / f"{name}.json"), "--model", previous,
                     "--checkpoint-every", "4", "--eval-every", "100")
        info = json.loads((run / "run.json").read_text())
        assert info["config"]["use_conditions"] == (name == "voice_emotion")
        _cli("export", "--in", str(run), "--out", str(tmp_path / f"{name}-export"), "--fused", "--quiet")
        previous = str(tmp_path / f"{name}-export")
    model = load_model(ModelConfig(model=previous, device="cpu", dtype="float32"))
    assert set(model.condition_values) == {SPEAKER, EMOTION}


def _refused(capsys, *argv: str) -> str:
    """A usage problem ends the stage with exit status 2 and one `error:` line naming it."""
    capsys.readouterr()
    assert main([*argv]) == 2
    return capsys.readouterr().err


@pytest.mark.slow
def test_bad_inputs_are_clear(data, tmp_path, capsys):
    train = ["train", "--in", str(data / "tokens/manifest.jsonl"), "--max-steps", "2", *FAST]
    # Shards made with one tokenizer cannot train with another (the text ids would mean other words).
    other = tmp_path / "other.model"
    other.write_bytes(_tiny_tokenizer_bytes())
    assert "pass the same --tokenizer" in _refused(capsys, *train, "--out", str(tmp_path / "x"),
                                                   "--tokenizer", str(other))
    # A run folder holding another run's settings is not silently mixed with a new one.
    _train(data, tmp_path / "one", 2)
    assert "other settings" in _refused(capsys, *train, "--out", str(tmp_path / "one"), "--lr", "1e-5",
                                        "--tokenizer", str(data / "tokenizer/tokenizer.model"))
    assert "beyond the model's context" in _refused(
        capsys, *train, "--out", str(tmp_path / "long"), "--tokenizer", str(data / "tokenizer/tokenizer.model"),
        "--duration-sec", "600")
    # A missing WAV and a malformed manifest line are skipped with report lines; the stage goes on.
    align = tmp_path / "align"
    align.mkdir()
    lines = (data / "align/manifest.jsonl").read_text().splitlines()
    broken = json.loads(lines[0]) | {"id": "gone", "path": "data/gone.wav"}
    (align / "manifest.jsonl").write_text("\n".join([json.dumps(broken), lines[1], "{not json"]) + "\n")
    (align / "data").symlink_to(data / "align/data")
    _cli("tokens", "--in", str(align / "manifest.jsonl"), "--out", str(tmp_path / "tokens"),
         "--tokenizer", str(data / "tokenizer/tokenizer.model"), "--quiet")
    report = [json.loads(x) for x in (tmp_path / "tokens/report.jsonl").read_text().splitlines()]
    reasons = {r["item"]: r["reason"] for r in report if r["action"] == "skipped"}
    assert "audio file not found" in reasons["gone"] and any("malformed" in r for r in reasons.values())
    assert len((tmp_path / "tokens/manifest.jsonl").read_text().splitlines()) == 1


def _tiny_tokenizer_bytes() -> bytes:
    from agent.models import tiny_tokenizer_path
    return tiny_tokenizer_path().read_bytes()


def test_export_licence_follows_the_base():
    """Exported weights inherit their base's licence: Kyutai's CC-BY for their checkpoints, MIT for
    random initialisation, what a base folder states, PersonaPlex's for PersonaPlex."""
    from dataclasses import replace

    from agent.train.export import KYUTAI_LICENCE, PERSONAPLEX_LICENCE, RANDOM_INIT_LICENCE, weights_licence
    tiny = load_model(ModelConfig(model="tiny", device="cpu", dtype="float32"))
    assert weights_licence(tiny) == RANDOM_INIT_LICENCE
    assert weights_licence(replace(tiny, random_weights=False)) == KYUTAI_LICENCE
    assert weights_licence(replace(tiny, random_weights=False, weights_licence="Apache-2.0")) == "Apache-2.0"
    assert weights_licence(replace(tiny, takes_prompts=True)) == PERSONAPLEX_LICENCE
