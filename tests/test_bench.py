"""The benchmark's functions run and report sane figures (speed itself is measured by the benchmark,
never asserted here)."""

import json
import math

import pytest

from agent.config import ModelConfig
from agent.tools import bench
from agent.tools.bench import FRAME_MS, bench_e2e, bench_engine, bench_overhead, main, session_counts

TINY = ModelConfig(model="tiny", device="cpu")


def test_session_counts_double_up_to_the_pool():
    assert session_counts(8) == [1, 2, 4, 8] and session_counts(6) == [1, 2, 4, 6] and session_counts(1) == [1]


def test_engine_bench_structure(tmp_path, monkeypatch):
    result = bench_engine(TINY, pool=2, frames=5, warmup=2)
    assert [p.sessions for p in result.points] == [1, 2]
    for p in result.points:
        assert 0 < p.step_ms["p50"] <= p.step_ms["p95"] <= p.step_ms["p99"]
        assert p.encode_ms > 0 and p.lm_ms > 0 and p.decode_ms > 0 and p.rtf > 0 and p.rss_mib > 0
    # the most sessions whose p99 step fits in a frame, 0 when none does: read from the points measured
    fitting = [p.sessions for p in result.points if p.step_ms["p99"] < FRAME_MS]
    assert result.max_sessions_p99_under_frame == max(fitting, default=0), (result.max_sessions_p99_under_frame,
                                                                            fitting)
    # with a frame budget every step meets (a busy machine may meet none of the real one), it is the whole pool
    with monkeypatch.context() as patch:
        patch.setattr(bench, "FRAME_MS", 1e9)
        assert bench_engine(TINY, pool=2, frames=2, warmup=1).max_sessions_p99_under_frame == 2
    overhead = bench_overhead(TINY, batch=1, frames=5, warmup=2)
    assert (overhead.engine_ms > 0 and overhead.bare_ms > 0
            and math.isclose(overhead.ratio, overhead.engine_ms / overhead.bare_ms))
    # the reference is the mean of the bare loop on two copies of the weights (their spread: the noise floor)
    assert len(overhead.bare_copies_ms) == 2 and math.isclose(overhead.bare_ms, sum(overhead.bare_copies_ms) / 2)
    assert overhead.per_seat_sampling_ms is None  # one seat always agrees with itself
    assert bench_overhead(TINY, batch=2, frames=3, warmup=1).per_seat_sampling_ms > 0


def test_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--model", "tiny", "--device", "cpu", "--max-sessions", "1", "--frames", "3",
                 "--overhead-at", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["points"][0]["sessions"] == 1 and data["overhead"][0]["sessions"] == 1


@pytest.mark.slow
def test_e2e_bench_with_real_clients():
    result = bench_e2e(TINY, clients=2, seconds=3)
    assert result.errors == [] and len(result.sent_s) == 2
    assert min(result.received_s) >= min(result.sent_s) - 0.6
    assert result.frame_latency_ms is not None and result.frame_latency_ms["p50"] > 0
    assert result.user_turns >= 2  # espeak Telugu speech: each client's turn was heard
    assert result.rss_end_mib > 0
