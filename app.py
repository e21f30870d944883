"""Telugu full-duplex voice agent on Kyutai's Moshi.

    python app.py                      # tiny random model on CPU, Kyutai's Moshiko on a GPU
    python app.py --model kyutai/moshika-pytorch-bf16 --share
    agent = app.start(["--port", "0"])    # notebooks: page and endpoints from a thread (examples/quickstart.ipynb)
    from app import demo; demo.launch()   # Gradio's convention: the page only

Settings also come from environment variables (AGENT_MODEL, AGENT_DEVICE, AGENT_DTYPE,
AGENT_MAX_SESSIONS, AGENT_HOST/GRADIO_SERVER_NAME, AGENT_PORT/GRADIO_SERVER_PORT, TRUSTED_PROXIES, ...) so a Space
or a notebook can set them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.config import EngineConfig, ModelConfig, SamplingConfig, ServerConfig

if TYPE_CHECKING:  # app.py imports no model code until something is built
    import gradio as gr

    from agent.service import AgentService
    from agent.web.server import BackgroundServer

log = logging.getLogger("app")


def _env(name: str, default: str | None = None) -> str | None:
    """An environment setting; set-but-empty counts as unset (templates often pass "")."""
    return os.environ.get(name) or default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = _env
    sampling = SamplingConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=env("AGENT_MODEL"),
                   help="HF repo id (default on GPU: kyutai/moshiko-pytorch-bf16), a local checkpoint folder, "
                        "'tiny' (random weights, default on CPU), 'moshi-7b-random', nvidia/personaplex-7b-v1 "
                        "(voice and persona prompts; gated: HF_TOKEN) or 'tiny-personaplex' (its layout, "
                        "random weights). Several, comma-separated "
                        "(e.g. kyutai/moshiko-pytorch-bf16,kyutai/moshika-pytorch-bf16), serve each voice from "
                        "the model that has it")
    p.add_argument("--device", default=env("AGENT_DEVICE"), help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--dtype", default=env("AGENT_DTYPE"), help="bf16 (GPU default), fp16, fp32 (CPU default)")
    p.add_argument("--context", type=int, default=None, help="LM attention context in frames (12.5 per second)")
    p.add_argument("--max-sessions", type=int, default=int(env("AGENT_MAX_SESSIONS", "0")) or None,
                   help="seats: calls served at once in one batch (default: from device memory; 4 on CPU)")
    p.add_argument("--temp", type=float, default=sampling.temp,
                   help="every call's starting audio temperature (a call may choose its own)")
    p.add_argument("--temp-text", type=float, default=sampling.temp_text, help="every call's starting text temperature")
    p.add_argument("--top-k", type=int, default=sampling.top_k, help="every call's starting audio top-k")
    p.add_argument("--top-k-text", type=int, default=sampling.top_k_text, help="every call's starting text top-k")
    p.add_argument("--seed", type=int, default=ModelConfig.seed, help="seed for random-weight models")
    p.add_argument("--host", default=env("AGENT_HOST", env("GRADIO_SERVER_NAME", ServerConfig.host)),
                   help="0.0.0.0 to serve the network")
    p.add_argument("--port", type=int,
                   default=int(env("AGENT_PORT", env("GRADIO_SERVER_PORT", str(ServerConfig.port)))))
    p.add_argument("--share", action="store_true",
                   help="public Gradio link (downloads Gradio's tunnel binary: needs internet)")
    p.add_argument("--vad-silence-ms", type=int, default=ServerConfig.vad_silence_ms,
                   help="silence that ends a user turn for the latency figures")
    p.add_argument("--max-call-minutes", type=float, default=float(env("AGENT_MAX_CALL_MINUTES", "30")),
                   help="end a call after this long (0: no limit)")
    p.add_argument("--auth", default=env("AGENT_AUTH"),
                   help="user:password for the page (login) and the API endpoints (HTTP Basic); "
                        "prefer the AGENT_AUTH variable, which stays out of shell history")
    p.add_argument("--max-calls-per-client", type=int, default=int(env("AGENT_MAX_CALLS_PER_CLIENT", "0")) or None,
                   help="concurrent WebSocket calls from one address (default: none; 2 with --share)")
    p.add_argument("--max-connections-per-client", type=int,
                   default=int(env("AGENT_MAX_CONNECTIONS_PER_CLIENT", str(ServerConfig.max_connections_per_client))),
                   help="open connections (API WebSockets, WebRTC offers) from one address; more are refused "
                        "with 429 (0: no limit)")
    p.add_argument("--max-unfinished-requests-per-client", type=int,
                   default=int(env("AGENT_MAX_UNFINISHED_REQUESTS_PER_CLIENT",
                                   str(ServerConfig.max_unfinished_requests_per_client))),
                   help="connections from one address still sending a request's headers (slowloris); more are "
                        "refused with 429 (0: no limit)")
    p.add_argument("--request-header-seconds", type=float,
                   default=float(env("AGENT_REQUEST_HEADER_SECONDS", str(ServerConfig.request_header_seconds))),
                   help="how long a connection may take to send a request's headers; then 408 and closed")
    p.add_argument("--trusted-proxies",
                   default=env("TRUSTED_PROXIES", env("FORWARDED_ALLOW_IPS", ServerConfig.trusted_proxies)),
                   help="proxies whose X-Forwarded-For / Forwarded name the caller (addresses or CIDRs, "
                        "comma-separated; 'none': trust none); also TRUSTED_PROXIES (docs/deploy.md)")
    p.add_argument("--drain-seconds", type=float,
                   default=float(env("AGENT_DRAIN_SECONDS", str(ServerConfig.drain_seconds))),
                   help="on SIGTERM, how long live calls may go on before the server exits")
    p.add_argument("--resume-seconds", type=float,
                   default=float(env("AGENT_RESUME_SECONDS", str(ServerConfig.resume_seconds))),
                   help="a call whose connection drops keeps its seat this long for the caller to resume it (0: off)")
    return p.parse_args(argv)


def configs(args: argparse.Namespace) -> tuple[list[ModelConfig], EngineConfig, ServerConfig]:
    if args.resume_seconds < 0:
        raise ValueError("--resume-seconds must be 0 (off) or more")
    if args.max_connections_per_client < 0:
        raise ValueError("--max-connections-per-client must be 0 (no limit) or more")
    if args.max_unfinished_requests_per_client < 0:
        raise ValueError("--max-unfinished-requests-per-client must be 0 (no limit) or more")
    if not args.request_header_seconds > 0:
        raise ValueError("--request-header-seconds must be more than 0")
    from agent.ops.forwarded import TrustedProxies
    TrustedProxies.parse(args.trusted_proxies)  # a bad entry is told here
    sampling = SamplingConfig(temp=args.temp, temp_text=args.temp_text, top_k=args.top_k, top_k_text=args.top_k_text)
    names = [name.strip() for name in (args.model or "").split(",") if name.strip()] or [None]
    return ([ModelConfig(model=name, device=args.device, dtype=args.dtype, seed=args.seed, context=args.context,
                         sampling=sampling) for name in names],
            EngineConfig(max_sessions=args.max_sessions),
            ServerConfig(host=args.host, port=args.port, share=args.share, vad_silence_ms=args.vad_silence_ms,
                         max_call_seconds=args.max_call_minutes * 60 or None, drain_seconds=args.drain_seconds,
                         auth=args.auth, resume_seconds=args.resume_seconds,
                         max_connections_per_client=args.max_connections_per_client or None,
                         max_unfinished_requests_per_client=args.max_unfinished_requests_per_client or None,
                         request_header_seconds=args.request_header_seconds,
                         trusted_proxies=args.trusted_proxies,
                         max_calls_per_client=args.max_calls_per_client or (2 if args.share else None)))


def build(args: argparse.Namespace):
    """(service, demo, stream) for these arguments."""
    from agent.service import build_service
    from agent.web.server import build_stream
    from agent.web.ui import build_demo

    model_cfg, engine_cfg, server_cfg = configs(args)
    service = build_service(model_cfg, engine_cfg, server_cfg)
    return service, build_demo(service), build_stream(service)


@dataclass
class RunningAgent:
    """An agent serving from a background thread of this process (a notebook): the page and every endpoint,
    as `python app.py` serves them. Shown in a notebook, it is the page inline; `close()` stops it."""

    service: AgentService
    demo: gr.Blocks
    server: BackgroundServer

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ws_url(self) -> str:
        """fastrtc's WebSocket endpoint, for `agent.tools.wsclient.talk`."""
        return "ws" + self.url.removeprefix("http") + "/websocket/offer"

    def close(self) -> None:
        self.server.stop()
        self.service.close()

    def _repr_html_(self) -> str:
        return (f'<iframe src="{self.url}/" width="100%" height="760" frameborder="0" '
                'allow="autoplay; microphone"></iframe>')

    def __enter__(self) -> RunningAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start(argv: list[str] | None = None) -> RunningAgent:
    """Build the agent from `python app.py`'s flags (and the same environment variables) and serve it from
    a background thread; `--port 0` takes a free port. For notebooks: `agent = app.start(["--port", "0"])`."""
    from agent.web.server import BackgroundServer, build_app

    args = parse_args(argv)
    service, demo, stream = build(args)
    try:
        server = BackgroundServer(build_app(service, demo, stream), args.host, args.port).start()
    except BaseException:
        service.close()
        raise
    if service.random_weights:
        log.warning("Serving a RANDOM-WEIGHT model: the page works end to end but the agent's voice is noise.")
    return RunningAgent(service, demo, server)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from agent.errors import ModelLoadError
    from agent.ops.access import Credentials

    try:
        Credentials.parse(args.auth)
        configs(args)  # bad settings (e.g. --temp 5) are told before any model loads
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    from agent.web.server import build_app, serve
    from agent.web.share import serve_shared_link

    try:
        service, demo, stream = build(args)
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 2
    from agent.service import settle_heap
    settle_heap()
    if service.random_weights:
        log.warning("Serving a RANDOM-WEIGHT model: the page works end to end but the agent's voice is noise.")
    log.info("Open http://%s:%d  (WebSocket endpoint: ws://%s:%d/websocket/offer)",
             args.host, args.port, args.host, args.port)
    try:
        app = build_app(service, demo, stream)  # the same app, guarded the same way, with or without a link
        (serve_shared_link if args.share else serve)(app, service, args.host, args.port)
    finally:
        service.close()
    return 0


_demo = None
_service = None


def __getattr__(name: str):
    """`from app import demo` builds the agent from the environment on first use (Spaces, notebooks)."""
    global _demo, _service
    if name == "demo":
        if _demo is None:
            _service, _demo, _ = build(parse_args([]))
        return _demo
    raise AttributeError(name)


if __name__ == "__main__":
    sys.exit(main())
