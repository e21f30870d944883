"""TTS plug-ins for tests/test_synth_script.py (loaded by `synth --tts synth_helpers:Class`): the real
espeak-ng backend with one fault injected, to prove how the stage handles it."""

from __future__ import annotations

import time

from agent.train.tts import EspeakBackend, Speech, Style, TTSError

FAIL_WORD = "విఫలం"  # "failure": a turn holding this word fails in FailingEspeak


class FailingEspeak(EspeakBackend):
    """espeak-ng, except that a turn containing FAIL_WORD fails like an engine error would."""

    def synthesize(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        out = super().synthesize(items)
        return [TTSError("engine crashed (injected)") if FAIL_WORD in text else result
                for (text, _), result in zip(items, out)]


class SlowEspeak(EspeakBackend):
    """espeak-ng taking 0.4 s more per dialogue, so a test can kill a run in its middle."""

    def synthesize(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        time.sleep(0.4)
        return super().synthesize(items)


def build_tiny_parler(folder) -> None:
    """A tiny random ParlerTTSForConditionalGeneration from the parler-tts package's own classes (a 1-layer T5
    description encoder, a small Encodec codec, a 1-layer decoder over 2 codebooks) and a word-level
    tokenizer built here, saved like a Hub checkpoint: nothing is downloaded. The layout follows parler-tts'
    helpers/model_init_scripts/init_dummy_model_with_encodec.py (pad = eos = codebook_size, bos = +1)."""
    import transformers
    from parler_tts import ParlerTTSConfig, ParlerTTSDecoderConfig, ParlerTTSForConditionalGeneration
    from tokenizers import Tokenizer, models, pre_tokenizers

    from agent.train.tts import PARLER_EMOTIONS, PARLER_SPEAKERS, PARLER_USERS

    text = " ".join([*PARLER_SPEAKERS.values(), *PARLER_EMOTIONS.values(), *PARLER_USERS,
                     "speaks at a moderate pace, in a close-sounding environment with very clear audio and no "
                     "background noise."])
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *dict.fromkeys(text.replace(",", " ").split())])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                                     pad_token="<pad>")
    t5 = transformers.T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                               decoder_start_token_id=0)
    codec = transformers.EncodecConfig(target_bandwidths=[1.5], sampling_rate=24_000, num_filters=4,
                                       num_residual_layers=1, hidden_size=16, codebook_size=64, codebook_dim=16,
                                       num_lstm_layers=1)
    cb = codec.codebook_size
    decoder = ParlerTTSDecoderConfig(vocab_size=cb + 1, max_position_embeddings=256, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, hidden_size=16, num_codebooks=2, pad_token_id=cb,
                                     eos_token_id=cb, bos_token_id=cb + 1, dropout=0.0)
    model = ParlerTTSForConditionalGeneration(ParlerTTSConfig.from_sub_models_config(t5, codec, decoder,
                                                                                      vocab_size=len(vocab)))
    g = model.generation_config
    g.decoder_start_token_id, g.pad_token_id, g.eos_token_id = cb + 1, cb, cb
    # 40 frames at 75 Hz; no early end of speech, so every clip has sound to cut
    g.max_length, g.min_new_tokens, g.do_sample, g.guidance_scale = 40, 36, True, 1
    model.config.pad_token_id, model.config.decoder_start_token_id = cb, cb + 1
    model.config.text_encoder._name_or_path = str(folder)  # the description tokenizer lives beside the model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class CrashingEspeak(EspeakBackend):
    """espeak-ng that raises (a crash, not a TTSError) on FAIL_WORD: on Ray the task is retried, then reported."""

    def synthesize(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        if any(FAIL_WORD in text for text, _ in items):
            raise RuntimeError("engine crashed hard (injected)")
        return super().synthesize(items)


class SlowCrashingEspeak(CrashingEspeak, SlowEspeak):
    """CrashingEspeak taking 0.4 s more per dialogue, so a test can kill a Ray run in its middle."""
