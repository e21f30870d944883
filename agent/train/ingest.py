"""Stage 1, ingest: local folders, JSONL/CSV manifests, saved Hugging Face datasets and (with an explicit
rights acknowledgement) URLs -> 24 kHz PCM-16 WAVs + manifest.jsonl (AudioRecord per kept file).

Each file is decoded (soundfile; ffmpeg for other formats when it is installed), mixed to mono (a
two-speaker recording keeps its two channels, reordered to LEFT = agent, RIGHT = user), resampled to
24 kHz with the project's polyphase filter, and loudness-normalised. The normalisation is simple and
says so: the RMS of the voiced part (20 ms frames within 30 dB of the loudest) is brought to
`target_dbfs`, with the gain capped so the peak stays below `peak_dbfs`. It is not EBU R128/LUFS.

Dropped, one report line each: unreadable/corrupt audio, missing audio, missing labels, unknown
emotions, too low a sample rate, empty/too short/too long, non-finite samples, clipping, silence.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from agent import SAMPLE_RATE
from agent.audio.files import read_file
from agent.audio.stream import resample
from agent.train.common import (
    StageRun,
    Summary,
    UsageError,
    atomic_write_wav,
    fingerprint,
    frame_rms_db,
    progress,
    safe_id,
    short_hash,
)
from agent.train.records import (
    CONVERSATION,
    UTTERANCE,
    AudioRecord,
    RecordError,
    clean_text,
    parse_segments,
    parse_words,
)
from agent.voices import load_catalogue

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au"}  # libsndfile reads these
OTHER_AUDIO_SUFFIXES = {".m4a", ".aac", ".mp4", ".webm", ".wma", ".amr", ".3gp", ".mkv"}  # need ffmpeg
REQUIRED_LABELS = ("speaker", "emotion", "licence")
# Manifest column names other corpora use for ours.
ALIASES = {"license": "licence", "text": "transcript", "sentence": "transcript", "audio_filepath": "path",
           "audio": "path", "file": "path", "filename": "path"}
HF_GUESSES = {  # first present column wins, unless --hf-column says otherwise
    "audio": ("audio",),
    "transcript": ("transcript", "text", "sentence", "raw_transcription", "transcription"),
    "speaker": ("speaker", "speaker_id", "client_id", "spk_id"),
    "emotion": ("emotion",),
    "licence": ("licence", "license"),
    "gender": ("gender",),
    "words": ("words",),
}


@dataclass
class IngestConfig:
    out: Path
    manifests: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    hf_datasets: list[Path] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    i_have_the_rights: bool = False  # required for --url: you hold the rights to train on what you download
    # Labels for sources that do not carry them at all (a folder; a manifest or dataset without that column).
    # A row of a source that has the column but leaves it empty is a "missing label" and is skipped.
    speaker: str | None = None
    emotion: str | None = None
    licence: str | None = None
    hf_columns: dict[str, str] = field(default_factory=dict)  # our label -> the dataset's column
    target_dbfs: float = -23.0  # RMS of the voiced part after normalisation
    peak_dbfs: float = -1.0  # ceiling for the peak after normalisation
    min_duration: float = 0.3
    max_duration: float = 4 * 3600.0
    min_source_rate: int = 8_000  # below this there is too little bandwidth for speech training
    silence_dbfs: float = -50.0  # the loudest 20 ms frame below this: silent
    clip_fraction: float = 0.001  # more than this share of samples in full-scale runs: clipped
    force: bool = False
    quiet: bool = False

    def audio_settings(self) -> dict:
        """The settings that change the audio written (part of each item's resume signature)."""
        return {k: getattr(self, k) for k in ("target_dbfs", "peak_dbfs", "min_duration", "max_duration",
                                              "min_source_rate", "silence_dbfs", "clip_fraction")}


@dataclass
class SourceItem:
    key: str  # identity of the item (resolved path, dataset row or URL)
    source: str  # what the report shows
    name: str  # base for the output id
    labels: dict[str, Any] = field(default_factory=dict)
    columns: frozenset[str] = frozenset()  # labels this source carries at all
    path: Path | None = None
    loader: Callable[[], tuple[np.ndarray, int]] | None = None  # in-memory audio (datasets, downloads)
    stamp: Any = None  # what identifies the audio's content for resuming (size + mtime, row index)
    problem: str | None = None  # found while listing: skip with this reason
    # What the output id is derived from: relative to the manifest/folder/dataset, so the same corpus
    # gets the same ids (and the same seeded dialogues) wherever it is unpacked.
    id_key: str = ""


# ---------------------------------------------------------------------------------------------- sources

def _canonical(row: dict) -> dict:
    return {ALIASES.get(k.strip().lower(), k.strip().lower()): v for k, v in row.items() if k is not None}


def _file_stamp(path: Path) -> Any:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def _manifest_items(manifest: Path) -> Iterator[SourceItem]:
    if not manifest.is_file():
        yield SourceItem(str(manifest), str(manifest), manifest.stem, problem=f"manifest not found: {manifest}")
        return
    rows: list[tuple[int, dict | None, str | None]] = []
    if manifest.suffix.lower() in (".csv", ".tsv"):
        with manifest.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if manifest.suffix.lower() == ".tsv" else ",")
            for number, row in enumerate(reader, 2):
                rows.append((number, _canonical(row), None))
    else:
        with manifest.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.append((number, _canonical(row), None) if isinstance(row, dict)
                                else (number, None, "manifest line is not a JSON object"))
                except json.JSONDecodeError as exc:
                    rows.append((number, None, f"malformed manifest line: {exc}"))
    columns = frozenset(k for _, row, _ in rows if row for k, v in row.items())
    for number, row, problem in rows:
        where = f"{manifest}:{number}"
        if row is None:
            yield SourceItem(where, where, manifest.stem, problem=problem)
            continue
        raw_path = clean_text(row.get("path"))
        if not raw_path:
            yield SourceItem(where, where, manifest.stem, labels=row, columns=columns,
                             problem="no audio path in the row (a transcript with no audio)")
            continue
        path = Path(raw_path)
        path = path if path.is_absolute() else (manifest.parent / path)
        path = Path(path.resolve())
        yield SourceItem(str(path), f"{where} ({raw_path})", clean_text(row.get("id")) or path.stem, labels=row,
                         columns=columns, path=path, stamp=_file_stamp(path), id_key=f"{manifest.name}:{raw_path}")


