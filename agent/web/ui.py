"""The page: a Gradio Blocks layout with the call in the main area and a sidebar of settings and
live readouts. The call itself is fastrtc's WebRTC component streaming through `MoshiHandler`;
the readouts are polled by a `gr.Timer` from the session registry by connection id.

A dropped call reconnects by itself: the timer keeps the call's resume token in the page's state (an
input of the call), and the page's script (assets/web/reconnect.js) restarts the call when its
connection drops without the caller pressing Stop; the server resumes the held call (same seat, same
conversation). The page's JavaScript lives in assets/web/, one function a file (page_script)."""

from __future__ import annotations

import json
import time
from typing import Any

import gradio as gr
import pandas as pd
from fastrtc import WebRTC

from agent import ASSETS
from agent.config import MAX_TEMP, MAX_TEXT_PROMPT_CHARS
from agent.ops.access import rtc_configuration_from_env
from agent.ops.metrics import fmt_ms
from agent.service import AgentService
from agent.transports.fastrtc_handler import MoshiHandler, watch_page_calls
from agent.transports.settings import PAGE_INPUTS

CSS_PATH = ASSETS / "style.css"
SCRIPTS = ASSETS / "web"  # the page's JavaScript (page_script)
PHONE_MAX_WIDTH = 768  # Gradio's own breakpoint: at or below it an open sidebar covers the whole page
POLL_SECONDS = 0.5
PLOT_SECONDS = 60
RECONNECT_BACKOFF_MS = (500, 1000, 2000, 4000)
RECONNECT_WAIT_MS = 8000  # an attempt not connected by then (plus its backoff) is tried again
# Auto: a WebRTC call whose ICE has not connected by then goes over the WebSocket (assets/web/ws_call.js).
# ICE over loopback or a LAN connects in well under a second, through a TURN relay in one or two.
FALLBACK_MS = 4000
TRANSPORTS = ("Auto", "WebRTC", "WebSocket")
# the readouts timer asks for the WebSocket call's id when the page calls over the socket
CALL_ID_JS = "(call, token) => [(window.__agentTransport && window.__agentTransport.callId) || call, token]"


def page_script(name: str, params: str = "", **config: Any) -> str:
    """The script `SCRIPTS/<name>.js` (a JavaScript function of one config object) as gradio runs
    it: a function of `params` (the event's inputs, if any) that calls it with `config` as JSON."""
    return f"({params}) => ({(SCRIPTS / f'{name}.js').read_text()}\n)({json.dumps(config)})"


def _choices(items, support) -> list[tuple[str, str]]:
    return [(item.label if support[item.id].supported else f"{item.label} (not on this model)", item.id)
            for item in items]


def _support_note(service: AgentService) -> str:
    if any(e.prompt_presets() is not None for e in service.engines):
        note = ("This model starts each call from a voice prompt (the voice's preset) and a persona text, "
                "which also carries the emotion.")
        return note + (" Its weights are random: the output is noise either way." if service.random_weights else "")
    voices, emotions = service.voice_support(), service.emotion_support()
    lines = []
    if not any(s.supported for s in voices.values()):
        lines.append(f"**Voices:** {next(iter(voices.values())).reason}. The choice is kept with the call "
                     "but does not change how it sounds.")
    if not any(s.supported for s in emotions.values()):
        lines.append(f"**Emotions:** {next(iter(emotions.values())).reason}. The choice is kept with the call "
                     "but does not change how it sounds.")
    if not lines and service.random_weights:
        lines.append("Voices and emotions are conditioned on this model, but its tables are random: "
                     "a choice changes the (noise) output, not to a real voice.")
    return "\n\n".join(lines) or "Every voice and emotion below is conditioned on this model."


def _model_note(service: AgentService) -> str:
    text = "  \n".join(
        f"**Model:** `{e.model.name}` · {e.model.device.type} {str(e.model.dtype).removeprefix('torch.')} · "
        f"{e.num_seats} seats" for e in service.engines)
    text += "  \nEvery call on a model shares one batched step per 80 ms frame."
    if len(service.engines) > 1:
        text += " Each call goes to the model that has the voice it asks for."
    if service.random_weights:
        text = ("⚠️ **Random weights — not a trained speech model** (or one fine-tuned from the random test model). "
                "The agent's voice is noise and its "
                "transcript is random pieces. Run on a GPU with `--model kyutai/moshiko-pytorch-bf16` "
                "(or a fine-tuned Telugu folder) for real speech.\n\n" + text)
    return text


