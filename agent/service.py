"""The running agent: one loaded model, its engine, the live calls and the handler template.

Built once per process (`build_service`) and shared by the page, the WebSocket endpoint and the
readouts. Nothing here knows about HTTP or Gradio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.config import EngineConfig, ModelConfig, ServerConfig
from agent.engine import FrameEngine
from agent.handler import HandlerContext, MoshiHandler
from agent.models import LoadedModel, load_model
from agent.session import SessionRegistry
from agent.voices import Catalogue, load_catalogue

log = logging.getLogger(__name__)


@dataclass
class AgentService:
    model: LoadedModel
    engine: FrameEngine
    catalogue: Catalogue
    registry: SessionRegistry
    shared: HandlerContext
    server_config: ServerConfig

    def handler(self, input_sample_rate: int = 24_000) -> MoshiHandler:
        """The handler template fastrtc copies for each connection."""
        return MoshiHandler(self.shared, input_sample_rate=input_sample_rate)

    def conditioner_values(self) -> dict[str, list[str]]:
        return self.model.condition_values

    def close(self) -> None:
        self.engine.stop()


def build_service(model_config: ModelConfig | None = None, engine_config: EngineConfig | None = None,
                  server_config: ServerConfig | None = None, warm_up: bool = True) -> AgentService:
    model_config = model_config or ModelConfig()
    server_config = server_config or ServerConfig()
    model = load_model(model_config)
    engine = FrameEngine(model, engine_config, model_config.sampling)
    if warm_up:
        engine.warm_up()
    engine.start()
    registry = SessionRegistry()
    catalogue = load_catalogue()
    shared = HandlerContext(engine, registry, catalogue, silence_ms=server_config.vad_silence_ms)
    log.info("engine ready: %d seats on %s", engine.num_seats, model.device)
    return AgentService(model, engine, catalogue, registry, shared, server_config)
