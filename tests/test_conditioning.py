"""Voices and emotions as LUT conditioning inside the LM: one batch, a condition row per seat."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch

from agent import FRAME_SIZE
from agent.config import EngineConfig, ModelConfig, SamplingConfig
from agent.engine import FrameEngine
from agent.errors import ConditionError, ModelLoadError
from agent.models import load_model, tiny_lm_kwargs, tiny_mimi_config, tiny_tokenizer_path, write_checkpoint_folder
from agent.voices import load_catalogue

GREEDY = SamplingConfig(use_sampling=False)


def speechlike(n_frames: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * FRAME_SIZE) / 24_000
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)
    return [audio[i * FRAME_SIZE:(i + 1) * FRAME_SIZE].astype(np.float32) for i in range(n_frames)]


def run(engine: FrameEngine, n_frames: int, switch: dict[int, tuple[int, dict]] | None = None,
        seats: int = 2) -> list[list[tuple[int, bytes]]]:
    """Feed the same input to `seats` seats; optionally change a seat's conditions at a frame.
    Returns per seat the (text token, audio bytes) of every output frame."""
    held = [engine.acquire(f"caller-{i}") for i in range(seats)]
    outputs: list[list[tuple[int, bytes]]] = [[] for _ in held]
    for k, frame in enumerate(speechlike(n_frames)):
        for index, (at, conditions) in (switch or {}).items():
            if k == at:
                held[index].set_conditions(conditions)
        for seat in held:
            seat.push(frame)
        engine.step_once()
        for i, seat in enumerate(held):
            out = seat.pull()
            outputs[i].append((out.text_token, out.pcm.tobytes()))
    for seat in held:
        seat.release()
    return outputs


def engine(seed: int = 3, sampling: SamplingConfig = GREEDY, seats: int = 2) -> FrameEngine:
    return FrameEngine(load_model(ModelConfig(model="tiny", device="cpu", seed=seed)),
                       EngineConfig(max_sessions=seats), sampling)


def test_tiny_model_has_the_catalogues_conditioners():
    catalogue = load_catalogue()
    values = load_model(ModelConfig(model="tiny", device="cpu")).condition_values
    assert values == {"speaker": [v.id for v in catalogue.voices], "emotion": [e.id for e in catalogue.emotions]}


def test_changing_one_calls_voice_changes_only_that_call():
    base = run(engine(), 12)
    switched = run(engine(), 12, switch={0: (4, {"speaker": "ravi", "emotion": "angry"})})
    assert switched[1] == base[1], "another call's output changed"
    assert switched[0][:4] == base[0][:4], "frames before the change must not change"
    assert switched[0][4:] != base[0][4:], "the new voice did not reach the LM"
    assert [t for t, _ in switched[0][4:]] != [t for t, _ in base[0][4:]], "the call's tokens did not change"


def test_same_voice_and_seed_reproduce_the_same_tokens():
    sampling = SamplingConfig()  # real sampling, seeded
    results = []
    for _ in range(2):
        eng = engine(sampling=sampling)
        torch.manual_seed(99)
        results.append(run(eng, 8, switch={0: (0, {"speaker": "kiran"}), 1: (0, {"speaker": "sravani"})}))
    assert results[0] == results[1]
    assert results[0][0] != results[0][1]  # two voices, same input: different output


def test_unknown_condition_values_are_refused_clearly():
    eng = engine()
    seat = eng.acquire("x")
    with pytest.raises(ConditionError, match="not one this model was trained with"):
        seat.set_conditions({"speaker": "nobody"})
    with pytest.raises(ConditionError, match="no 'accent' conditioning"):
        seat.set_conditions({"accent": "coastal"})
    seat.release()


def unconditioned_folder(folder, seed: int = 11):
    """A checkpoint folder shaped like Kyutai's released Moshiko/Moshika: an LM with no conditioners."""
    from moshi.models import loaders
    plain = load_model(ModelConfig(model="tiny", device="cpu", seed=seed))
    kwargs = tiny_lm_kwargs(text_card=plain.tokenizer.vocab_size(), conditioned=False)
    torch.manual_seed(seed)
    plain.lm = loaders.get_moshi_lm(None, lm_kwargs=json.loads(json.dumps(kwargs)), device="cpu", dtype=torch.float32)
    return write_checkpoint_folder(plain, folder, kwargs, tiny_mimi_config(), tiny_tokenizer_path())