def _folder_items(folder: Path) -> Iterator[SourceItem]:
    if not folder.is_dir():
        yield SourceItem(str(folder), str(folder), folder.name, problem=f"folder not found: {folder}")
        return
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix not in AUDIO_SUFFIXES | OTHER_AUDIO_SUFFIXES:
            continue  # transcripts, notes and the like
        labels: dict[str, Any] = {}
        sidecar = path.with_suffix(".txt")  # a transcript next to the audio: x.wav + x.txt
        if sidecar.is_file():
            labels["transcript"] = sidecar.read_text(encoding="utf-8")
        rel = path.relative_to(folder)
        yield SourceItem(str(path.resolve()), str(path), "_".join(rel.with_suffix("").parts), labels=labels,
                         columns=frozenset(labels), path=path.resolve(), stamp=_file_stamp(path),
                         id_key=f"{folder.name}/{rel.as_posix()}")


def _hf_audio(value: Any) -> tuple[np.ndarray, int]:
    """The audio cell of a datasets row, in the shapes `datasets` versions produce."""
    if isinstance(value, dict) and value.get("array") is not None:
        return np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    if isinstance(value, dict) and value.get("bytes"):
        audio, rate = read_file(io.BytesIO(value["bytes"]))
        return audio, rate
    if isinstance(value, dict) and value.get("path"):
        audio, rate = read_file(value["path"])
        return audio, rate
    if isinstance(value, str):
        audio, rate = read_file(value)
        return audio, rate
    if hasattr(value, "get_all_samples"):  # datasets >= 4 decodes with torchcodec
        samples = value.get_all_samples()
        return np.asarray(samples.data.cpu().numpy(), dtype=np.float32).T, int(samples.sample_rate)
    raise ValueError(f"cannot read the audio cell ({type(value).__name__})")


