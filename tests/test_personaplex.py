"""PersonaPlex checkpoints on stock moshi: the 16-step depformer, the gated hub repo, preset voices."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import pytest
import torch
from moshi.models import loaders

from agent.config import ModelConfig
from agent.errors import ModelLoadError
from agent.models import load_checkpoint, load_model, personaplex, tiny_personaplex_folder, write_checkpoint_folder


@pytest.fixture(scope="module")
def persona_folder(tmp_path_factory):
    return tiny_personaplex_folder(cache_dir=tmp_path_factory.mktemp("persona"))


def test_persona_folder_is_recognised_by_its_16_step_depformer(persona_folder):
    keys = personaplex.weight_keys(persona_folder / "model.safetensors")
    assert personaplex.depformer_steps(keys) == 16
    config = json.loads((persona_folder / "config.json").read_text())
    assert config["dep_q"] == 8
    # the check can fail: stock moshi's own loader refuses these weights
    info = loaders.CheckpointInfo.from_hf_repo(str(persona_folder), persona_folder / "model.safetensors",
                                               persona_folder / "mimi.safetensors", persona_folder / "tokenizer.model",
                                               persona_folder / "config.json", persona_folder / "mimi_config.json")
    with pytest.raises(RuntimeError):
        info.get_moshi(device="cpu", dtype=torch.float32)
    model = load_checkpoint(str(persona_folder), torch.device("cpu"), torch.float32)
    assert model.takes_prompts and model.lm.dep_q == 8
    assert sorted(model.preset_voices) == ["NATF0", "NATF1", "NATM0", "NATM1"]
    assert model.random_weights  # built from random weights: the page and the log say so


def test_persona_trimmed_depformer_gives_the_agent_codebooks_unchanged(persona_folder):
    """Dropping steps 8-15 leaves steps 0-7 exactly as the 16-step depformer computes them."""
    from safetensors.torch import load_file

    raw = load_file(str(persona_folder / "model.safetensors"))
    config = json.loads((persona_folder / "config.json").read_text())
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "model_id"):
        config.pop(key)
    lm16 = loaders.get_moshi_lm(None, lm_kwargs=dict(copy.deepcopy(config), dep_q=16, depformer_context=16),
                                device="cpu", dtype=torch.float32)
    lm16.load_state_dict(raw)
    lm8 = load_checkpoint(str(persona_folder), torch.device("cpu"), torch.float32).lm
    torch.manual_seed(0)
    out = torch.randn(2, 1, lm8.dim)
    prev = torch.tensor([[[5]], [[7]]])
    with torch.no_grad(), lm16.depformer.streaming(2), lm8.depformer.streaming(2):
        for cb in range(8):
            a, b = lm16.forward_depformer(cb, prev, out), lm8.forward_depformer(cb, prev, out)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # same maths; the 16-step ring is longer
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            prev = a.argmax(-1)


def test_persona_moshiko_folders_keep_loading_unprompted(tmp_path):
    tiny = load_model(ModelConfig(model="tiny", device="cpu"))
    folder = write_checkpoint_folder(tiny, tmp_path / "moshiko-like", tiny.lm_config, tiny.mimi_config,
                                     tiny.tokenizer_path)
    model = load_checkpoint(str(folder), torch.device("cpu"), torch.float32)
    assert not model.takes_prompts and model.preset_voices == {}


@pytest.mark.parametrize("token, expected", [(None, "HF_TOKEN is not set"), ("hf_x", "HF_TOKEN is set")])
def test_persona_hub_repo_gated_says_accept_the_licence_and_token(monkeypatch, token, expected):
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)

    def gated(repo, name, **_):
        raise GatedRepoError(f"Access to model {repo} is restricted")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", gated)
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=personaplex.PERSONAPLEX_REPO, device="cpu"))
    assert "accept the NVIDIA Open Model License" in str(info.value) and expected in str(info.value)


def test_persona_hub_repo_offline_names_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_model(ModelConfig(model=personaplex.PERSONAPLEX_REPO, device="cpu"))


def test_persona_preset_voices_unpack_from_the_archive_and_nothing_else(tmp_path):
    with tarfile.open(tmp_path / "voices.tgz", "w:gz") as tar:
        for name in ("voices/NATF2.pt", "voices/NATM1.wav", "voices/NATM1.pt", "../evil.pt", "other/x.wav"):
            data = b"x"
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    found = personaplex.preset_voices(tmp_path)
    assert sorted(found) == ["NATF2", "NATM1"] and found["NATM1"].suffix == ".pt"
    assert not (tmp_path.parent / "evil.pt").exists() and not (tmp_path / "other").exists()


def test_persona_folder_whose_config_says_16_steps_loads_the_agents_8(persona_folder, tmp_path):
    """A config written for PersonaPlex's fork (dep_q = n_q = 16) would make stock moshi expect no user
    codebooks at all: the agent's 8 steps are loaded instead."""
    import shutil

    folder = tmp_path / "fork-config"
    shutil.copytree(persona_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, dep_q=16, depformer_context=16)))
    model = load_checkpoint(str(folder), torch.device("cpu"), torch.float32)
    assert model.takes_prompts and model.lm.dep_q == 8 and model.lm.num_codebooks == 17
