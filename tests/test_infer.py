"""`agent.tools.infer` on a Kyutai-layout checkpoint folder, against moshi's own inference loop.

The folder is written here from the tiny model (its Mimi codebooks fitted so it hears its input,
see agent.models.build_tiny; its LM has the speaker/emotion conditioners). The reference loads the folder
independently through `moshi.models.loaders.CheckpointInfo` and runs the loop of
`moshi.run_inference` with greedy sampling and the same condition tensors. Two differences from
run_inference itself, which cannot run this folder as it is: it refuses conditioned models that are
not Hibiki, and it steps the first frame twice; the engine, like a live call, steps each frame once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from moshi.conditioners import ConditionAttributes
from moshi.models import loaders
from moshi.models.lm import LMGen

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.audio.files import read_audio as read_wav
from agent.audio.stream import resample
from agent.config import ModelConfig
from agent.errors import ModelLoadError
from agent.models import load_model, tiny_lm_kwargs, tiny_mimi_config, tiny_tokenizer_path, write_checkpoint_folder
from agent.tools.infer import infer, main
from conftest import tiny_model
from tiny_helpers import GREEDY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = tiny_model()
    lm_kwargs = tiny_lm_kwargs(text_card=model.tokenizer.vocab_size())
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny-te"
    return write_checkpoint_folder(model, folder, lm_kwargs, tiny_mimi_config(), tiny_tokenizer_path())


VOICE = {"speaker": "ravi", "emotion": "sad"}  # not the engine's default voice


def moshi_reference(folder: Path, audio: np.ndarray, conditions: dict[str, str]) -> tuple[np.ndarray, list[int]]:
    """moshi.run_inference's loop, batch 1, greedy, on the folder loaded by moshi's own loader."""
    info = loaders.CheckpointInfo.from_hf_repo(
        str(folder), moshi_weights=folder / "model.safetensors", mimi_weights=folder / "mimi.safetensors",
        tokenizer=folder / "tokenizer.model", config_path=folder / "config.json",
        mimi_config_path=folder / "mimi_config.json")
    mimi = info.get_mimi(device="cpu")
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    condition_tensors = lm.condition_provider.prepare_and_provide([ConditionAttributes(text=dict(conditions))])
    lm_gen = LMGen(lm, use_sampling=False, condition_tensors=condition_tensors)
    mimi.streaming_forever(1)
    lm_gen.streaming_forever(1)
    padded = np.pad(audio, (0, -audio.size % FRAME_SIZE))  # the last partial frame, zero-padded
    pcm, tokens = [], []
    with torch.no_grad():
        for chunk in torch.from_numpy(padded).split(FRAME_SIZE):
            codes = mimi.encode(chunk[None, None])
            out = lm_gen.step(codes)
            if out is None:  # the acoustic delay: nothing for the first frame
                continue
            pcm.append(mimi.decode(out[:, 1:])[0, 0].numpy())
            tokens.append(int(out[0, 0, 0]))
    return np.concatenate(pcm), tokens


@pytest.mark.slow
def test_infer_matches_moshi_inference_loop(checkpoint, telugu_speech):
    _, audio = telugu_speech
    audio = audio[: int(3.3 * SAMPLE_RATE)]  # 3.3 s: ends in a partial frame
    assert audio.size % FRAME_SIZE
    result = infer(load_model(ModelConfig(model=str(checkpoint), device="cpu")), audio, GREEDY, VOICE)
    ref_pcm, ref_tokens = moshi_reference(checkpoint, audio, VOICE)

    n_frames = -(-audio.size // FRAME_SIZE)
    assert len(result.text_tokens) == n_frames and result.pcm.shape == (n_frames * FRAME_SIZE,)
    # The engine answers every input frame; the first answer is silence with token -2 (the delay
    # for which moshi's loop returns None), so the engine's frame k+1 is the loop's frame k.
    assert result.text_tokens[0] == -2 and not result.pcm[:FRAME_SIZE].any()
    assert result.text_tokens[1:] == ref_tokens
    np.testing.assert_array_equal(result.pcm[FRAME_SIZE:], ref_pcm)
    assert len(set(ref_tokens)) > 2  # a reply that follows its input, not one repeated token
    model = load_model(ModelConfig(model=str(checkpoint), device="cpu"))
    assert result.text == "".join(model.decode_text(t) for t in ref_tokens).strip() != ""


@pytest.mark.slow
def test_cli_reads_any_wav_and_writes_audio_and_text(checkpoint, telugu_speech, tmp_path):
    _, audio = telugu_speech
    audio = audio[: 2 * SAMPLE_RATE]
    at_16k = resample(audio, SAMPLE_RATE, 16_000)
    wav_in, wav_out = tmp_path / "in-16k-stereo.wav", tmp_path / "out.wav"
    sf.write(wav_in, np.stack([at_16k, 0.5 * at_16k], axis=1), 16_000, subtype="PCM_16")

    # One intra-op thread on both sides: float sums in another order differ in the last bits, and an
    # earlier test (or an in-process server) may have changed this process's thread count.
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "agent.tools.infer", "--model", str(checkpoint), "--greedy",
                           "--device", "cpu", "--voice", "kiran", str(wav_in), str(wav_out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr

    def in_process(conditions: dict[str, str]):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return infer(load_model(ModelConfig(model=str(checkpoint), device="cpu")), read_wav(wav_in), GREEDY,
                         conditions)
        finally:
            torch.set_num_threads(threads)

    expected = in_process({"speaker": "kiran", "emotion": "neutral"})  # --voice kiran, the default emotion
    assert expected.text_tokens != in_process({"speaker": "lakshmi", "emotion": "neutral"}).text_tokens
    out, rate = sf.read(wav_out, dtype="float32")
    assert rate == SAMPLE_RATE and out.ndim == 1
    assert out.size == expected.pcm.size == -(-read_wav(wav_in).size // FRAME_SIZE) * FRAME_SIZE
    np.testing.assert_allclose(out, expected.pcm, rtol=0, atol=1e-6)
    text = wav_out.with_suffix(".txt").read_text(encoding="utf-8").strip()
    assert text == proc.stdout.strip() == expected.text != ""


def test_load_model_reads_the_folder(checkpoint):
    model = load_model(ModelConfig(model=str(checkpoint), device="cpu"))
    written = tiny_model()
    assert not model.random_weights and model.name == checkpoint.name and "trained" in model.description
    assert model.lm.text_card == model.tokenizer.vocab_size()
    for (name, got), want in zip(model.lm.state_dict().items(), written.lm.state_dict().values()):
        assert torch.equal(got, want), name
    for (name, got), want in zip(model.mimi.state_dict().items(), written.mimi.state_dict().values()):
        assert torch.equal(got, want), name  # the fitted codebooks included


def test_folder_naming_a_missing_file_is_a_clear_error(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["mimi_name"] = "gone.safetensors"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="mimi_name names 'gone.safetensors'"):
        load_model(ModelConfig(model=str(broken), device="cpu"))
    assert main(["--model", str(broken), "--device", "cpu", "in.wav", str(tmp_path / "out.wav")]) == 2
    assert main(["--model", str(checkpoint), "--voice", "nobody", "in.wav", str(tmp_path / "out.wav")]) == 2
    assert not (tmp_path / "out.wav").exists()
