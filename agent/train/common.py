"""Plumbing shared by the stages: atomic writes, manifests, the skip report, resume markers, progress.

Resume: each finished item leaves a marker `.done/<item>.json` (written last, atomically) holding a
signature of its inputs and stage settings, its output files with their sizes, and its records. A
rerun reuses an item whose marker matches and whose outputs are all there at those sizes, so an
interrupted run picks up where it stopped and a finished one redoes nothing; changing an input or a
setting redoes the items it affects. The manifest is rewritten whole at the end of every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf
from tqdm import tqdm

from agent.audio.files import read_file
from agent.train.records import RecordError, from_dict, to_dict

MANIFEST, REPORT, SUMMARY, DONE_DIR = "manifest.jsonl", "report.jsonl", "summary.json", ".done"
PIPELINE_VERSION = 1  # bump to invalidate every marker when outputs change meaning

T = TypeVar("T")


class UsageError(Exception):
    """A problem with how a stage was called (not with one data item): the run stops with this message."""


def safe_id(text: str, limit: int = 80) -> str:
    """A file-name-safe id: letters, digits, '-', '_' and '.' (other characters become '_')."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "item"
    return cleaned[:limit]


def short_hash(*parts: Any, n: int = 8) -> str:
    return fingerprint(*parts)[:n]


def fingerprint(*parts: Any) -> str:
    blob = json.dumps([PIPELINE_VERSION, *[asdict(p) if is_dataclass(p) else p for p in parts]],
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def _tmp_path(path: Path) -> Path:
    # Same folder (so os.replace is atomic), hidden, unique per process, keeps the suffix for soundfile.
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=None) + "\n")


def atomic_write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    """PCM-16 WAV via a temporary file and a rename: a killed run never leaves a half-written WAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    sf.write(tmp, np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no second copy of the audio on disk), else copy; atomic either way."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dst)
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_manifest(path: Path, records: Iterable[Any]) -> None:
    lines = [json.dumps(to_dict(r) if is_dataclass(r) else r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_manifest(path: Path, cls: type[T], report: Report) -> list[T]:
    """The records of a previous stage's manifest; malformed lines go to the report, the rest are kept."""
    if not path.is_file():
        raise UsageError(f"input manifest {path} does not exist (run the previous stage first)")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(from_dict(cls, json.loads(line)))
            except (json.JSONDecodeError, RecordError) as exc:
                report.skip(f"{path.name}:{number}", str(path), f"malformed manifest line: {exc}")
    return records


@dataclass
class Summary:
    stage: str
    out: str
    kept: int = 0  # records in the output manifest
    made: int = 0  # items processed this run
    reused: int = 0  # items found complete from an earlier run
    skipped: int = 0
    notes: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # skips by reason kind
    seconds: float = 0.0
    audio_hours: float = 0.0

    def line(self) -> str:
        return (f"{self.stage}: {self.kept} kept ({self.made} made, {self.reused} reused from an earlier run), "
                f"{self.skipped} skipped, {self.notes} notes, {self.audio_hours * 60:.1f} min of audio "
                f"in {self.seconds:.1f} s -> {self.out}")


class Report:
    """Every skipped item and every note, one JSON line each in report.jsonl, and a line on stderr."""

    def __init__(self, stage: str, out: Path, quiet: bool = False):
        self.stage, self.out, self.quiet = stage, out, quiet
        self.lines: list[dict] = []
        self.started = time.monotonic()

    def _add(self, action: str, item: str, source: str, reason: str) -> None:
        self.lines.append({"stage": self.stage, "action": action, "item": item, "source": source, "reason": reason})
        if not self.quiet:
            tqdm.write(f"[{self.stage}] {action} {item}: {reason}", file=sys.stderr)

    def skip(self, item: str, source: str, reason: str) -> None:
        """An item left out of the output (bad data); the run goes on."""
        self._add("skipped", item, source, reason)

    def note(self, item: str, source: str, reason: str) -> None:
        """Something worth knowing about an item that was kept (or partly kept)."""
        self._add("note", item, source, reason)

    def mark(self) -> int:
        """A bookmark: `notes_since(mark)` returns the notes added after it (to store with an item)."""
        return len(self.lines)

    def notes_since(self, mark: int) -> list[dict]:
        return [x for x in self.lines[mark:] if x["action"] == "note"]

    def finish(self, kept: int, made: int, reused: int, audio_seconds: float) -> Summary:
        reasons: dict[str, int] = {}
        for line in self.lines:
            if line["action"] == "skipped":
                kind = line["reason"].split(":")[0].split(" (")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
        summary = Summary(self.stage, str(self.out), kept, made, reused,
                          sum(1 for x in self.lines if x["action"] == "skipped"),
                          sum(1 for x in self.lines if x["action"] == "note"),
                          dict(sorted(reasons.items())), round(time.monotonic() - self.started, 2),
                          round(audio_seconds / 3600, 4))
        atomic_write_text(self.out / REPORT, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in self.lines))
        atomic_write_json(self.out / SUMMARY, asdict(summary))
        return summary