def _hf_items(path: Path, config: IngestConfig) -> Iterator[SourceItem]:
    if importlib.util.find_spec("datasets") is None:
        yield SourceItem(str(path), str(path), path.name, problem=(
            "the `datasets` package is not installed, so a saved Hugging Face dataset cannot be read "
            "(pip install datasets; it is not in requirements.txt on purpose)"))
        return
    datasets = importlib.import_module("datasets")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to open is reported, the run goes on
        yield SourceItem(str(path), str(path), path.name, problem=f"cannot load dataset: {exc}")
        return
    splits = list(loaded.items()) if isinstance(loaded, dict) else [("data", loaded)]
    for split, dataset in splits:
        names = list(getattr(dataset, "column_names", None) or (dataset[0].keys() if len(dataset) else []))
        chosen = {}
        for label, guesses in HF_GUESSES.items():
            column = config.hf_columns.get(label) or next((g for g in guesses if g in names), None)
            if column in names:
                chosen[label] = column
        if "audio" not in chosen:
            yield SourceItem(f"{path}:{split}", f"{path}:{split}", path.name,
                             problem=f"no audio column among {names} (set --hf-column audio=NAME)")
            continue
        columns = frozenset(label for label in chosen if label != "audio")
        label_columns = [chosen[label] for label in columns]
        # Labels are read without the audio column (decoding every row's audio just to list it would be
        # slow); a row's audio is decoded only when that item is processed, never for a resumed one.
        labels_only = dataset.select_columns(label_columns) if hasattr(dataset, "select_columns") else dataset
        for index in range(len(dataset)):
            row = labels_only[index]
            labels = {label: row.get(column) for label, column in chosen.items() if label != "audio"}
            labels = {k: (v if isinstance(v, (str, list)) or v is None else str(v)) for k, v in labels.items()}
            where = f"{path.name}:{split}:{index}"
            yield SourceItem(f"{path.resolve()}:{split}:{index}", where, f"{path.name}_{split}_{index:06d}",
                             labels=labels, columns=columns,
                             loader=lambda d=dataset, i=index, c=chosen["audio"]: _hf_audio(d[i][c]),
                             stamp=[str(path.resolve()), split, index, _file_stamp(path)],
                             id_key=f"{path.name}:{split}:{index}")


def yt_dlp_command() -> list[str] | None:
    if shutil.which("yt-dlp"):
        return ["yt-dlp"]
    if importlib.util.find_spec("yt_dlp") is not None:
        import sys
        return [sys.executable, "-m", "yt_dlp"]
    return None


def _url_items(config: IngestConfig) -> Iterator[SourceItem]:
    command = yt_dlp_command()
    for url in config.urls:
        name = f"url_{short_hash(url)}"
        if command is None:
            yield SourceItem(url, url, name, problem=(
                "yt-dlp is not installed, so the URL was not downloaded (pip install yt-dlp; "
                "it is deliberately not a project requirement)"))
            continue
        folder = config.out / ".downloads" / name

        def load(url: str = url, folder: Path = folder) -> tuple[np.ndarray, int]:
            done = sorted(folder.glob("audio.*")) if folder.is_dir() else []
            if not done:
                folder.mkdir(parents=True, exist_ok=True)
                result = subprocess.run([*command, "--no-playlist", "-x", "--audio-format", "wav",
                                         "-o", str(folder / "audio.%(ext)s"), url],
                                        capture_output=True, text=True, timeout=3600)
                done = sorted(folder.glob("audio.*"))
                if result.returncode != 0 or not done:
                    raise ValueError(f"download failed: {(result.stderr or result.stdout).strip()[-300:]}")
            audio, rate = read_file(done[0])
            return audio, rate

        yield SourceItem(url, url, name, labels={}, columns=frozenset(), loader=load, stamp=url)


def list_items(config: IngestConfig) -> Iterator[SourceItem]:
    for manifest in config.manifests:
        yield from _manifest_items(Path(manifest))
    for folder in config.folders:
        yield from _folder_items(Path(folder))
    for dataset in config.hf_datasets:
        yield from _hf_items(Path(dataset), config)
    if config.urls:
        yield from _url_items(config)


# ---------------------------------------------------------------------------------------------- audio

