"""telugu-small's codec losses (issue 22): the multi-scale mel loss, EnCodec's STFT discriminator with
hinge and feature-matching losses, a run with the discriminator that resumes exactly, and snapshots
judged by the ctc recogniser's CER.

Fast by design: espeak-ng speech, a narrow codec and discriminator, a few steps.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from agent.eval.speech import speak
from agent.train import codec as codec_mod
from agent.train.codec_discriminator import (
    Adversary,
    AdversaryConfig,
    discriminator_hinge,
    feature_matching,
    generator_hinge,
)
from agent.train.codec_losses import mel_cepstral_distance, multiscale_mel_loss

RATE = 24_000


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speak("నమస్కారం, మీరు ఎలా ఉన్నారు?", "te+f3", RATE).astype(np.float32)


@pytest.fixture(scope="module")
def speech_wavs(tmp_path_factory, speech) -> list[Path]:
    folder = tmp_path_factory.mktemp("small-codec-speech")
    paths = [folder / "0.wav", folder / "1.wav"]
    sf.write(str(paths[0]), speech, RATE)
    sf.write(str(paths[1]), speak("ఈ రోజు వాతావరణం చాలా బాగుంది.", "te+m3", RATE), RATE)
    return paths


def test_telugu_small_mel_loss_is_zero_for_identical_signals_and_grows_with_distortion(speech):
    x = torch.from_numpy(speech)[None, None]
    assert multiscale_mel_loss(x, x).item() == 0.0
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(speech.size).astype(np.float32))[None, None]
    losses = [multiscale_mel_loss(x + level * noise, x).item() for level in (0.003, 0.03, 0.3)]
    assert 0 < losses[0] < losses[1] < losses[2], losses
    muffled = torch.nn.functional.avg_pool1d(x, 9, stride=1, padding=4)  # the formants gone, the level kept
    assert multiscale_mel_loss(muffled, x).item() > losses[0]
    assert mel_cepstral_distance(speech, speech) == pytest.approx(0.0, abs=1e-6)
    assert mel_cepstral_distance(muffled[0, 0].numpy(), speech) > mel_cepstral_distance(
        (x + 0.003 * noise)[0, 0].numpy(), speech) > 0


def test_telugu_small_mel_floor_stops_the_loss_spending_itself_on_digital_silence(speech):
    """espeak-ng's pauses (and a dialogue side's silence) are digital zeros. At DAC's -100 dB floor a
    faint -80 dBFS hiss in half a second of them costs as much as muffling every word; at a -60 dB
    floor it costs little, while muffling still costs as much as before."""
    x = torch.from_numpy(np.concatenate([speech, np.zeros(RATE // 2, np.float32)]))[None, None]
    hiss = x.clone()
    hiss[..., speech.size:] += torch.from_numpy(
        1e-4 * np.random.default_rng(0).standard_normal(RATE // 2).astype(np.float32))
    muffled = torch.nn.functional.avg_pool1d(x, 9, stride=1, padding=4)
    old_hiss, old_muffled = multiscale_mel_loss(hiss, x).item(), multiscale_mel_loss(muffled, x).item()
    new_hiss, new_muffled = (multiscale_mel_loss(y, x, floor=1e-3).item() for y in (hiss, muffled))
    assert old_hiss > 0.5 * old_muffled, (old_hiss, old_muffled)
    assert new_hiss < 0.25 * new_muffled and new_muffled > 0.8 * old_muffled, (new_hiss, new_muffled)


def test_telugu_small_codec_config_mel_floor_reaches_the_training_loss(speech_wavs, tmp_path):
    """A smoke step of the codec with the raised floor trains, and its mel loss is the floored one (the
    default floor gives another figure on the same crops)."""
    torch.set_num_threads(1)
    figures = {}
    for floor in (None, 1e-3):
        extra = {} if floor is None else {"mel_floor": floor}
        config = _small_config(speech_wavs, tmp_path / str(floor), steps=1, save_every=1, **extra)
        codec_mod.train_codec(config)
        figures[floor] = config.history[-1]["mel"]
    assert codec_mod.CodecConfig(audio=[], out=tmp_path).mel_floor == 1e-5
    assert 0 < figures[1e-3] < figures[None], figures


def test_telugu_small_discriminator_hinge_and_feature_matching_have_the_right_signs():
    high, low = [torch.full((2, 5), 3.0)], [torch.full((2, 5), -3.0)]
    assert discriminator_hinge(high, low).item() == 0.0  # real called real, fake called fake: nothing to learn
    assert discriminator_hinge(low, high).item() == pytest.approx(8.0)  # both wrong: 4 + 4
    assert generator_hinge(high).item() == 0.0 and generator_hinge(low).item() == pytest.approx(4.0)
    features = [[torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))]]
    assert feature_matching(features, features).item() == 0.0
    assert feature_matching(features, [[2 * features[0][0]]]).item() == pytest.approx(1.0)  # relative L1


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def test_telugu_small_gradients_reach_the_codec_only_in_the_generator_step(speech):
    torch.manual_seed(0)
    mimi = codec_mod.build_mimi(codec_mod.codec_mimi_config(4, 32), seed=0).train()
    adversary = Adversary(AdversaryConfig(filters=4, scales=(512, 256)), seed=0)
    ref = torch.from_numpy(speech[:4 * codec_mod.FRAME].copy())[None, None]
    decoded, _ = codec_mod.autoencode(mimi, ref, quantize_rate=0.0)
    adversary.discriminator_step(decoded, ref)
    assert all(g is None for g in _grads(mimi).values()), "the discriminator's step reached the codec"
    after_d_step = _grads(adversary.discriminator)
    assert all(g is not None for g in after_d_step.values()) and sum(g.abs().sum() for g in after_d_step.values()) > 0
    adversarial, matching = adversary.generator_losses(decoded, ref)
    (adversarial + matching).backward()
    codec_grads = [g for n, g in _grads(mimi).items() if n.startswith("decoder.")]
    assert codec_grads and all(g is not None for g in codec_grads) and sum(g.abs().sum() for g in codec_grads) > 0
    for name, grad in _grads(adversary.discriminator).items():  # the codec's losses left the discriminator alone
        assert torch.equal(grad, after_d_step[name]), name
    assert all(p.requires_grad for p in adversary.discriminator.parameters())


def _small_config(speech_wavs, out: Path, **overrides) -> codec_mod.CodecConfig:
    settings = dict(steps=10, extra_steps=0, save_every=4, batch_size=2, crop_frames=4, seanet_filters=4,
                    seanet_dim=32, mel_scales=((64, 10), (256, 40), (1024, 80)), adversary_start=2,
                    adversary_filters=4, adversary_scales=(512, 256), quiet=True) | overrides
    return codec_mod.telugu_small_codec_config(speech_wavs, out, **settings)


@pytest.mark.slow
def test_telugu_small_codec_with_discriminator_resumes_bit_for_bit(speech_wavs, tmp_path, monkeypatch):
    """Killed at step 7 (the state of step 4 on disk: codec, discriminator, both optimizers, random
    streams), the rerun goes on with the same losses at every step and ends with the same weights."""
    torch.set_num_threads(1)
    real_step, losses = codec_mod._Trainer.step, []

    def recording_step(self, config, ref, rng, step):
        if step == 6 and getattr(self, "die", False):
            raise KeyboardInterrupt
        losses.append((step, real_step(self, config, ref, rng, step)))
        return losses[-1][1]

    monkeypatch.setattr(codec_mod._Trainer, "step", recording_step)
    whole = codec_mod.train_codec(_small_config(speech_wavs, tmp_path / "whole")).state_dict()
    uninterrupted, losses[:] = dict(losses), []
    assert {"disc", "adv", "feat", "mel"} <= set(uninterrupted[9]) and "disc" not in uninterrupted[1]
    monkeypatch.setattr(codec_mod._Trainer, "die", True, raising=False)
    with pytest.raises(KeyboardInterrupt):
        codec_mod.train_codec(_small_config(speech_wavs, tmp_path / "killed"))
    monkeypatch.setattr(codec_mod._Trainer, "die", False, raising=False)
    losses[:] = []
    resumed = codec_mod.train_codec(_small_config(speech_wavs, tmp_path / "killed")).state_dict()
    assert [s for s, _ in losses] == list(range(4, 10))
    for step, figures in losses:
        assert figures == uninterrupted[step], step
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key


TINY_CODEC = Path(__file__).resolve().parent.parent / "assets" / "models" / "telugu-tiny"


def test_telugu_small_codec_snapshots_are_judged_and_ranked_by_the_ctc_recognisers_cer(tmp_path):
    """Snapshots judged by the real ctc recogniser on held-out sentences: the shipped toy codec (CER
    about 0.83) passes a 0.9 bar, an untrained one (about 0.98) fails it however much speech the bar on
    Silero lets through, and the kept weights are the passing snapshot's. Among passing snapshots the
    lower CER wins over the lower spectral distance; a failing CER loses to any passing one."""
    from agent.eval.asr import load_transcriber
    from agent.eval.intelligibility import error_rates
    from agent.train.telugu_tiny import spoken_clips
    torch.set_num_threads(1)
    texts = json.loads((TINY_CODEC / "eval.json").read_text(encoding="utf-8"))["codec"]["heldout_sentences"][:4]
    clips, judge = spoken_clips(texts), load_transcriber("ctc")
    trained, cfg = codec_mod.load_mimi_folder(TINY_CODEC)
    untrained = codec_mod.build_mimi(cfg, 0).eval()
    config = codec_mod.CodecConfig(audio=[], out=tmp_path / "codec", rank_by="distance", min_speech_ratio=0.0,
                                   max_cer=0.9, quiet=True)
    # kept by the same run before it was resumed with a judge: no CER, so it cannot stand for a judged run
    config.kept = {"step": 0, "speech_ratio": 1.0, "lsd_db": 10.0, "mcd_db": 20.0}
    codec_mod._snapshot(trained, cfg, config, clips, 1, judge, texts)
    codec_mod._snapshot(untrained, cfg, config, clips, 2, judge, texts)
    first, second = config.snapshots
    heard = [" ".join(w.text for w in judge.words(codec_mod.reconstruct(trained, c), RATE)) for c in clips]
    assert first["cer"] == round(error_rates(texts, heard).cer, 4) < config.max_cer < second["cer"]
    assert codec_mod.snapshot_passes(first, config) and not codec_mod.snapshot_passes(second, config)
    assert config.kept["step"] == 1
    kept, _ = codec_mod.load_mimi_folder(config.out)
    for key, value in trained.state_dict().items():
        assert torch.equal(value, kept.state_dict()[key]), key
    rank = partial(codec_mod.snapshot_rank, config=config)
    clear = {"step": 3, "speech_ratio": 0.9, "lsd_db": 16.0, "mcd_db": 50.0, "cer": 0.3}
    close = {"step": 4, "speech_ratio": 1.0, "lsd_db": 14.0, "mcd_db": 40.0, "cer": 0.5}
    unheard = {"step": 5, "speech_ratio": 1.0, "lsd_db": 12.0, "mcd_db": 30.0, "cer": 0.95}
    assert rank(clear) > rank(close) > rank(unheard)


def test_telugu_small_codec_round_trip_in_voices_it_never_trained_on(tmp_path, capsys):
    """`agent.eval codec --voices te,te+m8`: every sentence in each named espeak-ng voice, with the clean
    and round-trip CER per voice (the gate's figure is on voices the codec never heard)."""
    from agent.eval.__main__ import main
    from agent.eval.ctc.sentences import unseen
    lines, out = tmp_path / "sentences.txt", tmp_path / "codec.json"
    lines.write_text("\n".join(unseen(2, 98, 3000, 0)), encoding="utf-8")
    assert main(["codec", "--codec", str(TINY_CODEC), "--sentences", str(lines), "--voices", "te,te+m8",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert [(x["reference"], x["voice"]) for x in figures["samples"]] == [
        (s, v) for v in ("te", "te+m8") for s in lines.read_text(encoding="utf-8").splitlines()]
    assert set(figures["voices"]) == {"te", "te+m8"}
    for rates in figures["voices"].values():
        assert rates["clean"]["n"] == rates["round_trip"]["n"] == 2 and rates["clean"]["cer"] <= 0.3
    assert figures["clean"]["n"] == 4 and "te+m8" in capsys.readouterr().out


def test_telugu_small_preset_of_the_telugu_tiny_command_judges_codec_snapshots_by_ctc_cer(tmp_path):
    """`telugu-tiny --codec-preset small` hands train_codec the ctc recogniser and the validation texts;
    the tiny preset stays Silero-judged with CodecConfig's defaults (its recipe unchanged)."""
    from agent.train import telugu_tiny
    texts = ["ఈ రోజు వాతావరణం చాలా బాగుంది."]
    small, judged = telugu_tiny.codec_stage(telugu_tiny.TeluguTinyConfig(work=tmp_path, codec_preset="small"),
                                            [], tmp_path / "codec", texts)
    assert small.rank_by == "distance" and small.max_cer == 0.2
    assert judged["validation_texts"] == texts and judged["judge"].name.startswith("ctc:")
    tiny, none = telugu_tiny.codec_stage(telugu_tiny.TeluguTinyConfig(work=tmp_path), [], tmp_path / "codec", texts)
    assert none == {} and tiny == codec_mod.CodecConfig(audio=[], out=tmp_path / "codec", steps=4000, extra_steps=4000)