def call_status(service: AgentService, call_id: str | None) -> str:
    """One line for the caller: connected, or why the call ended and how to call again."""
    session = service.registry.get(call_id)
    if session is None:
        return "Press **Record** to start a call." if not call_id else "Connecting…"
    figures = session.figures()
    if session.dropped and figures.closed_reason is None:
        return (f"🟡 **Connection lost**: the call waits {service.hub.resume_seconds:g} s for this page to "
                "reconnect.")
    if figures.closed_reason is None:
        return (f"🟢 **In call** · {figures.seconds:.0f} s · `{session.engine.model.name}` seat {figures.seat + 1} "
                f"of {session.engine.num_seats}")
    return (f"🔴 **The call ended**: {figures.closed_reason}. If the connection dropped, press **Record** "
            "to call again.")


def page_resume_token(service: AgentService, call_id: str | None, current: str) -> str:
    """The token the page sends when it restarts a dropped call: its call's while that call lives,
    none once it ended; kept while the page's connection is starting (its id is not known yet)."""
    session = service.registry.get(call_id)
    if session is None:
        return current
    return "" if session.closed else session.resume_token


def readouts(service: AgentService, call_id: str | None) -> tuple[str, str, pd.DataFrame, str]:
    """(transcript, readout markdown, plot frame, call status) for one connection; engine figures if none."""
    session = service.registry.get(call_id)
    engine = session.engine if session is not None else service.engine
    step = engine.stats.step.summary()
    rtf = "–" if step["rtf"] is None else f"{step['rtf']:.2f}"
    lines = [
        "| Figure | Now |", "|---|---|",
        f"| Step (last / p50 / p95) | {fmt_ms(step['last_ms'])} / {fmt_ms(step['p50_ms'])} / "
        f"{fmt_ms(step['p95_ms'])} |",
        f"| Real-time factor | {rtf} |",
        f"| Seats in use | {service.seats_in_use()} / {service.seats_total()} |",
    ]
    transcript = ""
    now = time.monotonic()
    points: list[dict[str, Any]] = [
        {"seconds": round(at - now, 1), "ms": value, "series": "step"}
        for at, value in engine.stats.step.total.items()[-PLOT_SECONDS * 13:]
    ]
    if session is not None:
        fig = session.figures()
        transcript = fig.transcript
        turns = [f"{v:.0f}" if v is not None else "no reply" for v in fig.turn_latencies_ms[-5:]]
        lines += [
            f"| Frame latency p50 / p95 | {fmt_ms(fig.frame_latency_ms['p50'])} / "
            f"{fmt_ms(fig.frame_latency_ms['p95'])} |",
            f"| Voice-to-voice, last turns (ms) | {', '.join(turns) if turns else 'speak, then pause'} |",
            f"| Frames in / out | {fig.frames_in} / {fig.frames_out} |",
            f"| Dropped in / out · late ticks | {fig.input_dropped} / {fig.output_dropped} · {fig.frozen_ticks} |",
            f"| Voice · emotion | {fig.settings.voice} · {fig.settings.emotion}"
            f"{' (conditioned)' if fig.conditioned else ''} |",
        ]
        if fig.settings.text_prompt:
            persona = fig.settings.text_prompt
            lines.append(f"| Persona | {persona[:60]}{'…' if len(persona) > 60 else ''} |")
        if fig.sampling is not None:
            s = fig.sampling
            lines.append(f"| Sampling text · audio | T {s.temp_text:g}, top-{s.top_k_text} · "
                         f"T {s.temp:g}, top-{s.top_k} |")
        if fig.closed_reason:
            lines.append(f"| Call | ended: {fig.closed_reason} |")
        points += [{"seconds": round(at - now, 1), "ms": value, "series": "voice-to-voice"}
                   for at, value in fig.latency_series]
    else:
        lines.append("| Call | not connected |")
    frame = pd.DataFrame(points, columns=["seconds", "ms", "series"])
    return transcript, "\n".join(lines), frame, call_status(service, call_id)


