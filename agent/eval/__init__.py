"""Evaluation like the papers: Full-Duplex-Bench turn-taking figures and Telugu intelligibility.

One idea per module, data flowing one way:

    layout     the benchmark's folders: samples, their json, input.wav / output.wav
    speech     trimmed espeak-ng Telugu speech (agent.audio.espeak) placed at known times (test data, the set)
    evalset    a small generated Telugu set in FDB's layout, with known timings (make-set)
    timing     Silero VAD segments as FDB v1.5 times them (merged gaps, stop/response intervals)
    transcript words or segments of the agent's speech, output.json, the "took the turn" rule
    asr        pluggable Telugu ASR backends with word timings (lazily imported)
    intelligibility  CER/WER of the agent's speech against its reference text
    runner     a set through the live calls' engine (agent.engine.offline), many samples in one batch -> output.wav
    score      per-task figures (TOR, latencies, backchannels) and the paper-like table

`python -m agent.eval` is the command line (agent/eval/__main__.py); docs/evaluation.md explains it.
"""
