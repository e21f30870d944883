"""On a CUDA device: the prompt path under moshi's CUDA graphs (prompt state written into a row after
the graphs were captured) gives the plain run's tokens. Skipped on machines without CUDA; run it first
on a lent GPU: `python -m pytest tests/test_prompt_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from agent.config import EngineConfig
from agent.engine import FrameEngine
from agent.engine.prompts import PromptSpec
from agent.models import load_checkpoint, tiny_personaplex_folder
from prompt_helpers import PERSONA_EN, assert_same_call, reference_run, run_prompted_calls
from tiny_helpers import GREEDY, varied_audio

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_prompt_parity_under_cuda_graphs(tmp_path):
    folder = tiny_personaplex_folder(cache_dir=tmp_path)
    cuda = torch.device("cuda")
    engine = FrameEngine(load_checkpoint(str(folder), cuda, torch.float32), EngineConfig(max_sessions=2), GREEDY)
    engine.warm_up()  # captures the CUDA graphs before any prompt is restored
    spec, audio = PromptSpec("NATF0", PERSONA_EN), varied_audio(12, 11)
    reference = reference_run(load_checkpoint(str(folder), cuda, torch.float32), engine.prompts.frames(spec), audio,
                              batch=2, row=0)
    for round_ in range(2):
        assert_same_call(run_prompted_calls(engine, [spec], [audio], bystander=False)[0], reference, f"round {round_}")