def _sampling_inputs(service: AgentService) -> list[gr.Slider]:
    """Sliders for this call's sampling (Kyutai's web client has the same four); 0 is greedy."""
    default, config = service.engine.sampler.default, service.engine.sampler.config
    with gr.Accordion("Sampling", open=False, elem_id="sampling"):
        gr.Markdown("Lower temperature: steadier, more repetitive speech; higher: livelier, riskier. "
                    "Changes apply to this call only, from the next frame.", elem_classes=["small-note"])
        return [
            gr.Slider(0, MAX_TEMP, value=default.temp_text, step=0.05, label="Text temperature", elem_id="text-temp"),
            gr.Slider(1, config.max_top_k_text, value=default.top_k_text, step=1, label="Text top-k",
                      elem_id="text-topk"),
            gr.Slider(0, MAX_TEMP, value=default.temp, step=0.05, label="Audio temperature", elem_id="audio-temp"),
            gr.Slider(1, config.max_top_k, value=default.top_k, step=1, label="Audio top-k", elem_id="audio-topk"),
        ]


def _persona_inputs(service: AgentService) -> tuple[gr.Textbox, gr.Dropdown]:
    """The call's text prompt (its persona), with ready ones from the catalogue to start from, and
    the model's preset voices (a voice prompt other than the chosen voice's own)."""
    presets = sorted({p for e in service.engines for p in (e.prompt_presets() or [])})
    prompted = any(e.prompt_presets() is not None for e in service.engines)
    note = ("The persona and the voice are how a call starts: set them before you press Record; a change "
            "applies from the next call." if prompted else
            "This model takes no text prompt (NVIDIA PersonaPlex does): the persona is kept with the call "
            "but changes nothing.")
    with gr.Accordion("Persona · పాత్ర", open=prompted, elem_id="persona-box"):
        ready = gr.Dropdown([(p.name, p.text) for p in service.catalogue.personas], value=None,
                            label="Ready personas", elem_id="persona-ready")
        persona = gr.Textbox(label="Persona (text prompt)", lines=3, max_length=MAX_TEXT_PROMPT_CHARS,
                             placeholder="You are … / మీరు …", elem_id="persona")
        preset = gr.Dropdown([("the chosen voice's own", "")] + [(p, p) for p in presets], value="",
                             label="Voice prompt (this model's preset voices)", visible=bool(presets),
                             elem_id="voice-prompt")
        gr.Markdown(note, elem_classes=["small-note"], elem_id="persona-note")
        ready.change(lambda text: text or "", inputs=[ready], outputs=[persona], queue=False)
    return persona, preset


def _transport_controls(service: AgentService, demo: gr.Blocks, settings: list[Any]) -> None:
    """The call's transport: the choice (Auto tries WebRTC, then the WebSocket), which one carries the
    call, and the WebSocket call's own hang-up (assets/web/ws_call.js); the sidebar's settings reach it
    on every change."""
    gr.Radio(list(TRANSPORTS), value="Auto", label="Transport", elem_id="transport-choice", interactive=True)
    gr.HTML('<div id="call-transport" role="status"></div>'
            '<button id="ws-hang-up" class="lg secondary" style="display: none">Hang up</button>')
    demo.load(None, js=page_script("ws_call", path="api/chat", fallback_ms=FALLBACK_MS,
                                   window_ms=int(1000 * service.hub.resume_seconds),
                                   backoff_ms=list(RECONNECT_BACKOFF_MS), names=list(PAGE_INPUTS[:-1])))
    gr.on([demo.load, *(c.change for c in settings)], None, inputs=settings,
          js="(...values) => { window.__agentTransport && window.__agentTransport.setSettings(values); }")


