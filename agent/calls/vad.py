"""Silero VAD on both directions of every call, and voice-to-voice latency per user turn.

Method (pipecat's): a user turn ends when the VAD has heard `silence_ms` of silence after speech;
the end of the turn is placed at the last voiced window, i.e. the silence window is subtracted
again. The turn's latency is the time of the agent's first voiced output window that starts after
that end, minus the end. Both times are wall-clock (`time.monotonic()`) at the server:
the input side is stamped when its audio arrived, the output side when its audio was handed to
the transport. Network and client playout buffering are not included.

Cost, which matters on a server (a profile once put Silero at a third of a CPU server's time):
- Silero's weights come from the `silero-vad` wheel (no download) and are loaded once per process.
  Its 8 kHz network is called as a pure function of (window, context, recurrent state), with each
  stream's state kept beside the stream, so one call serves many streams.
- The wheel's ONNX build runs on onnxruntime for batches up to ONNX_MAX_BATCH windows: its fixed
  cost per call is a fifth of the TorchScript build's, which most of the VAD's cost was (2-3 calls
  per 80 ms round however few the streams). Larger batches, and every batch where onnxruntime is
  not installed, run on TorchScript. Both give the same probabilities to within 1e-6.
- `VadHub` runs every call's two streams on one thread: per 32 ms window round, one batched Silero
  call for all loud windows (16 streams cost about what 2 cost one by one). Audio arrives in each
  call's inbox from the transport threads, which never wait for the VAD.
- Windows below -55 dBFS count as silence without a model call.
- The hub's thread runs Silero with one intra-op thread. With torch's default (one per core), each
  of its small calls woke an OpenMP team that spun waiting for cores the engine and transports were
  using: ten times the CPU of one thread on a busy 2-core host (docs/benchmarks.md).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from agent import FRAME_SECONDS, SAMPLE_RATE
from agent.audio.stream import PolyphaseResampler
from agent.ops.metrics import RollingWindow

log = logging.getLogger(__name__)

VAD_RATE = 8_000  # Silero's cheaper rate (a quarter less CPU per window than 16 kHz); ample for speech
WINDOW = 256  # Silero's window at 8 kHz: 32 ms
CONTEXT = 32  # samples of the previous window Silero sees before each window at 8 kHz
# Windows quieter than this are silence without asking Silero (it would say so too). In a call most
# windows on at least one side are silent, and Silero is the largest per-call CPU cost on a server.
SILENCE_RMS = 10 ** (-55 / 20)
REPLY_TIMEOUT_S = 8.0  # a turn with no agent speech within this long is closed as "no reply"
PAUSE_MERGE_FACTOR = 2.0  # speech resuming within 2x the silence window continues the same turn
# Audio waiting to be judged, per call (both directions, 80 ms frames: about 20 s). If the VAD falls
# that far behind, the oldest is dropped and counted: the figures lose a moment, the server no memory.
MAX_INBOX_CHUNKS = 256


def load_silero_package() -> torch.jit.ScriptModule:
    """A new copy of the silero-vad package's own model (it keeps one batch's state inside).
    Importing the package sets torch's thread count to 1 for the whole process; the caller's count
    is restored, since that is the engine's choice, not the VAD's."""
    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad
    model = load_silero_vad()
    torch.set_num_threads(threads)
    return model


# Batches up to this many windows go to onnxruntime, larger ones to TorchScript. Per call, measured
# on this 2-core host with one thread each: onnxruntime 0.11 ms for 2 windows against TorchScript's
# 0.57 (whose fixed cost is most of it), equal near 40, and 1.63 against 1.28 ms for 64 (its
# convolutions loop over the batch; TorchScript's are batched). docs/benchmarks.md has the figures.
ONNX_MAX_BATCH = 40


class TorchScriptSilero:
    """The package's TorchScript 8 kHz network (silero_vad.jit's `_model_8k`)."""

    def __init__(self):
        self._net = load_silero_package()._model_8k
        if self._net.context_size_samples != CONTEXT:
            raise RuntimeError(f"unexpected Silero VAD build: 8 kHz context {self._net.context_size_samples}")

    @torch.no_grad()
    def __call__(self, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, states = self._net(torch.from_numpy(x), torch.from_numpy(states))
        return out[:, 0].numpy(), states.numpy()


class OnnxSilero:
    """The package's ONNX export of the same network (silero_vad.onnx), run by onnxruntime on the
    calling thread alone (one intra-op thread, no pool to spin)."""

    def __init__(self):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # its graph optimiser's notes about unused initialisers
        self._session = onnxruntime.InferenceSession(silero_onnx_path(), options,
                                                     providers=["CPUExecutionProvider"])
        self._rate = np.array(VAD_RATE, np.int64)

    def __call__(self, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, states = self._session.run(None, {"input": x, "state": states, "sr": self._rate})
        return out[:, 0], states


def silero_onnx_path() -> str:
    """The ONNX build inside the installed silero-vad wheel (no download)."""
    from importlib.resources import files
    return str(files("silero_vad") / "data" / "silero_vad.onnx")


class Silero:
    """Silero VAD's 8 kHz network as a function: (windows [N, 256], contexts [N, 32], states
    [2, N, 128]) -> (speech probabilities [N], new states). The package's own `model(x, sr)` keeps
    one batch's state inside the module; here the state is passed in, so streams can join and leave
    a batch freely. tests/test_vad.py checks it against the package's own stateful call.

    The one loader of both of the package's builds: onnxruntime's for batches up to ONNX_MAX_BATCH
    when it is installed, TorchScript's otherwise (their probabilities differ by under 1e-6 on
    Telugu speech, so a stream may move between them as its batch grows and shrinks)."""

    _shared: Silero | None = None
    _lock = threading.Lock()

    def __init__(self, onnx: bool = True, torchscript: bool = True):
        """`onnx`: onnxruntime's build where installed; `torchscript` False: onnxruntime's alone."""
        self._onnx: OnnxSilero | None = None
        if onnx:
            try:
                self._onnx = OnnxSilero()
            except ImportError:
                if not torchscript:
                    raise
                log.info("onnxruntime is not installed: Silero VAD runs on TorchScript alone (dearer per call)")
        self._torchscript = TorchScriptSilero() if torchscript or self._onnx is None else None
        self.calls = {"onnx": 0, "torchscript": 0}  # network invocations so far, per build

    @property
    def backends(self) -> tuple[str, ...]:
        """The builds loaded, in the order they are preferred."""
        return tuple(name for name, net in (("onnx", self._onnx), ("torchscript", self._torchscript))
                     if net is not None)

    @classmethod
    def shared(cls) -> Silero:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @staticmethod
    def initial_state(n: int = 1) -> np.ndarray:
        return np.zeros((2, n, 128), np.float32)

    def __call__(self, windows: np.ndarray, contexts: np.ndarray,
                 states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([contexts, windows], axis=1).astype(np.float32, copy=False)
        states = np.ascontiguousarray(states, np.float32)
        if self._onnx is not None and (self._torchscript is None or x.shape[0] <= ONNX_MAX_BATCH):
            self.calls["onnx"] += 1
            return self._onnx(x, states)
        self.calls["torchscript"] += 1
        return self._torchscript(x, states)


@dataclass
class Segment:
    start: float  # seconds of stream time
    end: float | None = None
    reported_at: float = 0.0  # stream time of the window that decided it (start + min speech, end + silence)


class SpeechDetector:
    """Streaming speech start/end detection on one 24 kHz stream, in stream seconds. `push` runs it
    alone; `run_detectors` runs many at once (what `VadHub` does)."""

    def __init__(self, threshold: float = 0.5, silence_ms: int = 300, min_speech_ms: int = 120):
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.silence_s = silence_ms / 1000
        self.min_speech_s = min_speech_ms / 1000
        self.state = Silero.initial_state()  # Silero's recurrent state for this stream
        self.context = np.zeros(CONTEXT, np.float32)  # the tail of the previous window
        self._resampler = PolyphaseResampler(SAMPLE_RATE, VAD_RATE)
        self._raw: list[np.ndarray] = []  # 24 kHz chunks not resampled yet (see `resample_pending`)
        self._buffer = np.zeros(0, np.float32)
        self._windows_done = 0
        self._current: Segment | None = None
        self._silence_from: float | None = None
        self.speaking = False

    @property
    def stream_seconds(self) -> float:
        """Stream time processed so far (end of the last full window)."""
        return self._windows_done * WINDOW / VAD_RATE

    def feed(self, samples: np.ndarray) -> None:
        """Queue 24 kHz mono float samples (resampled to 8 kHz and judged by `run_detectors`)."""
        self._raw.append(samples.astype(np.float32, copy=False))

    @staticmethod
    def resample_pending(detectors: Sequence[SpeechDetector]) -> None:
        """Every detector's queued audio to 8 kHz in one numpy pass per like group (the filter gives
        the same samples however the audio is chunked or grouped)."""
        fed = [d for d in detectors if d._raw]
        chunks = [d._raw[0] if len(d._raw) == 1 else np.concatenate(d._raw) for d in fed]
        for d, data in zip(fed, PolyphaseResampler.process_together([d._resampler for d in fed], chunks)):
            d._raw = []
            d._buffer = np.concatenate([d._buffer, data]) if d._buffer.size else data

    def next_window(self) -> np.ndarray | None:
        if self._buffer.size < WINDOW:
            return None
        window, self._buffer = self._buffer[:WINDOW], self._buffer[WINDOW:]
        return window

    def push(self, samples: np.ndarray) -> list[Segment]:
        """Feed samples and judge every full window now; returns segments that just started or
        ended. A segment is reported once when it starts (end None) and once when it ends."""
        self.feed(samples)
        return run_detectors([self])[0]

    def on_probability(self, prob: float) -> list[Segment]:
        """Advance one window whose speech probability is `prob`."""
        events: list[Segment] = []
        start = self.stream_seconds
        self._windows_done += 1
        end = self.stream_seconds
        if prob >= self.threshold:
            self._silence_from = None
            if self._current is None:
                self._current = Segment(start)
            if not self.speaking and end - self._current.start >= self.min_speech_s:
                self.speaking = True
                events.append(Segment(self._current.start, reported_at=end))
        elif prob < self.neg_threshold and self._current is not None:
            if self._silence_from is None:
                self._silence_from = start
            if end - self._silence_from >= self.silence_s:
                if self.speaking:
                    events.append(Segment(self._current.start, self._silence_from, reported_at=end))
                self._current, self._silence_from, self.speaking = None, None, False
        return events


def run_detectors(detectors: Sequence[SpeechDetector]) -> list[list[Segment]]:
    """Judge every full window of every detector: per round, each detector's next window, and one
    Silero call for all the loud ones. Returns each detector's events, in order."""
    events: list[list[Segment]] = [[] for _ in detectors]
    SpeechDetector.resample_pending(detectors)
    while True:
        ready = [(i, w) for i, d in enumerate(detectors) if (w := d.next_window()) is not None]
        if not ready:
            return events
        windows = np.stack([w for _, w in ready])
        probs = np.zeros(len(ready))
        loud = np.flatnonzero(np.sqrt(np.mean(np.square(windows), axis=1)) >= SILENCE_RMS)
        if loud.size:
            judged = [detectors[ready[k][0]] for k in loud]
            probs[loud], states = Silero.shared()(windows[loud], np.stack([d.context for d in judged]),
                                                  np.concatenate([d.state for d in judged], axis=1))
            for j, d in enumerate(judged):
                d.state = states[:, j:j + 1]
        for k, (i, window) in enumerate(ready):
            detectors[i].context = window[-CONTEXT:]
            events[i] += detectors[i].on_probability(float(probs[k]))


