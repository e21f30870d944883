"""The running agent: one loaded model, its engine, the live calls and the handler template.

Built once per process (`build_service`) and shared by the page, the WebSocket endpoint and the
readouts. Nothing here knows about HTTP or Gradio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agent.config import EngineConfig, ModelConfig, ServerConfig
from agent.engine import FrameEngine
from agent.handler import MoshiHandler
from agent.metrics import PrometheusExporter
from agent.models import LoadedModel, load_model
from agent.session import CallHub, SessionRegistry
from agent.voices import Catalogue, load_catalogue

log = logging.getLogger(__name__)


@dataclass
class AgentService:
    model: LoadedModel
    engine: FrameEngine
    catalogue: Catalogue
    registry: SessionRegistry
    hub: CallHub
    server_config: ServerConfig
    exporter: PrometheusExporter

    def handler(self, input_sample_rate: int = 24_000) -> MoshiHandler:
        """The handler template fastrtc copies for each connection."""
        return MoshiHandler(self.hub, input_sample_rate=input_sample_rate)

    def conditioner_values(self) -> dict[str, list[str]]:
        return self.model.condition_values

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready means a new call would get a seat now."""
        if self.hub.draining:
            return False, "draining"
        if self.engine.seats_in_use() >= self.engine.num_seats:
            return False, "all seats in use"
        return True, "ready"

    def metric_values(self) -> dict[str, float]:
        stats = self.engine.stats
        return {"calls_started": stats.calls_started, "calls_refused": stats.calls_refused,
                "input_dropped": stats.input_dropped, "output_dropped": stats.output_dropped,
                "late_ticks": stats.late_ticks, "seats_total": self.engine.num_seats,
                "seats_in_use": self.engine.seats_in_use(), "draining": float(self.hub.draining)}

    def drain(self, timeout: float) -> bool:
        """Stop taking calls and wait up to `timeout` s for live ones to end. True if all ended."""
        self.hub.draining = True
        log.info("draining: no new calls; waiting up to %.0f s for %d live call(s)", timeout,
                 self.engine.seats_in_use())
        deadline = time.monotonic() + timeout
        while self.engine.seats_in_use() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.engine.seats_in_use()
        log.info("drained" if not left else "drain timeout: %d call(s) still live", left)
        return left == 0

    def close(self) -> None:
        self.engine.stop()


def build_service(model_config: ModelConfig | None = None, engine_config: EngineConfig | None = None,
                  server_config: ServerConfig | None = None, warm_up: bool = True) -> AgentService:
    model_config = model_config or ModelConfig()
    server_config = server_config or ServerConfig()
    model = load_model(model_config)
    exporter = PrometheusExporter(snapshot=lambda: {})
    engine = FrameEngine(model, engine_config, model_config.sampling,
                         on_step=lambda seconds, _batch: exporter.step_seconds.observe(seconds))
    if warm_up:
        engine.warm_up()
    engine.start()
    registry = SessionRegistry()
    catalogue = load_catalogue()
    hub = CallHub(engine, registry, catalogue, silence_ms=server_config.vad_silence_ms,
                  max_call_seconds=server_config.max_call_seconds,
                  on_turn_latency=exporter.voice_to_voice_seconds.observe)
    log.info("engine ready: %d seats on %s", engine.num_seats, model.device)
    service = AgentService(model, engine, catalogue, registry, hub, server_config, exporter)
    exporter.snapshot = service.metric_values
    return service
