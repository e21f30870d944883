"""Model loading: the tiny model, and clear errors where a checkpoint cannot be had."""

import subprocess
import sys

import pytest
import sentencepiece
import torch

from agent.config import ModelConfig
from agent.errors import ModelLoadError
from agent.models import load_model, resolve_dtype, tiny_tokenizer_path
from agent.models.tiny import TOKENIZER_CORPUS


def test_tiny_model_is_real_moshi_with_real_framing():
    model = load_model(ModelConfig(model="tiny", device="cpu"))
    assert model.random_weights and "RANDOM WEIGHTS" in model.description
    assert model.mimi.sample_rate == 24_000 and model.mimi.frame_rate == 12.5
    assert model.mimi.frame_size == 1920
    assert model.lm.dep_q == 8 and model.lm.n_q == 16  # Moshi's 8 agent + 8 user codebooks
    assert model.lm.text_card == model.tokenizer.vocab_size()
    assert model.dtype == torch.float32  # CPU default


def test_tiny_model_is_seeded():
    a = load_model(ModelConfig(model="tiny", device="cpu", seed=7))
    b = load_model(ModelConfig(model="tiny", device="cpu", seed=7))
    c = load_model(ModelConfig(model="tiny", device="cpu", seed=8))
    wa, wb, wc = (m.lm.text_linear.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tokenizer_decodes_telugu_and_hides_padding():
    model = load_model(ModelConfig(model="tiny", device="cpu"))
    ids = model.tokenizer.encode("నమస్కారం మీరు")
    text = "".join(model.decode_text(i) for i in ids)
    assert text.strip() == "నమస్కారం మీరు"
    assert model.decode_text(0) == model.decode_text(3) == model.decode_text(-2) == ""


def test_tiny_tokenizer_is_cached_by_content(tmp_path, monkeypatch):
    """Trained once per corpus: the same corpus reuses the file, a changed one is not served the stale one."""
    first = tiny_tokenizer_path(tmp_path)
    assert first.is_file() and first.parent == tmp_path

    def train(**_):
        raise AssertionError("trained again")

    monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "train", train)
    assert tiny_tokenizer_path(tmp_path) == first  # no training: the cached file
    changed = tmp_path / "corpus.txt"
    changed.write_bytes(TOKENIZER_CORPUS.read_bytes() + "కొత్త వాక్యం\n".encode())
    with pytest.raises(AssertionError, match="trained again"):
        tiny_tokenizer_path(tmp_path, corpus=changed)


def test_unknown_dtype_and_bad_spec():
    with pytest.raises(ModelLoadError, match="--dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="neither a folder nor"):
        load_model(ModelConfig(model="./no/such/folder", device="cpu"))


@pytest.mark.slow
def test_failed_download_names_the_way_out(monkeypatch, tmp_path):
    """No hub is reachable here: the real download path must end in a clear message."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model="kyutai/moshiko-pytorch-bf16", device="cpu"))
    message = str(info.value)
    assert "--model tiny" in message and "HF_HOME" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.slow
def test_app_exits_cleanly_when_the_model_cannot_be_had(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "NO_TORCH_COMPILE": "1"}
    proc = subprocess.run([sys.executable, "app.py", "--model", "kyutai/moshiko-pytorch-bf16", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "--model tiny" in proc.stderr and "Traceback" not in proc.stderr