class Markers:
    """Per-item completion markers in <out>/.done (see the module docstring)."""

    def __init__(self, out: Path, force: bool = False):
        self.out, self.dir, self.force = out, out / DONE_DIR, force
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / f"{safe_id(key, 120)}-{short_hash(key)}.json"

    def load(self, key: str, signature: str, report: Report | None = None) -> Any | None:
        """The payload saved for `key` if the item is complete with this signature, else None.
        The notes the item produced when it was made are replayed into `report`, so a resumed
        run's report says the same as the first one."""
        path = self._path(key)
        if self.force or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("signature") != signature:
            return None
        for rel, size in data.get("outputs", {}).items():
            target = self.out / rel
            if not target.is_file() or target.stat().st_size != size:
                return None
        if report is not None:
            report.lines.extend(data.get("notes", []))
        return data.get("payload")

    def save(self, key: str, signature: str, outputs: Iterable[Path], payload: Any,
             notes: list[dict] | None = None) -> None:
        files = {str(p.relative_to(self.out)): p.stat().st_size for p in outputs}
        atomic_write_json(self._path(key), {"signature": signature, "outputs": files, "payload": payload,
                                            "notes": notes or []})


class StageRun:
    """The opening and closing every per-item stage shares: its output folder, report, resume markers,
    the records it keeps and the made/reused counts; `finish` writes the manifest and the summary.

        run = StageRun("align", config.out, config.force, config.quiet)
        for item in ...:
            if run.reuse(key, signature, AlignedRecord):   # complete from an earlier run: its records kept
                continue
            ...                                            # make it; run.report.skip(...) and continue on bad data
            run.keep(key, signature, record, [files written])
        return run.finish()

    Notes reported between `reuse` (which returned False) and `keep` are stored with the item, so a resumed
    run's report says what the first one said.
    """

    def __init__(self, stage: str, out: Path, force: bool = False, quiet: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.report = Report(stage, self.out, quiet)
        self.markers = Markers(self.out, force)
        self.records: list[Any] = []
        self.made = self.reused = 0
        self._mark = 0

    def read(self, manifest: Path, cls: type[T]) -> list[T]:
        """The previous stage's records (malformed lines reported and left out)."""
        return read_manifest(Path(manifest), cls, self.report)

    def reuse(self, key: str, signature: str, cls: type) -> bool:
        """True (and the item's records kept) when an earlier run finished `key` with this signature."""
        payload = self.markers.load(key, signature, self.report)
        if payload is None:
            self.start_item()
            return False
        self.records.extend(from_dict(cls, p) for p in (payload if isinstance(payload, list) else [payload]))
        self.reused += 1
        return True

    def start_item(self) -> None:
        """Notes reported from here to `keep` are stored with the item (`reuse` calls this when it returns
        False; a stage that makes its items elsewhere calls it before replaying an item's notes)."""
        self._mark = self.report.mark()

    def keep(self, key: str, signature: str, made: Any, outputs: Iterable[Path]) -> None:
        """A finished item: one record or a list of them, and the files it wrote (marker written last)."""
        payload = [to_dict(r) for r in made] if isinstance(made, list) else to_dict(made)
        self.markers.save(key, signature, outputs, payload, self.report.notes_since(self._mark))
        self.records.extend(made if isinstance(made, list) else [made])
        self.made += 1

    def finish(self) -> Summary:
        write_manifest(self.out / MANIFEST, self.records)
        return self.report.finish(len(self.records), self.made, self.reused,
                                  sum(getattr(r, "duration", 0.0) for r in self.records))


def ray_failure(exc: BaseException) -> tuple[str, str]:
    """An item that failed on every try, as the stages' own skip result: the original error, not Ray's
    wrapper with its traceback (which stays in the worker's log)."""
    cause = getattr(exc, "cause", None) or exc  # a task's exception arrives wrapped in RayTaskError
    return "skip", f"failed on Ray after retries: {type(cause).__name__}: {cause}"


def parallel_map(fn: Any, jobs: list, workers: int, ray: str | None = None, failed: Any = None,
                 actors: bool = False, num_gpus: float = 0) -> Iterator:
    """fn over jobs, results in order: in this process (workers <= 1), in `workers` spawned processes
    (spawn, not fork: the parent may hold torch threads) or on a Ray cluster (`ray`: "local", "auto" or an
    address; `actors` for items that need a model, loaded once per actor; a failing item gives failed(exc)
    after retries). fn and the jobs must pickle; an item's result must not depend on which process made
    it, so any worker count or backend gives the same output."""
    if ray:
        from agent.train.ray_backend import ray_map
        return ray_map(fn, jobs, ray, failed or ray_failure, num_gpus=num_gpus, actors=actors)
    if workers <= 1 or len(jobs) <= 1:
        return map(fn, jobs)
    import multiprocessing
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))

    def results() -> Iterator:
        try:
            yield from pool.imap(fn, jobs)
        finally:
            pool.terminate()
    return results()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's thread count set to n for a block, then put back (the process may go on to train). A float
    sum split over threads rounds differently, so a model's output (a Mimi code, a VAD probability) can
    follow the thread count: the per-item stages run their models at a fixed count in every process."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ItemReport(list):
    """What one item reports (skips and notes), made where the item is processed (maybe another process or
    a Ray worker) and replayed into the stage's report by the driver, in order: a Report for a worker."""

    def note(self, item: str, source: str, reason: str) -> None:
        self.append(("note", item, source, reason))

    def skip(self, item: str, source: str, reason: str) -> None:
        self.append(("skipped", item, source, reason))

    def replay(self, report: Report) -> None:
        for action, item, source, reason in self:
            if action == "skipped":
                report.skip(item, source, reason)
            else:
                report.note(item, source, reason)


