"""Telugu ASR backends that give word timings: one protocol, lazily imported implementations.

Contract: a `Transcriber` has a `name` and `words(audio, rate, offset_s=0.0) -> list[Word]`: the
words heard in mono float `audio` at `rate` (any rate; resampled to the backend's 16 kHz), times in
seconds plus `offset_s`. `load_transcriber(spec, device)` builds one from a spec string; the heavy
package behind each backend is imported only then:

| spec | package | model (default) |
|---|---|---|
| `whisper[:MODEL]` | transformers (4.46.1 here) | `vasista22/whisper-telugu-large-v2` (Whisper fine-tuned on Telugu) |
| `faster-whisper[:MODEL]` | faster-whisper | `large-v3` (multilingual, `language="te"`) |
| `nemo[:MODEL]` | NeMo (AI4Bharat's fork for IndicConformer) | `ai4bharat/indicconformer_stt_te_hybrid_ctc_rnnt_large` (an HF id or a `.nemo` path) |
| `whisper:tiny-random` | transformers | a tiny Whisper with random weights built here (tests, offline smoke runs: its words are noise) |
| `ctc[:FOLDER]` | torch, torchaudio | `assets/models/asr-te-ctc`: a small CTC recogniser trained here on espeak-ng Telugu (agent.eval.ctc); it hears espeak-like Telugu, not real speakers |

MODEL may be a local folder. None of these packages is a runtime requirement of the agent; tests use
transformers for the tiny random Whisper, so requirements.txt pins it.
"""  # noqa: E501 - a Markdown table

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from agent import ASSETS
from agent.audio.stream import resample
from agent.eval.transcript import Word

log = logging.getLogger(__name__)

ASR_RATE = 16_000
WHISPER_CHUNK_S = 30  # Whisper hears 30 s windows; longer audio is chunked by the pipeline
DEFAULT_MODELS = {
    "whisper": "vasista22/whisper-telugu-large-v2",
    "faster-whisper": "large-v3",
    "nemo": "ai4bharat/indicconformer_stt_te_hybrid_ctc_rnnt_large",
    "ctc": str(ASSETS / "models" / "asr-te-ctc"),
}
TINY_RANDOM = "tiny-random"


class AsrError(RuntimeError):
    """A backend that cannot be loaded or run; the message says what to install or fix."""


class Transcriber(Protocol):
    name: str

    def words(self, audio: np.ndarray, rate: int, offset_s: float = 0.0) -> list[Word]: ...