def decode(path: Path) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the rate; ValueError with the reason when it cannot be read."""
    try:
        audio, rate = read_file(path)
        return audio, rate
    except (RuntimeError, sf.LibsndfileError) as exc:
        error = exc
    if shutil.which("ffmpeg"):
        result = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "wav", "-acodec", "pcm_f32le", "-"],
                                capture_output=True, timeout=600)
        if result.returncode == 0:
            try:
                audio, rate = read_file(io.BytesIO(result.stdout))
                return audio, rate
            except (RuntimeError, sf.LibsndfileError) as exc:
                error = exc
    elif path.suffix.lower() in OTHER_AUDIO_SUFFIXES:
        raise ValueError(f"unsupported format {path.suffix}: install ffmpeg or convert to WAV/FLAC first")
    raise ValueError(f"corrupt or unreadable audio: {str(error).strip()}")


def clipped_share(audio: np.ndarray, level: float = 0.999, run: int = 3) -> float:
    """Share of samples inside runs of >= `run` consecutive full-scale samples (flat-topped clipping)."""
    total = 0
    for channel in np.atleast_2d(audio.T):
        mask = np.abs(channel) >= level
        if not mask.any():
            continue
        edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        lengths = ends - starts
        total += int(lengths[lengths >= run].sum())
    return total / max(audio.size, 1)


def normalise(x: np.ndarray, rate: int, target_dbfs: float, peak_dbfs: float) -> tuple[np.ndarray, float]:
    """Voiced-part RMS to target_dbfs, peak capped at peak_dbfs (see the module docstring)."""
    levels = frame_rms_db(x, rate)
    loudest = float(levels.max())
    active = levels[levels > max(loudest - 30.0, -70.0)]  # the voiced part, not the pauses
    level = float(10 * np.log10(np.mean(10 ** (active / 10)))) if active.size else loudest
    peak = float(20 * np.log10(max(float(np.abs(x).max()), 1e-10)))
    gain = min(target_dbfs - level, peak_dbfs - peak)
    return (x * 10 ** (gain / 20)).astype(np.float32), round(gain, 2)


# ---------------------------------------------------------------------------------------------- items

def _labels(item: SourceItem, config: IngestConfig) -> dict[str, Any]:
    labels = dict(item.labels)
    for name in REQUIRED_LABELS:
        value = clean_text(labels.get(name))
        if value is None and name not in item.columns:
            value = getattr(config, name)  # the source has no such column: the command line's default
        labels[name] = value
    return labels


def _agent_channel(value: Any) -> int | None:
    text = str(value).strip().lower()
    return {"0": 0, "left": 0, "l": 0, "1": 1, "right": 1, "r": 1}.get(text)


def _check_item(item: SourceItem, config: IngestConfig, emotions: list[str]) -> tuple[dict, str | None]:
    """Labels resolved and validated, or a reason to skip."""
    if item.problem:
        return {}, item.problem
    if item.path is not None and not item.path.is_file():
        return {}, f"audio file not found: {item.path}"
    labels = _labels(item, config)
    missing = [name for name in REQUIRED_LABELS if not labels.get(name)]
    if missing:
        return labels, (f"missing label: {', '.join(missing)} (give it in the row, or --{missing[0]} "
                        f"for sources without that column)")
    if labels["emotion"] not in emotions:
        return labels, f"unknown emotion: {labels['emotion']!r} (catalogue: {', '.join(emotions)})"
    try:
        labels["words"] = parse_words(labels.get("words"))
        labels["segments"] = parse_segments(labels.get("segments"))
    except RecordError as exc:
        return labels, f"bad timings: {exc}"
    for name in ("transcript", "user_transcript", "user_speaker", "gender"):
        labels[name] = clean_text(labels.get(name))
    channel = labels.get("agent_channel")
    if channel not in (None, ""):
        labels["agent_channel"] = _agent_channel(channel)
        if labels["agent_channel"] is None:
            return labels, f"bad agent_channel {channel!r}: use 0/left or 1/right"
    else:
        labels["agent_channel"] = None
    return labels, None


def _make_record(item: SourceItem, labels: dict, item_id: str,
                 config: IngestConfig) -> tuple[AudioRecord | None, str | None]:
    """Decode, check, convert and write one item; (record, None) or (None, reason to skip)."""
    try:
        audio, rate = item.loader() if item.loader is not None else decode(item.path)
    except Exception as exc:  # noqa: BLE001 - a bad item must never stop the run
        reason = str(exc)
        return None, (reason if reason.startswith(("corrupt", "unsupported", "download"))
                      else f"corrupt or unreadable audio: {reason}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    if rate < config.min_source_rate:
        return None, f"sample rate too low: {rate} Hz (minimum {config.min_source_rate} Hz)"
    if audio.shape[0] == 0:
        return None, "empty audio"
    if not np.isfinite(audio).all():
        return None, "non-finite samples (NaN/Inf) in the audio"
    duration = audio.shape[0] / rate
    if duration < config.min_duration:
        return None, f"too short: {duration:.2f} s (minimum {config.min_duration:.2f} s)"
    if duration > config.max_duration:
        return None, f"too long: {duration:.0f} s (maximum {config.max_duration:.0f} s)"
    share = clipped_share(audio)
    if share > config.clip_fraction:
        return None, f"clipped: {100 * share:.2f}% of samples in full-scale runs"
    conversation = labels.get("agent_channel") is not None
    if conversation:
        if audio.shape[1] != 2:
            return None, f"a two-speaker recording needs 2 channels (one speaker each), got {audio.shape[1]}"
        agent = labels["agent_channel"]
        channels = [audio[:, agent], audio[:, 1 - agent]]  # reorder: LEFT = agent, RIGHT = user
    else:
        channels = [audio.mean(axis=1)]
    loudest = float(frame_rms_db(channels[0], rate).max())
    if loudest < config.silence_dbfs:
        what = "agent channel " if conversation else ""
        return None, f"silent: {what}loudest 20 ms at {loudest:.1f} dBFS (threshold {config.silence_dbfs:.0f})"
    out_channels, gains = [], []
    for channel in channels:
        converted = resample(channel, rate, SAMPLE_RATE)
        # A channel with no sound at all (a monologue's empty user side) is left as it is.
        if float(frame_rms_db(converted, SAMPLE_RATE).max()) < config.silence_dbfs:
            out_channels.append(converted)
            gains.append(0.0)
            continue
        converted, gain = normalise(converted, SAMPLE_RATE, config.target_dbfs, config.peak_dbfs)
        out_channels.append(converted)
        gains.append(gain)
    out = np.stack(out_channels, axis=1) if conversation else out_channels[0]
    rel = f"audio/{item_id}.wav"
    atomic_write_wav(config.out / rel, out, SAMPLE_RATE)
    record = AudioRecord(
        id=item_id, path=rel, duration=round(out.shape[0] / SAMPLE_RATE, 4),
        kind=CONVERSATION if conversation else UTTERANCE, speaker=labels["speaker"], emotion=labels["emotion"],
        licence=labels["licence"], source=item.key, transcript=labels.get("transcript"), words=labels.get("words"),
        segments=labels.get("segments"), user_speaker=labels.get("user_speaker"),
        user_transcript=labels.get("user_transcript"), gender=labels.get("gender"),
        channels=2 if conversation else 1, source_rate=rate, gain_db=gains[0])
    return record, None


def run_ingest(config: IngestConfig) -> Summary:
    if config.urls and not config.i_have_the_rights:
        raise UsageError("--url downloads media: add --i-have-the-rights to confirm you hold the rights "
                         "(licence or permission) to train on it; nothing was downloaded")
    if not (config.manifests or config.folders or config.hf_datasets or config.urls):
        raise UsageError("nothing to ingest: give --manifest, --folder, --hf-dataset or --url")
    run = StageRun("ingest", config.out, config.force, config.quiet)
    out, report = run.out, run.report
    emotions = [e.id for e in load_catalogue().emotions]
    seen: dict[str, str] = {}  # resolved audio -> the first item that used it
    for item in progress(list_items(config), "ingest", quiet=config.quiet):
        labels, reason = _check_item(item, config, emotions)
        item_id = f"{safe_id(item.name, 60)}-{short_hash(item.id_key or item.key, n=6)}"
        if reason is None and item.key in seen:
            reason = f"duplicate: the same audio as {seen[item.key]}"
        if reason is not None:
            report.skip(item_id if item.path or item.loader else item.source, item.source, reason)
            continue
        seen[item.key] = item.source
        signature = fingerprint(item.key, item.stamp, {k: v for k, v in labels.items()}, config.audio_settings())
        if run.reuse(item_id, signature, AudioRecord):
            continue
        record, reason = _make_record(item, labels, item_id, config)
        if record is None:
            report.skip(item_id, item.source, reason or "unknown problem")
            continue
        if record.kind == CONVERSATION and record.user_speaker is None:
            report.note(item_id, item.source, "two-speaker recording without user_speaker: the user side is 'unknown'")
        run.keep(item_id, signature, record, [out / record.path])
    return run.finish()
