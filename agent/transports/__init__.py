"""How callers reach a call: each transport turns its protocol into calls on the hub (agent.calls).

- `fastrtc_handler`  the fastrtc handler (WebRTC from the page, fastrtc's WebSocket protocol): receive/emit/copy
- `websocket`        fastrtc's `/websocket/offer` and `/webrtc/offer` as served: checked messages, server call ids
- `kyutai_api`       Kyutai's own `/api/chat` protocol, for Moshi's clients
- `connection`       one connection and its call, whatever the transport: open/resume, settings, leave or drop
- `settings`         the one parser of a call's settings (page inputs, URL queries), shared by every transport
- `fastrtc_compat`   every use of fastrtc's, aiortc's, gradio's (and one of uvicorn's) internals
"""