@dataclass
class Turn:
    user_start: float  # monotonic time the user started speaking
    user_end: float  # monotonic time of the user's last voiced audio (silence window subtracted)
    detected_at: float  # monotonic time the VAD declared the end
    agent_start: float | None = None
    agent_was_speaking: bool = False  # the agent talked over the end of the turn (full duplex)
    closed: bool = False

    @property
    def latency_ms(self) -> float | None:
        return None if self.agent_start is None else 1e3 * (self.agent_start - self.user_end)


class _Clock:
    """Maps stream seconds to wall-clock time from the chunk that carried them (streams run in real
    time): each chunk marks where it started in both; a time maps through the latest mark at or
    before it. Marks are kept for a while because the VAD judges audio a little after it arrived."""

    def __init__(self, keep: int = 256):
        self._stream: deque[float] = deque(maxlen=keep)
        self._wall: deque[float] = deque(maxlen=keep)

    def mark(self, wall_start: float, stream_start: float) -> None:
        self._stream.append(stream_start)
        self._wall.append(wall_start)

    @property
    def latest_wall(self) -> float:
        return self._wall[-1] if self._wall else 0.0

    def wall(self, stream_seconds: float) -> float:
        if not self._stream:
            return stream_seconds
        k = max(0, bisect.bisect_right(self._stream, stream_seconds) - 1)
        return self._wall[k] + (stream_seconds - self._stream[k])


