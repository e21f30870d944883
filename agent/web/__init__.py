"""The served app: the page and the HTTP server around the transports.

- `ui`      the page: Gradio Blocks layout, sidebar, live readouts; its JavaScript is assets/web/*.js
- `server`  the FastAPI app: the page, the transports' endpoints, health, metrics; draining on SIGTERM
- `share`   `--share`: a public gradio.live link to the same app
"""
