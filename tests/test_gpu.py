"""On a CUDA device only (skipped elsewhere): the engine under CUDA graphs.

moshi captures the LM and Mimi as CUDA graphs on their second call and replays them after; per-seat
sampling settings and condition rows are written into tensors the graphs read. These tests check
that what is written after the capture is what the replays use. Run them on a lent GPU with
`python -m pytest tests/test_gpu.py` (the tiny model in float32, so results are exact).
"""

from __future__ import annotations

import pytest
import torch

from agent.config import EngineConfig, ModelConfig, SamplingConfig
from agent.engine import FrameEngine
from agent.engine.sampling import SeatSampling
from agent.models import load_model
from tiny_helpers import frames_of, varied_audio

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY_SEAT = SeatSampling(temp=0.0, temp_text=0.0, top_k=250, top_k_text=25)
HOT_SEAT = SeatSampling(temp=1.2, temp_text=1.2, top_k=250, top_k_text=25)


def engine(sampling: SamplingConfig, seats: int = 3) -> FrameEngine:
    model = load_model(ModelConfig(model="tiny", device="cuda", dtype="float32"))
    built = FrameEngine(model, EngineConfig(max_sessions=seats), sampling)
    built.warm_up()  # the graphs are captured here, on the default settings
    return built


def run(built: FrameEngine, first: dict[int, SeatSampling], n: int = 12) -> list[list[tuple[int, bytes]]]:
    feeds = [frames_of(varied_audio(n, seed)) for seed in (50, 51, 52)]
    seats = [built.acquire(f"caller{i}") for i in range(len(feeds))]
    for index, settings in first.items():
        seats[index].set_sampling(settings)
    out: list[list[tuple[int, bytes]]] = [[] for _ in seats]
    torch.manual_seed(3)
    for t in range(n):
        for seat, feed in zip(seats, feeds):
            seat.push(feed[t])
        built.step_once()
        for seat, got in zip(seats, out):
            frame = seat.pull()
            got.append((frame.text_token, frame.pcm.tobytes()))
    return out


def test_settings_written_after_capture_reach_the_graphs():
    """A seat set greedy after the graphs were captured (beside sampling seats) gives exactly the
    greedy engine's output; the sampling seats do sample."""
    mixed = run(engine(SamplingConfig()), first={0: GREEDY_SEAT, 1: HOT_SEAT})
    greedy = run(engine(SamplingConfig(use_sampling=False)), first={})
    assert mixed[0] == greedy[0]
    assert [t for t, _ in mixed[1]] != [t for t, _ in greedy[1]]
