"""Settings as dataclasses: one place for every default the app, the engine and the CLI share."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_GPU_MODEL = "kyutai/moshiko-pytorch-bf16"
TINY_MODEL = "tiny"
RANDOM_7B_MODEL = "moshi-7b-random"
TINY_PERSONAPLEX_MODEL = "tiny-personaplex"  # a tiny random PersonaPlex-layout folder, loaded as a real one
SamplingRequest = tuple[tuple[str, float | int], ...]  # (SeatSampling field, value), sorted; () = defaults
TELUGU_TINY_MODEL = "telugu-tiny"  # the toy trained here on synthetic espeak-ng speech (agent.train.telugu_tiny)
MAX_TEXT_PROMPT_CHARS = 2000  # a persona (text prompt) longer than this is refused; the engine also caps its tokens
MAX_TEMP = 2.0  # sampling temperatures above this make Moshi's output noise; a caller asking more is told so


@dataclass
class SamplingConfig:
    """Every call's starting settings (Moshi's own defaults, moshi.models.lm.LMGen); a call may
    choose its own (agent.engine.sampling), top-k up to the caps (they fix the sampler's shapes)."""

    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25
    use_sampling: bool = True  # False: every call starts greedy
    # Caps on a call's top-k: the sampler takes the top max_top_k of every row, 8 times a step for
    # audio, so the audio cap stays at Moshi's default (a call may lower it, not raise it).
    max_top_k: int = 250
    max_top_k_text: int = 100

    def __post_init__(self):
        if self.top_k < 1 or self.top_k_text < 1:
            raise ValueError("top-k must be at least 1 (1 is greedy)")
        if not (0 <= self.temp <= MAX_TEMP and 0 <= self.temp_text <= MAX_TEMP):
            raise ValueError(f"temperatures must be from 0 (greedy) to {MAX_TEMP:g}")
        self.max_top_k = max(self.max_top_k, self.top_k)
        self.max_top_k_text = max(self.max_top_k_text, self.top_k_text)


@dataclass
class ModelConfig:
    model: str | None = None  # HF id, local folder, "tiny", "tiny-personaplex" or "moshi-7b-random"; None = by device
    device: str | None = None  # None = cuda if available, else cpu
    dtype: str | None = None  # None = bfloat16 on cuda, float32 on cpu
    seed: int = 42424242
    context: int | None = None  # LM attention context in frames; None = the checkpoint's own
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class EngineConfig:
    max_sessions: int | None = None  # seats (batch slots); None = chosen from the device
    input_queue_frames: int = 6  # per-seat backlog of input frames (480 ms) before the oldest is dropped
    output_queue_frames: int = 50  # per-seat backlog of output frames (4 s) before the oldest is dropped
    idle_timeout_s: float = 20.0  # a seat whose client sends nothing for this long is freed
    prompt_cache_entries: int = 32  # prompt states kept (LRU)...
    prompt_cache_mib: int = 1024  # ...and at most this much device memory (7B: ~0.5 MiB per prompt frame in bf16)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    vad_silence_ms: int = 300  # silence that ends a user turn (subtracted again when measuring latency)
    max_call_seconds: float | None = 30 * 60  # a call is ended after this long (shared links); None: no limit
    drain_seconds: float = 60.0  # on SIGTERM: stop taking calls, let live ones finish for up to this long
    resume_seconds: float = 15.0  # a call whose connection drops keeps its seat this long for the caller to resume it
    auth: str | None = None  # "user:password": the page's login and HTTP Basic on the API endpoints
    max_calls_per_client: int | None = None  # concurrent WebSocket calls from one address (None: no cap)
    # open connections (API WebSockets, WebRTC offers not yet in a call) from one address; None: no limit
    max_connections_per_client: int | None = 16
    # connections from one address waiting for a request's headers (slowloris; agent.ops.unfinished), and
    # how long each may take to send them; None: no limit
    max_unfinished_requests_per_client: int | None = 32
    request_header_seconds: float = 10.0
    # proxies whose X-Forwarded-For / Forwarded name the client (agent.ops.forwarded): addresses or CIDRs,
    # comma-separated, "none" for none; uvicorn's default, a proxy on this host
    trusted_proxies: str = "127.0.0.1,::1"
    # torch threads for a model on the CPU; None: half the cores, so the transport and the VAD keep the
    # rest (docs/benchmarks.md, "Torch threads on a CPU")
    cpu_threads: int | None = None
