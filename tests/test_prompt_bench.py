"""The prompt benchmark runs and reports sane figures (speed itself is measured by the benchmark, never
asserted here)."""

import math

import pytest

from agent.config import TINY_PERSONAPLEX_MODEL, ModelConfig
from agent.tools.prompt_bench import bench_prompts, print_prompts


@pytest.mark.slow
def test_prompt_bench_reports_call_start_and_others_latency(capsys):
    r = bench_prompts(ModelConfig(model=TINY_PERSONAPLEX_MODEL, device="cpu"), pool=3, others=1, joiners=2, repeats=1)
    assert set(r.call_start_ms) == {"uncached", "cached", "no prompt"}
    assert all(len(v) == 1 and v[0] > 0 for v in r.call_start_ms.values())
    assert r.prefill_ms and r.prefill_ms[0] > 0 and r.prompt_frames > 12
    assert math.isclose(r.forced_step_alternative_ms, r.prompt_frames * 80.0)
    for window in (r.others_before_ms, r.others_during_ms, r.others_during_plain_ms):
        assert window["n"] > 0 and 0 < window["p50"] <= window["p99"]
    print_prompts(r)
    assert "call start" in capsys.readouterr().out