@pytest.mark.slow
def test_unconditioned_checkpoint_ignores_conditions(tmp_path):
    """Like Kyutai's released Moshiko/Moshika: no conditioners, so nothing to set and nothing claimed."""
    folder = unconditioned_folder(tmp_path / "plain")
    loaded = load_model(ModelConfig(model=str(folder), device="cpu"))
    assert loaded.condition_values == {}
    eng = FrameEngine(loaded, EngineConfig(max_sessions=1), GREEDY)
    seat = eng.acquire("x")
    seat.set_conditions({"speaker": "ravi"})  # no-op, no error
    assert seat.conditions == {}
    seat.release()


def test_conditioned_checkpoint_roundtrip_and_missing_conditioner_weights(tmp_path):
    model = load_model(ModelConfig(model="tiny", device="cpu", seed=5))
    spm = tiny_tokenizer_path()
    kwargs = tiny_lm_kwargs(text_card=model.tokenizer.vocab_size())
    folder = write_checkpoint_folder(model, tmp_path / "cond", kwargs, tiny_mimi_config(), spm)
    loaded = load_model(ModelConfig(model=str(folder), device="cpu"))
    assert loaded.condition_values == model.condition_values and not loaded.random_weights
    for key, value in model.lm.state_dict().items():
        assert torch.equal(value, loaded.lm.state_dict()[key]), key

    # weights saved without the conditioner tables, config still declaring them: a clear error
    from safetensors.torch import load_file, save_file
    state = {k: v for k, v in load_file(folder / "model.safetensors").items()
             if not k.startswith("condition_provider.")}
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="conditioner weights"):
        load_model(ModelConfig(model=str(folder), device="cpu"))


def test_moshiko_and_moshika_together_route_calls_by_voice(tmp_path, telugu_speech, caplog):
    """Two unconditioned checkpoints (local copies named like Kyutai's repos): each call goes to the
    model whose fixed voice it asks for, and a mid-call switch across models is refused clearly."""
    from agent.config import ServerConfig
    from agent.service import build_service
    from agent.transports.fastrtc_handler import MoshiHandler

    moshiko = unconditioned_folder(tmp_path / "moshiko-pytorch-bf16", seed=1)
    moshika = unconditioned_folder(tmp_path / "moshika-pytorch-bf16", seed=2)
    service = build_service([ModelConfig(model=str(moshiko), device="cpu"),
                             ModelConfig(model=str(moshika), device="cpu")],
                            EngineConfig(max_sessions=2), ServerConfig(), warm_up=False)
    try:
        assert all(s.supported for s in service.voice_support().values())  # together they have every voice
        assert not any(s.supported for s in service.emotion_support().values())  # neither has emotions
        catalogue = service.catalogue
        by_voice = {v.id: service.hub.route(catalogue.settings(v.id)).model.name for v in catalogue.voices}
        assert by_voice == {v.id: ("moshika" if v.gender == "female" else "moshiko") + "-pytorch-bf16"
                            for v in catalogue.voices}

        _, speech = telugu_speech
        handler = MoshiHandler(service.hub)
        handler.latest_args = ["__webrtc_value__", "id", "ravi", "neutral"]
        asyncio.run(handler.receive((24_000, speech[:4800])))
        assert handler.session.engine.model.name == "moshiko-pytorch-bf16"
        assert service.engines[0].seats_in_use() == 1 and service.engines[1].seats_in_use() == 0
        handler.latest_args = ["__webrtc_value__", "id", "sravani", "neutral"]  # a female voice: Moshika
        asyncio.run(handler.receive((24_000, speech[4800:9600])))
        assert handler.session.settings.voice == "ravi"  # the call stays on its model
        assert "'sravani' runs on another model" in caplog.text
        handler.shutdown()  # the call closes on the hub's call-setup threads
        deadline = time.monotonic() + 5
        while service.seats_in_use() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.seats_in_use() == 0
    finally:
        service.close()
