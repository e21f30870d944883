"""Calls: what a transport opens, feeds and ends; the engine (agent.engine) steps their seats.

- `session`   one call: its seat, the input path, both VAD streams, the transcript and its figures
- `registry`  live calls by connection id (readouts, /metrics, the cap's count)
- `hub`       admission (draining, call ids, the cap), routing by voice, resuming, the call-setup threads
- `cap`       the per-client call cap, the one place that decides it
- `vad`       Silero VAD for every call in one batch, and turn latency
- `wakeups`   one event-loop wake-up per engine tick for all the calls waiting on that loop
"""