@dataclass
class TurnLatencyTracker:
    """Both VAD streams of one call and the turns measured between them.

    The transport threads hand audio in (`on_user_audio`, `on_agent_audio`: queued, never judged on
    their thread); `process()` judges what is queued, or a `VadHub` does it for many calls at once."""

    silence_ms: int = 300
    on_latency: Callable[[float], None] | None = None  # seconds, for each answered turn
    label: str = ""  # the call's id, for the log
    turns: list[Turn] = field(default_factory=list)
    latencies: RollingWindow = field(default_factory=RollingWindow)

    def __post_init__(self):
        self.user = SpeechDetector(silence_ms=self.silence_ms)
        self.agent = SpeechDetector(silence_ms=200)
        self._user_clock, self._agent_clock = _Clock(), _Clock()
        self._user_seconds = 0.0
        self._agent_seconds = 0.0
        self._agent_onsets: deque[float] = deque(maxlen=16)
        # (from the user?, samples, wall start), bounded: see MAX_INBOX_CHUNKS
        self._inbox: deque[tuple[bool, np.ndarray, float]] = deque(maxlen=MAX_INBOX_CHUNKS)
        self._inbox_lock = threading.Lock()
        self.inbox_dropped = 0  # chunks dropped unjudged because the VAD fell behind
        self._judging = threading.Lock()  # one judge at a time (the hub, or process() after removal)

    def on_user_audio(self, samples: np.ndarray, wall_start: float) -> None:
        """User audio (24 kHz) whose first sample arrived at `wall_start`."""
        self._queue(True, samples, wall_start)

    def on_agent_audio(self, samples: np.ndarray, wall_start: float) -> None:
        """Agent audio (24 kHz) handed to the transport at `wall_start`."""
        self._queue(False, samples, wall_start)

    def _queue(self, from_user: bool, samples: np.ndarray, wall_start: float) -> None:
        with self._inbox_lock:
            if len(self._inbox) == self._inbox.maxlen:
                self.inbox_dropped += 1
            self._inbox.append((from_user, samples, wall_start))

    @property
    def inbox_chunks(self) -> int:
        """Chunks queued and not judged yet."""
        with self._inbox_lock:
            return len(self._inbox)

    def process(self) -> list[Turn]:
        """Judge the queued audio now (this call alone). Returns turns that ended or were answered."""
        return TurnLatencyTracker.judge_all([self])[0]

    @staticmethod
    def judge_all(trackers: Sequence[TurnLatencyTracker]) -> list[list[Turn]]:
        """Judge every tracker's queued audio with one batched Silero call per window round (what
        `VadHub` does for every call). Returns each tracker's turns that ended or were answered."""
        for tracker in trackers:
            tracker._judging.acquire()
        try:
            for tracker in trackers:
                tracker._feed_detectors()
            events = run_detectors([d for t in trackers for d in (t.user, t.agent)])
            return [t._on_user_segments(events[2 * i]) + t._on_agent_segments(events[2 * i + 1])
                    for i, t in enumerate(trackers)]
        finally:
            for tracker in trackers:
                tracker._judging.release()

    def _feed_detectors(self) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, deque(maxlen=MAX_INBOX_CHUNKS)
        for from_user, samples, wall_start in inbox:
            if from_user:
                self._user_clock.mark(wall_start, self._user_seconds)
                self._user_seconds += samples.size / SAMPLE_RATE
                self.user.feed(samples)
            else:
                self._agent_clock.mark(wall_start, self._agent_seconds)
                self._agent_seconds += samples.size / SAMPLE_RATE
                self.agent.feed(samples)

    def _on_user_segments(self, segments: list[Segment]) -> list[Turn]:
        ended = []
        for seg in segments:
            if seg.end is None:
                # The user speaks again. An unanswered end just before this was a pause inside the
                # turn (merged away); an older one was a turn that got no reply.
                resumed = self._user_clock.wall(seg.start)
                self.turns = [t for t in self.turns
                              if t.closed or resumed - t.user_end > PAUSE_MERGE_FACTOR * self.user.silence_s]
                self._close_open_turns(before=resumed)
                continue
            turn = Turn(self._user_clock.wall(seg.start), self._user_clock.wall(seg.end),
                        detected_at=self._user_clock.wall(seg.reported_at),
                        agent_was_speaking=self.agent.speaking)
            self.turns.append(turn)
            log.info("call %s: user turn ended (%.2f s of speech)", self.label, turn.user_end - turn.user_start)
            # The agent may have started before the silence window let us declare the end.
            onset = next((t for t in self._agent_onsets if t >= turn.user_end), None)
            if onset is not None:
                self._answer(turn, onset)
            ended.append(turn)
        return ended

    def _on_agent_segments(self, segments: list[Segment]) -> list[Turn]:
        answered = []
        for seg in segments:
            if seg.end is not None:
                continue
            onset = self._agent_clock.wall(seg.start)
            self._agent_onsets.append(onset)
            for turn in self.turns:
                if not turn.closed and onset >= turn.user_end:
                    self._answer(turn, onset)
                    answered.append(turn)
        self._close_open_turns(before=self._agent_clock.latest_wall - REPLY_TIMEOUT_S)
        return answered

    def _answer(self, turn: Turn, onset: float) -> None:
        turn.agent_start, turn.closed = onset, True
        self.latencies.add(turn.latency_ms)
        log.info("call %s: voice-to-voice latency %.0f ms", self.label, turn.latency_ms)
        if self.on_latency is not None:
            self.on_latency(turn.latency_ms / 1e3)

    def _close_open_turns(self, before: float) -> None:
        for turn in self.turns:
            if not turn.closed and turn.user_end < before:
                turn.closed = True
        del self.turns[:-50]  # keep the recent history only


