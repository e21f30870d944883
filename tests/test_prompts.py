"""Voice and text prompts (PersonaPlex's way of choosing a voice and a persona per call)."""

from __future__ import annotations

import subprocess
import sys

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_prompt_catalogue_reads_without_torch_or_moshi():
    """A page, a client or a script reads the voice catalogue (and its prompt voices) without a model."""
    code = ("import sys, agent.voices; agent.voices.load_catalogue(); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'moshi')); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"importing agent.voices pulled in {run.stdout.strip()} {run.stderr[-500:]}"


# ---------------------------------------------------------------------------------------------
# The prompt sequence and its cached state in the batched engine
# ---------------------------------------------------------------------------------------------

import numpy as np  # noqa: E402
import torch  # noqa: E402

from agent import FRAME_SIZE  # noqa: E402
from agent.config import EngineConfig  # noqa: E402
from agent.engine import FrameEngine  # noqa: E402
from agent.engine.prompts import SILENCE_FRAMES, TARGET_LUFS, PromptBuilder, PromptSpec, prepare_voice  # noqa: E402
from agent.errors import PromptError  # noqa: E402
from agent.models import load_checkpoint, tiny_personaplex_folder  # noqa: E402
from prompt_helpers import PERSONA_EN, assert_same_call, reference_run, run_prompted_calls  # noqa: E402
from tiny_helpers import GREEDY, frames_of, varied_audio  # noqa: E402

PERSONA_TE = "మీరు రవి, ఒక స్నేహపూర్వక ప్రయాణ సహాయకుడు."


@pytest.fixture(scope="module")
def persona_folder(tmp_path_factory):
    return tiny_personaplex_folder(cache_dir=tmp_path_factory.mktemp("persona"))


def persona_model(folder):
    return load_checkpoint(str(folder), torch.device("cpu"), torch.float32)


def test_prompt_frames_follow_personaplex_sequence(persona_folder):
    model = persona_model(persona_folder)
    builder = PromptBuilder(model)
    frames = builder.frames(PromptSpec("NATF0", PERSONA_EN))
    ids = model.tokenizer.encode(f"<system> {PERSONA_EN} <system>")
    n_voice = -(-int(1.2 * 24_000) // FRAME_SIZE)
    assert frames.voice_frames == n_voice and frames.text_tokens == len(ids)
    assert len(frames) == n_voice + 2 * SILENCE_FRAMES + len(ids)
    text_start = n_voice + SILENCE_FRAMES
    assert frames.text[text_start:text_start + len(ids)].tolist() == ids
    assert set(frames.text[:text_start].tolist()) == {3} and set(frames.text[-SILENCE_FRAMES:].tolist()) == {3}
    assert (frames.agent[n_voice:] == builder.silence).all() and (frames.user == builder.sine).all()
    assert not (frames.agent[:n_voice] == builder.silence).all()  # the voice's own codes
    # already-tagged text is not wrapped twice; no text means no text phase
    assert builder.text_tokens(f"<system> {PERSONA_EN} <system>") == ids
    assert len(builder.frames(PromptSpec("NATF0", "  "))) == n_voice + 2 * SILENCE_FRAMES
    # the same prompt has the same key; another voice or text another
    assert builder.frames(PromptSpec("NATF0", PERSONA_EN)).key == frames.key
    assert builder.frames(PromptSpec("NATM0", PERSONA_EN)).key != frames.key


def test_prompt_voice_is_loudness_normalised_to_minus_24_lufs(persona_folder):
    """A quiet and a loud recording of one voice both reach the LM at -24 LUFS (as PersonaPlex's server)."""
    import pyloudnorm
    import soundfile as sf

    voice, rate = sf.read(str(persona_folder / "voices" / "NATF0.wav"), dtype="float32")
    meter = pyloudnorm.Meter(24_000)
    for gain in (0.9, 0.05):
        assert abs(meter.integrated_loudness(voice * gain) - TARGET_LUFS) > 3  # the check can fail
        prepared = prepare_voice(voice * gain, rate)
        assert prepared.size % FRAME_SIZE == 0
        assert abs(meter.integrated_loudness(prepared.astype(np.float64)) - TARGET_LUFS) < 0.2


@pytest.mark.parametrize("spec, match", [
    (PromptSpec("NOBODY"), "unknown voice"),
    (PromptSpec(None, "x " * 3000), "characters"),
    (PromptSpec(None, "పదం " * 450), "tokens"),
    (PromptSpec("/etc/passwd"), "unknown voice"),
])
def test_prompt_bad_prompts_are_refused_clearly(persona_folder, spec, match):
    builder = PromptBuilder(persona_model(persona_folder))
    with pytest.raises(PromptError, match=match):
        builder.frames(spec)


def test_prompt_unreadable_silent_or_long_voice_wav_is_refused(persona_folder, tmp_path):
    import soundfile as sf

    builder = PromptBuilder(persona_model(persona_folder))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    silent, long = tmp_path / "silent.wav", tmp_path / "long.wav"
    sf.write(str(silent), np.zeros(24_000, np.float32), 24_000)
    sf.write(str(long), varied_audio(250, 1), 24_000)
    for path, match in ((bad, "cannot read"), (silent, "silent"), (long, "long")):
        with pytest.raises(PromptError, match=match):
            builder.frames(PromptSpec(str(path)))


@pytest.mark.slow
def test_prompt_parity_one_call_equals_a_plain_single_row_run(persona_folder):
    """A one-seat engine: the cached prompt restored into the row gives exactly the tokens of a
    batch-1 stock LMGen stepping the prompt frame by frame, then the conversation."""
    spec, audio = PromptSpec("NATF0", PERSONA_EN), varied_audio(12, 11)
    engine = FrameEngine(persona_model(persona_folder), EngineConfig(max_sessions=1), GREEDY)
    reference = reference_run(persona_model(persona_folder), engine.prompts.frames(spec), audio)
    for round_ in range(2):  # the second call takes the prompt from the cache
        assert_same_call(run_prompted_calls(engine, [spec], [audio], bystander=False)[0], reference, f"round {round_}")
    assert engine.stats.prompt_prefills == 1 and engine.stats.prompts_restored == 2
    # the check can fail: a call without the prompt answers otherwise
    seat = engine.acquire("plain")
    plain = []
    for frame in frames_of(audio):
        seat.push(frame)
        engine.step_once()
        plain.append(seat.pull().text_token)
    assert plain != reference[0]


@pytest.mark.slow
def test_prompt_parity_cached_prompts_in_one_batch_equal_a_plain_single_row_run(persona_folder):
    """THE parity test: two calls with different prompts share one batch (with a third call that has
    none); each gets the same greedy tokens and audio as a plain single-row run of its documented
    prompt sequence and conversation. The second round takes both prompts from the cache."""
    specs = [PromptSpec("NATF0", PERSONA_EN), PromptSpec("NATM1", PERSONA_TE)]
    audio = [varied_audio(12, 11), varied_audio(12, 12)]
    engine = FrameEngine(persona_model(persona_folder), EngineConfig(max_sessions=3), GREEDY)
    reference_model = persona_model(persona_folder)
    refs = [reference_run(reference_model, engine.prompts.frames(spec), a, batch=3, row=1 + i)
            for i, (spec, a) in enumerate(zip(specs, audio))]
    assert refs[0][0] != refs[1][0]  # the two calls do differ
    for round_ in range(2):
        outs = run_prompted_calls(engine, specs, audio, bystander=True)
        for i in range(2):
            assert_same_call(outs[i], refs[i], f"call {i}, round {round_}")
        assert engine.stats.prompt_prefills == 2  # round 2: both from the cache
    assert engine.stats.prompts_restored == 4 and len(engine.prompt_cache) == 2


@pytest.mark.slow
def test_prompt_call_ends_before_its_prompt_leaves_the_context(persona_folder):
    """Past the context the model no longer attends to its prompt (voice and persona forgotten): the
    call is ended with a reason the caller sees; a call without a prompt goes on."""
    from agent.engine import PROMPT_CONTEXT_MARGIN

    context = 120
    model = load_checkpoint(str(persona_folder), torch.device("cpu"), torch.float32, context=context)
    engine = FrameEngine(model, EngineConfig(max_sessions=2), GREEDY)
    prompted, plain = engine.acquire("prompted"), engine.acquire("plain")
    prompted.set_prompt(PromptSpec("NATF0"))
    length = len(engine.prompts.frames(PromptSpec("NATF0")))
    audio = frames_of(varied_audio(context, 5))
    for _k, frame in enumerate(audio):
        if prompted.closed:
            break
        prompted.push(frame)
        plain.push(frame)
        engine.step_once()
    assert prompted.closed and "context" in prompted.closed_reason and "persona" in prompted.closed_reason
    assert prompted.counters.frames_out == context - PROMPT_CONTEXT_MARGIN - length
    assert not plain.closed


@pytest.mark.slow
def test_prompt_offline_infer_runs_the_same_prompt_path(persona_folder, tmp_path, monkeypatch):
    """`python -m agent.tools.infer --voice-prompt ... --text-prompt ... --greedy` equals the plain run."""
    import soundfile as sf

    from agent.tools import infer as infer_cli

    audio = varied_audio(10, 21)
    wav, out = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(str(wav), audio, 24_000, subtype="FLOAT")
    monkeypatch.setenv("AGENT_CACHE", str(persona_folder.parent))
    voice = str(persona_folder / "voices" / "NATM0.wav")  # a WAV file, as a local user may give
    assert infer_cli.main(["--model", "tiny-personaplex", "--device", "cpu", "--greedy", "--voice-prompt", voice,
                           "--text-prompt", PERSONA_TE, str(wav), str(out)]) == 0
    model = persona_model(persona_folder)
    texts, _ = reference_run(model, PromptBuilder(model).frames(PromptSpec(voice, PERSONA_TE)), audio)
    result = infer_cli.infer(persona_model(persona_folder), audio, GREEDY, prompt=PromptSpec("NATM0", PERSONA_TE))
    assert result.text_tokens == texts
    assert sf.read(str(out))[0].size == audio.size
    # a model without prompts says so
    assert infer_cli.main(["--model", "tiny", "--device", "cpu", "--text-prompt", "x", str(wav), str(out)]) == 2
    assert infer_cli.main(["--model", "tiny-personaplex", "--device", "cpu", "--voice-prompt", "NOBODY",
                           str(wav), str(out)]) == 2


def test_prompt_personaplex_pt_voice_replays_like_its_wav(persona_folder, tmp_path):
    """A preset saved in PersonaPlex's .pt format (summed input embeddings + token ring) gives the same
    greedy conversation as the WAV it was made from; a file that is not one is refused."""
    import shutil

    folder = tmp_path / "with-pt"
    shutil.copytree(persona_folder, folder)
    model = persona_model(folder)
    engine = FrameEngine(model, EngineConfig(max_sessions=1), GREEDY)
    frames = engine.prompts.frames(PromptSpec("NATF1"))
    engine.lm_gen.save_voice_embeddings(frames, folder / "voices" / "SAVED.pt")
    saved = torch.load(folder / "voices" / "SAVED.pt", weights_only=True)
    assert saved["embeddings"].shape == (frames.voice_frames - 1, 1, 1, model.lm.dim)
    assert saved["cache"].shape == (1, 17, 4)
    model.preset_voices["SAVED"] = folder / "voices" / "SAVED.pt"
    audio = varied_audio(10, 31)
    from_wav = run_prompted_calls(engine, [PromptSpec("NATF1", PERSONA_EN)], [audio], bystander=False)[0]
    from_pt = run_prompted_calls(engine, [PromptSpec("SAVED", PERSONA_EN)], [audio], bystander=False)[0]
    assert [o.text_token for o in from_pt] == [o.text_token for o in from_wav]
    np.testing.assert_allclose(np.concatenate([o.pcm for o in from_pt]), np.concatenate([o.pcm for o in from_wav]),
                               atol=1e-4)
    assert engine.stats.prompt_prefills == 2  # two keys (the files differ), the same state
    (folder / "voices" / "BAD.pt").write_bytes(b"not a torch file")
    torch.save({"embeddings": torch.zeros(3, 1, 1, 7), "cache": torch.zeros(1, 17, 4, dtype=torch.long)},
               folder / "voices" / "ODD.pt")
    model.preset_voices.update(BAD=folder / "voices" / "BAD.pt", ODD=folder / "voices" / "ODD.pt")
    with pytest.raises(PromptError, match="cannot read"):
        engine.prompts.frames(PromptSpec("BAD"))
    with pytest.raises(PromptError, match="not a PersonaPlex voice"):
        engine.prompts.frames(PromptSpec("ODD"))


def test_prompt_cache_is_bounded_in_entries_and_bytes_least_recent_first():
    from agent.engine.prompt_state import PromptCache, PromptState

    def state(mib: int) -> PromptState:
        return PromptState(1, (torch.zeros(mib * 2**18),), (), torch.zeros(17, dtype=torch.long))

    cache = PromptCache(max_entries=3, max_bytes=10 * 2**20)
    for key in "abc":
        cache.put(key, state(2))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("d", state(2))  # four entries: the least recent ("b") goes
    assert cache.get("b") is None and len(cache) == 3
    cache.put("e", state(6))  # 2 + 2 + 2 + 6 MiB > 10: least recent first until it fits
    assert len(cache) == 2 and cache.get("e") is not None and cache.get("d") is not None
    assert cache.nbytes == 8 * 2**20 + 2 * 17 * 8
    cache.put("huge", state(20))  # alone over the budget: kept (the call needs it), the rest dropped
    assert len(cache) == 1 and cache.hits >= 3 and cache.misses == 1


def test_prompt_prefill_failure_ends_only_its_own_call(persona_folder, monkeypatch):
    engine = FrameEngine(persona_model(persona_folder), EngineConfig(max_sessions=2), GREEDY)
    other, failing = engine.acquire("other"), engine.acquire("failing")

    def broken(frames):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.lm_gen, "prefill", broken)
    failing.set_prompt(PromptSpec("NATF0", PERSONA_EN))
    for _k, frame in enumerate(frames_of(varied_audio(4, 2))):
        other.push(frame)
        if not failing.closed:
            failing.push(frame)
        stepped = engine.step_once()
        assert stepped >= 1 and other.pull() is not None
    assert failing.closed and "could not be prepared" in failing.closed_reason
    assert not other.closed and other.counters.frames_out == 4
