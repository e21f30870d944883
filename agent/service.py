"""The running agent: the loaded models, their engines and the live calls.

Built once per process (`build_service`) and shared by the page, the WebSocket endpoint and the
readouts. Nothing here knows about HTTP, Gradio or fastrtc: the transports (agent.transports.fastrtc_handler,
agent.transports.kyutai_api) open calls through `hub`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass

import torch

from agent.calls.cap import CallCap
from agent.calls.hub import CallHub, CallPolicy, CallSetupPool
from agent.calls.registry import SessionRegistry
from agent.calls.vad import VadHub
from agent.config import EngineConfig, ModelConfig, ServerConfig
from agent.engine import FrameEngine
from agent.models import LoadedModel, load_model
from agent.ops.metrics import PrometheusExporter
from agent.voices import Catalogue, Support, load_catalogue

log = logging.getLogger(__name__)


@dataclass
class AgentService:
    engines: list[FrameEngine]  # one per loaded model; calls are routed by voice (CallHub.route)
    catalogue: Catalogue
    registry: SessionRegistry
    hub: CallHub
    server_config: ServerConfig
    exporter: PrometheusExporter
    vad: VadHub

    @property
    def engine(self) -> FrameEngine:
        """The primary engine (the first model): the one calls go to unless their voice needs another."""
        return self.engines[0]

    @property
    def model(self) -> LoadedModel:
        return self.engine.model

    @property
    def random_weights(self) -> bool:
        return any(e.model.random_weights for e in self.engines)

    def seats_total(self) -> int:
        return sum(e.num_seats for e in self.engines)

    def seats_in_use(self) -> int:
        return sum(e.seats_in_use() for e in self.engines)

    def voice_support(self) -> dict[str, Support]:
        """A voice is supported if any loaded model has it."""
        per_model = [self.catalogue.voice_support(e.model.name, e.condition_values, e.prompt_presets())
                     for e in self.engines]
        return {v.id: next((m[v.id] for m in per_model if m[v.id].supported), per_model[0][v.id])
                for v in self.catalogue.voices}

    def emotion_support(self) -> dict[str, Support]:
        per_model = [self.catalogue.emotion_support(e.condition_values, e.prompt_presets() is not None)
                     for e in self.engines]
        return {x.id: next((m[x.id] for m in per_model if m[x.id].supported), per_model[0][x.id])
                for x in self.catalogue.emotions}

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready means a new call would get a seat now."""
        if self.hub.draining:
            return False, "draining"
        for engine in self.engines:
            healthy, reason = engine.health()
            if not healthy:
                return False, reason
        if self.seats_in_use() >= self.seats_total():
            return False, "all seats in use"
        return True, "ready"

    def metric_values(self) -> dict[str, float]:
        values = {"seats_total": self.seats_total(), "seats_in_use": self.seats_in_use(),
                  "draining": float(self.hub.draining)}
        for name in ("calls_started", "calls_refused", "input_dropped", "output_dropped", "late_ticks",
                     "prompts_restored", "prompt_prefills", "prompt_cache_entries", "prompt_cache_bytes",
                     "step_failures"):
            values[name] = sum(getattr(e.stats, name) for e in self.engines)
        for q in ("p50", "p99"):  # the worst engine's
            values[f"tick_lateness_{q}_seconds"] = max(1e-3 * (e.stats.lateness_ms()[q] or 0.0) for e in self.engines)
        return values

    def drain(self, timeout: float) -> bool:
        """Stop taking calls and wait up to `timeout` s for live ones to end. True if all ended."""
        self.hub.draining = True
        log.info("draining: no new calls; waiting up to %.0f s for %d live call(s)", timeout, self.seats_in_use())
        deadline = time.monotonic() + timeout
        while self.seats_in_use() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.seats_in_use()
        if left:
            log.warning("drain timeout: %d call(s) still live", left)
        else:
            log.info("drained")
        return left == 0

    def close(self) -> None:
        for engine in self.engines:
            engine.stop()
        self.hub.stop()
        self.vad.stop()


def settle_heap() -> None:
    """Collect once, then freeze everything alive now (models, the page, the app) out of the
    garbage collector's reach, so its full collections scan only what calls allocate. Without this a
    full collection paused the whole server for 80-150 ms, a few times a minute (8 calls, 2 vCPUs)."""
    gc.collect()
    gc.freeze()


def build_service(model_configs: ModelConfig | list[ModelConfig] | None = None,
                  engine_config: EngineConfig | None = None, server_config: ServerConfig | None = None,
                  warm_up: bool = True) -> AgentService:
    """Load each model (e.g. Moshiko and Moshika to serve both voices), an engine per model."""
    if not isinstance(model_configs, list):
        model_configs = [model_configs or ModelConfig()]
    server_config = server_config or ServerConfig()
    exporter = PrometheusExporter(snapshot=lambda: {})
    engines = []
    for model_config in model_configs:
        model = load_model(model_config)
        if model.device.type == "cpu":
            torch.set_num_threads(server_config.cpu_threads or max(1, (os.cpu_count() or 2) // 2))
        engine = FrameEngine(model, engine_config, model_config.sampling,
                             on_step=lambda seconds, _batch: exporter.step_seconds.observe(seconds))
        if warm_up:
            engine.warm_up()
        engines.append(engine.start())
        log.info("engine ready: %s, %d seats on %s", model.name, engine.num_seats, model.device)
    registry = SessionRegistry()
    catalogue = load_catalogue()
    vad = VadHub().start()
    policy = CallPolicy(silence_ms=server_config.vad_silence_ms, max_call_seconds=server_config.max_call_seconds,
                        resume_seconds=server_config.resume_seconds)
    cap = CallCap(server_config.max_calls_per_client, server_config.max_connections_per_client)
    hub = CallHub(engines, registry, catalogue, policy, cap, CallSetupPool(), vad=vad,
                  on_turn_latency=exporter.voice_to_voice_seconds.observe)
    service = AgentService(engines, catalogue, registry, hub, server_config, exporter, vad)
    exporter.snapshot = service.metric_values
    return service