VAD_TORCH_THREADS = 1


def use_own_torch_threads(n: int, restore: Callable[[], None]) -> None:
    """Give the calling thread `n` intra-op threads, leaving every other thread's count alone.
    torch.set_num_threads sets the caller's OpenMP count and also the count that threads not yet
    started inherit; `restore` (run on the thread that started this one, which keeps its own count)
    puts that default back."""
    torch.get_num_threads()  # torch's lazy per-thread set-up first: it would reapply the default later
    torch.set_num_threads(n)
    restore()


class VadHub:
    """Runs the VAD of every live call on one thread, a round every `period_s`."""

    def __init__(self, period_s: float = FRAME_SECONDS):
        self.period_s = period_s
        self.torch_threads: int | None = None  # the hub thread's intra-op threads, once it runs
        self._trackers: list[TurnLatencyTracker] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        """Calls being judged here now."""
        with self._lock:
            return len(self._trackers)

    def add(self, tracker: TurnLatencyTracker) -> None:
        with self._lock:
            self._trackers.append(tracker)

    def remove(self, tracker: TurnLatencyTracker) -> None:
        """Stop judging this call here; what it had queued is judged now, on the caller's thread."""
        with self._lock:
            if tracker in self._trackers:
                self._trackers.remove(tracker)
        try:
            tracker.process()
        except Exception:  # the call is ending: its last figures are not worth an error to the caller
            log.exception("VAD: the last audio of call %s was not judged", tracker.label)

    def run_once(self) -> None:
        with self._lock:
            trackers = list(self._trackers)
        if trackers:
            TurnLatencyTracker.judge_all(trackers)

    def _loop(self, ready: threading.Event, restored: threading.Event, running: threading.Event) -> None:
        use_own_torch_threads(VAD_TORCH_THREADS, lambda: (ready.set(), restored.wait(5)))
        self.torch_threads = torch.get_num_threads()
        running.set()
        while not self._stop.wait(self.period_s):
            try:
                self.run_once()
            except Exception:  # one bad round must not end latency measurement for every call
                log.exception("VAD round failed")

    def start(self) -> VadHub:
        if self._thread is None:
            threads = torch.get_num_threads()
            ready, restored, running = threading.Event(), threading.Event(), threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(ready, restored, running), name="vad-hub",
                                            daemon=True)
            self._thread.start()
            ready.wait(5)
            torch.set_num_threads(threads)  # this thread's count already; the default for new threads again
            restored.set()
            running.wait(5)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