def progress(items: Iterable[T], desc: str, total: int | None = None, quiet: bool = False) -> Iterator[T]:
    return iter(tqdm(items, desc=desc, total=total, unit="item", disable=quiet, file=sys.stderr,
                     mininterval=0.5, dynamic_ncols=True))


def read_audio_checked(path: Path, rate: int, channels: int | None = None) -> np.ndarray:
    """A pipeline WAV as float32 (frames, channels); raises ValueError with a reason a report can use."""
    if not path.is_file():
        raise ValueError(f"audio file not found: {path}")
    try:
        audio, file_rate = read_file(path)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise ValueError(f"corrupt or unreadable audio: {exc}") from exc
    if file_rate != rate:
        raise ValueError(f"wrong sample rate: {file_rate} Hz, expected {rate} Hz (run ingest on it)")
    if channels is not None and audio.shape[1] != channels:
        raise ValueError(f"wrong channel count: {audio.shape[1]}, expected {channels}")
    return audio


def rms_db(x: np.ndarray) -> float:
    return float(20 * np.log10(max(np.sqrt(np.mean(np.square(x, dtype=np.float64))), 1e-10))) if x.size else -200.0


def frame_rms_db(x: np.ndarray, rate: int, frame_s: float = 0.02) -> np.ndarray:
    """RMS level (dBFS) of consecutive frames of a mono signal."""
    n = max(1, int(rate * frame_s))
    usable = x[: (x.size // n) * n]
    if usable.size == 0:
        return np.array([rms_db(x)])
    frames = usable.reshape(-1, n).astype(np.float64)
    return 20 * np.log10(np.maximum(np.sqrt(np.mean(frames ** 2, axis=1)), 1e-10))
