"""Prompted calls on the tiny PersonaPlex model and the plain run they must equal (tests/test_prompts.py,
tests/test_prompt_gpu.py)."""

from __future__ import annotations

import numpy as np
import torch
from moshi.models.lm import LMGen

from agent import FRAME_SIZE
from tiny_helpers import frames_of, varied_audio

PERSONA_EN = "You are Lakshmi, a patient bank support agent. Answer briefly."


def reference_run(model, frames, user_audio: np.ndarray, batch: int = 1,
                  row: int = 0) -> tuple[list[int], list[np.ndarray]]:
    """THE documented sequence, plainly: one conversation on stock moshi's LMGen, its P prompt steps
    forced one by one (agent/engine/prompt_state.py's contract), then the conversation. Returns each
    conversation frame's text token and decoded audio.

    `batch`/`row`: run that one row in a batch of the engine's size, the other rows frozen
    (`set_exec_mask`), so convolutions and matmuls round as they do in the engine (across batch
    sizes they round differently and an RVQ code near a boundary can flip: tests/test_engine.py)."""
    lm, mimi = model.lm, model.mimi
    forced: dict[str, object] = {}

    def force_text(logits):
        if forced.get("text") is not None:
            logits[row].fill_(float("-inf"))[..., int(forced["text"])] = 0.0

    def force_audio(tokens):
        if forced.get("semantic") is not None:
            tokens[row, 0] = int(forced["semantic"])
        if forced.get("acoustic") is not None:
            tokens[row, 1:] = torch.as_tensor(forced["acoustic"], device=tokens.device)

    def rows(x: torch.Tensor) -> torch.Tensor:  # this row's input in a batch of zeros
        out = torch.zeros((batch, *x.shape[1:]), dtype=x.dtype)
        out[row] = x[0]
        return out.to(model.device)

    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=force_text, on_audio_hook=force_audio,
                support_out_of_sync=True)
    mask = torch.zeros(batch, dtype=torch.bool, device=model.device)
    mask[row] = True
    texts, pcm = [], []
    with torch.no_grad(), gen.streaming(batch), mimi.streaming(batch):
        gen.set_exec_mask(mask)
        mimi.set_exec_mask(mask)
        p = len(frames)
        for s in range(p):
            nxt = s + 1 < p
            forced.update(text=frames.text[s + 1] if nxt else None, semantic=frames.agent[s + 1, 0] if nxt else None,
                          acoustic=frames.agent[s, 1:])
            gen.step(rows(torch.from_numpy(frames.user[s]).view(1, 8, 1)))
        forced.clear()
        for frame in frames_of(user_audio):
            out = gen.step(mimi.encode(rows(torch.from_numpy(frame).view(1, 1, FRAME_SIZE))))
            texts.append(int(out[row, 0, 0]))
            pcm.append(mimi.decode(out[:, 1:].clamp(min=0))[row].view(-1).cpu().numpy())
    return texts, pcm


def run_prompted_calls(engine, specs, audio, bystander: bool) -> list[list]:
    """Calls with these prompts (and maybe one without) stepped together; each call's output frames."""
    other = engine.acquire("bystander") if bystander else None  # a call without a prompt, same batch
    seats = [engine.acquire(f"call{i}") for i in range(len(specs))]
    for seat, spec in zip(seats, specs):
        seat.set_prompt(spec)
    outs: list[list] = [[] for _ in specs]
    for k in range(len(audio[0]) // FRAME_SIZE):
        for seat, a in zip(seats, audio):
            seat.push(frames_of(a)[k])
        if other is not None:
            other.push(varied_audio(1, 100 + k))
        engine.step_once()
        for i, seat in enumerate(seats):
            outs[i].append(seat.pull())
        if other is not None:
            other.pull()
    for seat in (*seats, *([other] if other else [])):
        seat.release("done")
    return outs


def assert_same_call(outs, reference, label: str) -> None:
    texts, pcm = reference
    assert [o.text_token for o in outs] == texts, label
    np.testing.assert_allclose(np.concatenate([o.pcm for o in outs]), np.concatenate(pcm), atol=1e-4, err_msg=label)
    assert all(o.voiced for o in outs), label  # it answers from its first frame on
