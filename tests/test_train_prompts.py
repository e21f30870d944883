"""Prompted training (issue 12: "training keeps the prompting"): a PersonaPlex-layout checkpoint
(`tiny-personaplex`) fine-tuned on synth dialogues with each dialogue's voice + text prompt before every
window, the loss masked over the prompt; the export loads as PersonaPlex again and still takes prompts.

Real parts throughout: espeak-ng's Telugu voices for the synth set, the serving code's PromptBuilder,
moshi's LM, the pipeline's own command line, the app's loader and `agent.tools.infer`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from agent.config import TINY_PERSONAPLEX_MODEL, ModelConfig
from agent.engine.prompts import PromptSpec
from agent.models import load_model, tiny_personaplex_folder
from agent.models.personaplex import depformer_steps
from agent.train.common import UsageError
from train_helpers import read_jsonl as _jsonl
from train_helpers import train_cli as _cli

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "assets" / "train" / "personaplex_prompted.json"
FAST = ["--max-steps", "2", "--batch-size", "2", "--duration-sec", "4", "--lora-rank", "4", "--checkpoint-every", "2",
        "--eval-every", "2", "--no-gradient-checkpointing", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """A small synth set (3 short dialogues, espeak-ng) through tokens: its manifest.jsonl."""
    work = tmp_path_factory.mktemp("prompted")
    _cli("script", "--sentences", str(ROOT / "assets" / "telugu_sentences.txt"), "--count", "3", "--seed", "3",
         "--turns", "2:3", "--out", str(work / "script"))
    _cli("synth", "--in", str(work / "script"), "--tts", "espeak", "--out", str(work / "synth"))
    _cli("tokens", "--in", str(work / "synth" / "manifest.jsonl"), "--model", TINY_PERSONAPLEX_MODEL,
         "--out", str(work / "tokens"))
    return work / "tokens" / "manifest.jsonl"


def _prompted_model_and_windows(manifest: Path):
    """What a prompted run builds: the train model and its windows (with the prompts built once)."""
    from agent.train.records import TokenRecord
    from agent.train.trainer import TrainConfig, build_train_model
    from agent.train.trainer.loop import build_windows
    config = TrainConfig(inp=manifest, out=manifest.parent / "unused", model=TINY_PERSONAPLEX_MODEL, prompts=True,
                         add_conditioners=False, train_conditioners=False, use_conditions=False, lora_rank=4,
                         duration_sec=4, eval_fraction=0.0, gradient_checkpointing=False)
    model = build_train_model(config, torch.device("cpu"), torch.float32)
    info = json.loads((manifest.parent / "tokens.json").read_text())
    records = [TokenRecord(**line) for line in _jsonl(manifest)]
    _, _, windows, _ = build_windows(config, model, info, records)
    return config, model, windows


def test_tokens_keep_each_dialogues_prompt(tokens):
    records = _jsonl(tokens)
    assert len(records) == 3
    for record in records:
        assert record["persona"] and record["voice_prompt"] == f"prompts/{record['id']}.wav"
        audio, rate = sf.read(tokens.parent / record["voice_prompt"])
        assert rate == 24_000 and audio.size > 24_000 * 0.5


@pytest.mark.slow
def test_prompted_windows_start_with_the_serving_prompt_sequence(tokens):
    from agent.engine.prompts import PromptBuilder
    _, model, windows = _prompted_model_and_windows(tokens)
    batch = windows.batch([0, 1, 2])
    serving = PromptBuilder(load_model(ModelConfig(model=TINY_PERSONAPLEX_MODEL, device="cpu", dtype="float32")))
    for b, k in enumerate([0, 1, 2]):
        i = windows.sample(k)
        record = windows.records[windows.index[i][0]]
        frames = serving.frames(PromptSpec(str(tokens.parent / record.voice_prompt), record.persona))
        p = int(batch.prompt_frames[b])
        assert p == len(frames) > frames.voice_frames + frames.text_tokens > 0
        codes = batch.codes[b]
        # the prompt is exactly what a call with this voice and persona is served with...
        assert torch.equal(codes[0, :p], torch.from_numpy(frames.text))
        assert torch.equal(codes[1:9, :p], torch.from_numpy(frames.agent.T))
        assert torch.equal(codes[9:, :p], torch.from_numpy(frames.user.T))
        # ...followed at once by the conversation window, and a shorter row ends in zero_token (no input, no loss)
        window, _ = windows.window(i)
        assert torch.equal(codes[:, p:p + windows.frames], window)
        assert (codes[:, p + windows.frames:] == model.lm.zero_token_id).all()
    # built once per dialogue: the same tensor every time a dialogue's windows come up
    assert windows.prompt(0) is windows.prompt(0)


@pytest.mark.slow
def test_prompt_positions_are_masked_out_of_the_loss(tokens):
    from agent.train.trainer import LossModule
    config, model, windows = _prompted_model_and_windows(tokens)
    batch = windows.batch([0, 1])
    module = LossModule(model.lm, config)
    with torch.no_grad():
        out = model.lm(batch.codes)  # one forward: only the targets change below, never the inputs
    p = int(batch.prompt_frames.min())
    assert p > 0

    def loss(targets: torch.Tensor, prompt_frames: torch.Tensor | None) -> float:
        return float(module.losses(out, targets, prompt_frames)["loss"])

    other_prompt = batch.codes.clone()
    rng = torch.Generator().manual_seed(0)
    other_prompt[:, 0, :p] = torch.randint(4, 64, (2, p), generator=rng)  # other text and audio tokens
    other_prompt[:, 1:9, :p] = torch.randint(0, 64, (2, 8, p), generator=rng)
    assert not torch.equal(other_prompt, batch.codes)
    masked = loss(batch.codes, batch.prompt_frames)
    assert loss(other_prompt, batch.prompt_frames) == masked  # prompt targets count for nothing
    # counter-checks: without the mask the same change moves the loss, and a conversation target moves it
    assert loss(other_prompt, None) != loss(batch.codes, None)
    other_window = batch.codes.clone()
    other_window[:, 1:9, p + 2:p + 6] = torch.randint(0, 64, (2, 8, 4), generator=rng)
    assert loss(other_window, batch.prompt_frames) != masked
    # and forward() with the batch's prompt lengths is that masked loss
    with torch.no_grad():
        assert float(module(batch.codes, batch.conditions, batch.prompt_frames)["loss"]) == pytest.approx(masked)


@pytest.mark.slow
def test_prompted_training_exports_a_personaplex_that_still_takes_prompts(tokens, tmp_path):
    run, folder = tmp_path / "run", tmp_path / "model"
    _cli("train", "--config", str(STAGE), "--in", str(tokens), "--out", str(run), "--model", TINY_PERSONAPLEX_MODEL,
         *FAST)
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["prompts"] is True
    assert any(n.startswith("prompts: 3 dialogues (3 with a voice clip, 3 with a persona)") for n in info["notes"])
    _cli("export", "--in", str(run), "--out", str(folder), "--dtype", "fp32")

    # PersonaPlex's layout again: the 16-step depformer (its user steps restored from the base) and its voices
    weights, base = load_file(str(folder / "model.safetensors")), load_file(str(tiny_personaplex_folder() /
                                                                              "model.safetensors"))
    assert depformer_steps(weights) == depformer_steps(base) == 16
    assert weights.keys() == base.keys()
    assert torch.equal(weights["linears.12.weight"], base["linears.12.weight"])
    stacked = "depformer.layers.0.self_attn.in_proj_weight"
    assert torch.equal(weights[stacked][weights[stacked].shape[0] // 2:], base[stacked][base[stacked].shape[0] // 2:])
    loaded = load_model(ModelConfig(model=str(folder), device="cpu", dtype="float32"))
    assert loaded.takes_prompts and set(loaded.preset_voices) == {"NATF0", "NATF1", "NATM0", "NATM1"}
    assert loaded.random_weights  # fine-tuned from random weights: still said plainly

    # Loading trims it back to exactly the trained model (the LoRA folded in).
    from moshi.modules.lora import replace_lora_with_linear

    from agent.train.export import run_train_config
    from agent.train.trainer import build_train_model, latest_checkpoint, load_trainable
    trained = build_train_model(run_train_config(run), torch.device("cpu"), torch.float32)
    load_trainable(trained.lm, latest_checkpoint(run))
    replace_lora_with_linear(trained.lm)
    expected, got = trained.lm.state_dict(), loaded.lm.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k].float(), got[k].float()) for k in expected)

    # It takes prompts where a call starts: agent.tools.infer with a preset voice and a persona, and a WAV voice.
    speech = tmp_path / "in.wav"
    t = np.arange(24_000) / 24_000
    sf.write(speech, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 24_000)
    from agent.tools import infer
    for voice in ("NATF0", str(tokens.parent / _jsonl(tokens)[0]["voice_prompt"])):
        out = tmp_path / "out.wav"
        assert infer.main(["--model", str(folder), "--device", "cpu", "--greedy", "--voice-prompt", voice,
                           "--text-prompt", "మీరు ఒక సహాయకుడు.", str(speech), str(out)]) == 0
        assert sf.info(str(out)).frames > 0


def test_prompted_training_refuses_a_base_without_prompts(tokens, tmp_path):
    from agent.train.trainer import TrainConfig, run_train
    with pytest.raises(UsageError, match="takes no voice or text prompt"):
        run_train(TrainConfig(inp=tokens, out=tmp_path / "run", model="tiny", prompts=True, add_conditioners=False,
                              max_steps=1, batch_size=1, duration_sec=2, lora_rank=2, quiet=True))
    with pytest.raises(UsageError, match="no-add-conditioners"):
        run_train(TrainConfig(inp=tokens, out=tmp_path / "run2", model=TINY_PERSONAPLEX_MODEL, prompts=True,
                              max_steps=1, batch_size=1, duration_sec=2, lora_rank=2, quiet=True))


@pytest.mark.slow
def test_prompted_run_paused_and_resumed_ends_where_a_whole_run_ends(tokens, tmp_path):
    """The prompts are rebuilt on resume from the same clips: a paused run ends bit-identical."""
    argv = ["train", "--config", str(STAGE), "--in", str(tokens), "--model", TINY_PERSONAPLEX_MODEL, *FAST,
            "--max-steps", "3", "--checkpoint-every", "1", "--lr", "1e-2"]
    _cli(*argv, "--out", str(tmp_path / "whole"))
    _cli(*argv, "--out", str(tmp_path / "paused"), "--stop-after", "1")
    _cli(*argv, "--out", str(tmp_path / "paused"))
    whole, resumed = (load_file(str(tmp_path / run / "checkpoints" / "step-000003" / "trainable.safetensors"))
                      for run in ("whole", "paused"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert any(k.endswith("lora_B.weight") and whole[k].abs().max() > 0 for k in whole)  # it did train