def build_demo(service: AgentService) -> gr.Blocks:
    catalogue = service.catalogue
    voice_support, emotion_support = service.voice_support(), service.emotion_support()
    css = CSS_PATH.read_text() if CSS_PATH.exists() else None

    # restarts a call whose connection dropped (assets/web/reconnect.js)
    reconnect_js = page_script("reconnect", window_ms=int(1000 * service.hub.resume_seconds),
                               wait_ms=RECONNECT_WAIT_MS, backoff_ms=list(RECONNECT_BACKOFF_MS))
    with gr.Blocks(title="Telugu voice agent (Moshi)", css=css, theme=gr.themes.Soft(), js=reconnect_js) as demo:
        with gr.Sidebar(open=False, width=380, elem_id="settings") as sidebar:
            voice = gr.Dropdown(_choices(catalogue.voices, voice_support), value=catalogue.default_voice,
                                label="Speaker voice · స్వరం", elem_id="voice")
            emotion = gr.Dropdown(_choices(catalogue.emotions, emotion_support), value=catalogue.default_emotion,
                                  label="Emotion · భావం", elem_id="emotion")
            gr.Markdown(_support_note(service), elem_id="support-note", elem_classes=["small-note"])
            persona, preset = _persona_inputs(service)
            sampling = _sampling_inputs(service)
            gr.Markdown("### Live figures")
            stats = gr.Markdown("| Call | not connected |", elem_id="readouts")
            plot = gr.LinePlot(x="seconds", y="ms", color="series", x_lim=[-PLOT_SECONDS, 0], height=200,
                               label="Last minute (ms)", elem_id="latency-plot")
            with gr.Accordion("Model", open=service.random_weights):
                gr.Markdown(_model_note(service), elem_id="model-note")
        gr.Markdown("# తెలుగు వాయిస్ ఏజెంట్ · Telugu voice agent\n"
                    "Press the microphone button and speak Telugu. The agent listens and talks at the same "
                    "time (full duplex), one 80 ms frame at a time.", elem_id="intro")
        if service.random_weights:
            gr.Markdown("⚠️ **Demo mode: random-weight model.** No trained weights are loaded, so the agent "
                        "answers with noise. Everything else (streaming, batching, latency figures) is real.",
                        elem_id="random-banner")
        for model in {e.model.name: e.model for e in service.engines if e.model.toy_note}.values():
            gr.Markdown(f"ℹ️ **`{model.name}` is {model.toy_note}**", elem_id="toy-banner")
        rtc = rtc_configuration_from_env()
        call = WebRTC(label="Call", modality="audio", mode="send-receive", elem_id="call", full_screen=False,
                      rtc_configuration=rtc, server_rtc_configuration=rtc,
                      track_constraints={"echoCancellation": True, "noiseSuppression": True,
                                         "autoGainControl": True, "sampleRate": {"ideal": 48000}})
        status = gr.Markdown("Press **Record** to start a call.", elem_id="call-status")
        _transport_controls(service, demo, [voice, emotion, *sampling, persona, preset])
        # reconnect.js writes here ("reconnecting…", "reconnected", "call lost"); hidden while empty
        gr.HTML('<div id="reconnect-status" role="status" aria-live="polite" style="display: none"></div>')
        resume = gr.State("")  # the call's resume token (page_resume_token), sent when the page reconnects
        # On a phone the sidebar is closed and its own toggle is a small arrow: this opens it (CSS hides it on
        # wider screens, where the sidebar is open beside the call).
        gr.Button("⚙️ Voice, persona & emotion · live figures", elem_id="open-settings", size="sm",
                  variant="secondary").click(None, js=page_script("open_sidebar"))
        transcript = gr.Textbox(label="What the agent says (its text stream)", lines=5, max_lines=8,
                                interactive=False, elem_id="transcript")
        # The handler reads these by position (transports.settings.PAGE_INPUTS).
        call.stream(MoshiHandler(service.hub, await_inputs=True),
                    inputs=[call, voice, emotion, *sampling, persona, preset, resume],
                    outputs=[call], concurrency_limit=service.seats_total())
        watch_page_calls(call, service.hub)
        call.stop_recording(lambda: "", outputs=[resume], queue=False)  # hung up: the next Record is a new call

        # The sidebar starts closed, so a phone opens on the call; on load the browser says whether the window
        # is wider than a phone, and if so the sidebar opens beside the call.
        wide_screen = gr.Checkbox(visible=False)
        demo.load(lambda wide: gr.Sidebar(open=True) if wide else gr.update(), inputs=[wide_screen],
                  outputs=[sidebar], js=page_script("wide_screen", "wide", max_width=PHONE_MAX_WIDTH), queue=False,
                  show_progress="hidden")

        timer = gr.Timer(POLL_SECONDS)
        timer.tick(lambda call_id, token: (*readouts(service, call_id), page_resume_token(service, call_id, token)),
                   inputs=[call, resume], outputs=[transcript, stats, plot, status, resume], show_progress="hidden",
                   queue=False, js=CALL_ID_JS)
    return demo