def _import(module: str, install: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AsrError(f"this ASR backend needs `pip install {install}` ({exc})") from exc


def _device(device: str | None) -> str:
    import torch
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _clean(words: list[Word]) -> list[Word]:
    """Words that have text."""
    return [w for w in words if w.text.strip()]


class WhisperTranscriber:
    """Whisper through transformers' ASR pipeline with word timestamps (cross-attention DTW)."""

    def __init__(self, model: str, device: str | None = None, language: str = "te"):
        transformers = _import("transformers", "transformers==4.46.1")
        torch = _import("torch", "torch")
        device = _device(device)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.name = f"whisper:{model}"
        self.language = language
        try:
            self._pipe = transformers.pipeline("automatic-speech-recognition", model=model, device=device,
                                               torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise AsrError(f"cannot load Whisper model {model!r}: {exc}") from exc

    def words(self, audio: np.ndarray, rate: int, offset_s: float = 0.0) -> list[Word]:
        pcm = resample(np.asarray(audio, np.float32), rate, ASR_RATE)
        if pcm.size < ASR_RATE // 10:
            return []
        out = self._pipe({"raw": pcm, "sampling_rate": ASR_RATE}, return_timestamps="word",
                         chunk_length_s=WHISPER_CHUNK_S if pcm.size > WHISPER_CHUNK_S * ASR_RATE else None,
                         generate_kwargs={"language": self.language, "task": "transcribe"})
        words, chunks = [], out.get("chunks", [])
        for i, chunk in enumerate(chunks):
            start, end = chunk["timestamp"]
            if start is None:
                continue
            if end is None:  # the last word of a window may have no end
                end = chunks[i + 1]["timestamp"][0] if i + 1 < len(chunks) else start
                end = start if end is None else end
            words.append(Word(chunk["text"].strip(), float(start) + offset_s, float(end) + offset_s))
        return _clean(words)


class FasterWhisperTranscriber:
    def __init__(self, model: str, device: str | None = None, language: str = "te"):
        faster_whisper = _import("faster_whisper", "faster-whisper")
        device = _device(device)
        self.name = f"faster-whisper:{model}"
        self.language = language
        self._model = faster_whisper.WhisperModel(model, device="cuda" if device.startswith("cuda") else "cpu",
                                                  compute_type="float16" if device.startswith("cuda") else "int8")

    def words(self, audio: np.ndarray, rate: int, offset_s: float = 0.0) -> list[Word]:
        pcm = resample(np.asarray(audio, np.float32), rate, ASR_RATE)
        segments, _ = self._model.transcribe(pcm, language=self.language, word_timestamps=True)
        return _clean([Word(w.word.strip(), w.start + offset_s, w.end + offset_s)
                       for segment in segments for w in (segment.words or [])])


class NemoTranscriber:
    """NeMo ASR with `timestamps=True` word times: AI4Bharat's IndicConformer for Telugu (its model card
    loads it with AI4Bharat's NeMo fork, branch nemo-v2, and passes `language_id`), or NeMo's
    `nvidia/parakeet-tdt-0.6b-v2`, the English ASR FDB itself uses. *Unverified here* (no NeMo on this
    machine): written against `ASRModel.transcribe(..., timestamps=True)` as FDB's asr.py calls it."""

    def __init__(self, model: str, device: str | None = None, language: str = "te"):
        nemo_asr = _import("nemo.collections.asr", "nemo_toolkit[asr] (or AI4Bharat's NeMo fork)")
        self.name = f"nemo:{model}"
        self.language = language
        if Path(model).suffix == ".nemo":
            self._model = nemo_asr.models.ASRModel.restore_from(model)
        else:
            self._model = nemo_asr.models.ASRModel.from_pretrained(model_name=model)
        self._model = self._model.to(_device(device)).eval()

    def words(self, audio: np.ndarray, rate: int, offset_s: float = 0.0) -> list[Word]:
        import soundfile as sf
        pcm = resample(np.asarray(audio, np.float32), rate, ASR_RATE)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "audio.wav"
            sf.write(str(path), pcm, ASR_RATE)
            try:  # IndicConformer (multilingual heads) takes the language; other NeMo models do not
                result = self._model.transcribe([str(path)], timestamps=True, language_id=self.language)[0]
            except TypeError:
                result = self._model.transcribe([str(path)], timestamps=True)[0]
        if isinstance(result, (list, tuple)):  # hybrid models may return (best, all) hypotheses
            result = result[0]
        stamps = getattr(result, "timestamp", None) or {}
        return _clean([Word(str(w["word"]), float(w["start"]) + offset_s, float(w["end"]) + offset_s)
                       for w in stamps.get("word", [])])


def ctc_transcriber(model: str, device: str | None = None, language: str = "te") -> Transcriber:
    """The espeak-ng-trained Telugu CTC recogniser in folder `model` (agent.eval.ctc.backend)."""
    if language != "te":
        raise AsrError(f"the ctc backend hears Telugu only, not language {language!r}")
    if not (Path(model) / "recipe.json").is_file():
        raise AsrError(f"no CTC recogniser in {model} (recipe.json missing; train one: python -m agent.train asr)")
    from agent.eval.ctc.backend import CtcTranscriber
    return CtcTranscriber(Path(model), device=device)


BACKENDS = {"whisper": WhisperTranscriber, "faster-whisper": FasterWhisperTranscriber, "nemo": NemoTranscriber,
            "ctc": ctc_transcriber}


def load_transcriber(spec: str, device: str | None = None, language: str = "te") -> Transcriber:
    """`whisper`, `whisper:MODEL`, `faster-whisper[:MODEL]`, `nemo[:MODEL]`, `whisper:tiny-random`, `ctc[:FOLDER]`."""
    backend, _, model = spec.partition(":")
    if backend not in BACKENDS:
        raise AsrError(f"unknown ASR backend {backend!r}; choose one of {sorted(BACKENDS)}")
    model = model or DEFAULT_MODELS[backend]
    if backend == "whisper" and model == TINY_RANDOM:
        log.warning("ASR whisper:tiny-random has RANDOM weights: its words are noise (for tests and smoke runs)")
        transcriber = WhisperTranscriber(
            str(build_tiny_whisper(Path(tempfile.gettempdir()) / "agent-eval-tiny-whisper")),
            device=device, language=language)
        transcriber.name = f"whisper:{TINY_RANDOM}"
        return transcriber
    return BACKENDS[backend](model, device=device, language=language)


def build_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A tiny Whisper with random weights, built from transformers' own classes (no download):
    byte-level tokenizer with Whisper's special tokens, 2+2 layers of width 32, word-timestamp
    alignment heads. Decoding is limited to a-z and space so its (meaningless) output has words."""
    if (folder / "preprocessor_config.json").exists():  # written last: the folder is complete
        return folder
    final, folder = folder, folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    transformers = _import("transformers", "transformers==4.46.1")
    torch = _import("torch", "torch")
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = transformers.WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                              unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|te|>", "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])  # Whisper's timestamp tokens
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    eos, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = transformers.WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=64, init_std=1.0, pad_token_id=eos, bos_token_id=eos,
        eos_token_id=eos, decoder_start_token_id=start, begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config)
    with torch.no_grad():  # a space as likely as the likeliest letter, so the output splits into words
        embed = model.model.decoder.embed_tokens.weight
        embed[vocab["Ġ"]] = embed[vocab["k"]] * 1.02
    allowed = {vocab[c] for c in "abcdefghijklmnopqrstuvwxyzĠ"}
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=start, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, max_length=24,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|te|>": ids["<|te|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True, alignment_heads=[[1, 0], [1, 1]],
        forced_decoder_ids=None, begin_suppress_tokens=None,
        suppress_tokens=[i for i in range(len(tokenizer)) if i not in allowed])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    try:
        os.replace(folder, final)  # atomic: another process sees all of it or none
    except OSError:  # another process finished first
        shutil.rmtree(folder, ignore_errors=True)
    return final
