"""Sampling settings per seat (agent.engine.sampling): each row of the batch sampled with its own settings."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
import torch
from moshi.conditioners import ConditionAttributes
from moshi.models.lm import LMGen

from agent.config import EngineConfig, SamplingConfig
from agent.engine import FrameEngine, OutputFrame, Seat
from agent.engine.sampling import SeatLMGen, SeatSampler, SeatSampling, sampling_request
from agent.errors import SamplingError
from agent.transports.fastrtc_handler import MoshiHandler
from conftest import tiny_model, wait_until
from tiny_helpers import GREEDY, frames_of, varied_audio

CARD = 16
DRAWS = 20_000


def frequencies(tokens: torch.Tensor) -> np.ndarray:
    return np.bincount(tokens.numpy().ravel(), minlength=CARD) / tokens.numel()


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def test_each_row_is_sampled_with_its_own_temperature_and_top_k():
    torch.manual_seed(0)
    logits = torch.randn(CARD) * 2
    sampler = SeatSampler(5, torch.device("cpu"), SamplingConfig())
    rows = [(0.0, CARD), (1.3, 1), (0.5, CARD), (1.5, CARD), (1.0, 4)]  # (temperature, top-k) per seat
    for index, (temp, top_k) in enumerate(rows):
        sampler.set(index, SeatSampling(temp=temp, temp_text=0.7, top_k=top_k, top_k_text=25))
    tokens = sampler.sample(logits.expand(5, DRAWS, CARD), "audio")
    assert tokens.shape == (5, DRAWS)
    best = int(logits.argmax())
    assert (tokens[0] == best).all(), "temperature 0 is greedy"
    assert (tokens[1] == best).all(), "top-1 is greedy at any temperature"
    cold, hot = torch.softmax(logits / 0.5, -1).numpy(), torch.softmax(logits / 1.5, -1).numpy()
    assert total_variation(frequencies(tokens[2]), cold) < 0.03
    assert total_variation(frequencies(tokens[3]), hot) < 0.03
    assert total_variation(cold, hot) > 0.2  # the two rows' targets are far apart: the check can fail
    top4 = torch.topk(logits, 4).indices
    assert torch.isin(tokens[4], top4).all(), "a token outside the row's top-k"
    want = torch.zeros(CARD)
    want[top4] = torch.softmax(logits[top4], -1)
    assert total_variation(frequencies(tokens[4]), want.numpy()) < 0.03


@pytest.mark.parametrize("config", [SamplingConfig(use_sampling=False), SamplingConfig()], ids=["greedy", "sampled"])
def test_seat_lmgen_with_every_seat_alike_is_moshis_lmgen_draw_for_draw(config):
    """SeatLMGen replaces moshi's sampling only: with every seat on the same settings (on a CPU,
    moshi's own scalar sampler then runs) it must give moshi's own tokens, same seed, same draws."""
    steps, batch = 16, 3

    def run(make) -> list[torch.Tensor]:
        model = tiny_model()
        lm = model.lm
        attributes = ConditionAttributes(text={name: values[1] for name, values in model.condition_values.items()})
        gen = make(lm, lm.condition_provider.prepare_and_provide([attributes] * batch))
        codes = torch.randint(0, lm.card, (steps, batch, lm.num_codebooks - lm.dep_q - 1, 1),
                              generator=torch.Generator().manual_seed(5))
        torch.manual_seed(11)
        with gen.streaming(batch):
            return [gen.step(codes[t]) for t in range(steps)]

    want = run(lambda lm, conditions: LMGen(lm, use_sampling=config.use_sampling, temp=config.temp,
                                            temp_text=config.temp_text, top_k=config.top_k,
                                            top_k_text=config.top_k_text, support_out_of_sync=True,
                                            condition_tensors=conditions))
    got = run(lambda lm, conditions: SeatLMGen(lm, SeatSampler(batch, lm.device, config),
                                               support_out_of_sync=True, condition_tensors=conditions))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len({int(t[0, 0, 0]) for t in want}) > 2  # real text tokens, not a constant


def outputs(engine: FrameEngine, feeds: list[list[np.ndarray]], changes: dict[int, tuple[int, SeatSampling]],
            first: dict[int, SeatSampling], seed: int = 7) -> tuple[list[list[OutputFrame]], list[Seat]]:
    """Every seat's outputs; `first` sets seats' sampling before frame 0, `changes` {seat: (frame, s)}."""
    torch.manual_seed(seed)
    seats: list[Seat] = [engine.acquire(f"caller{i}") for i in range(len(feeds))]
    for index, settings in first.items():
        seats[index].set_sampling(settings)
    got: list[list[OutputFrame]] = [[] for _ in seats]
    for t in range(len(feeds[0])):
        for index, (at, settings) in changes.items():
            if t == at:
                seats[index].set_sampling(settings)
        for seat, feed in zip(seats, feeds):
            seat.push(feed[t])
        engine.step_once()
        for seat, out in zip(seats, got):
            out.append(seat.pull())
    return got, seats


def tokens(outs: list[OutputFrame]) -> list[int]:
    return [o.text_token for o in outs]


def audio(outs: list[OutputFrame]) -> np.ndarray:
    return np.stack([o.pcm for o in outs])


GREEDY_SEAT = SeatSampling(temp=0.0, temp_text=0.0, top_k=250, top_k_text=25)
HOT_SEAT = SeatSampling(temp=1.2, temp_text=1.2, top_k=250, top_k_text=25)


def test_a_greedy_seat_beside_sampling_seats_gives_the_greedy_output():
    feeds = [frames_of(varied_audio(12, seed)) for seed in (30, 31, 32)]
    engine = FrameEngine(tiny_model(), EngineConfig(max_sessions=3), SamplingConfig())  # sampling by default
    mixed, seats = outputs(engine, feeds, {}, first={0: GREEDY_SEAT, 1: HOT_SEAT})
    reference, _ = outputs(FrameEngine(tiny_model(), EngineConfig(max_sessions=3), GREEDY), feeds, {}, first={})
    assert tokens(mixed[0]) == tokens(reference[0])
    np.testing.assert_array_equal(audio(mixed[0]), audio(reference[0]))
    for index in (1, 2):  # the others really sampled (seat 2 on the server's defaults)
        assert tokens(mixed[index]) != tokens(reference[index])
    assert seats[0].sampling == GREEDY_SEAT and seats[2].sampling == SeatSampling.defaults(SamplingConfig())


def test_changing_one_seats_sampling_mid_call_leaves_the_others_bit_identical():
    feeds = [frames_of(varied_audio(14, seed)) for seed in (40, 41, 42)]

    def run(changes):
        # seat 2 has its own settings from the start, so both runs sample per row throughout (on a
        # CPU, seats that all agree take moshi's scalar sampler, which draws its noise differently)
        engine = FrameEngine(tiny_model(), EngineConfig(max_sessions=3), SamplingConfig())
        return outputs(engine, feeds, changes, first={2: HOT_SEAT})[0]

    plain = run({})
    changed = run({1: (6, GREEDY_SEAT)})
    for index in (0, 2):  # sampled seats: same seed, same draws, so bit-identical
        assert tokens(changed[index]) == tokens(plain[index])
        np.testing.assert_array_equal(audio(changed[index]), audio(plain[index]))
    assert tokens(changed[1])[:6] == tokens(plain[1])[:6]
    assert tokens(changed[1])[6:] != tokens(plain[1])[6:]


@pytest.mark.parametrize("settings, message", [
    (SeatSampling(temp=2.5, temp_text=0.7, top_k=250, top_k_text=25), "audio temperature"),
    (SeatSampling(temp=0.8, temp_text=-0.1, top_k=250, top_k_text=25), "text temperature"),
    (SeatSampling(temp=float("nan"), temp_text=0.7, top_k=250, top_k_text=25), "audio temperature"),
    (SeatSampling(temp=0.8, temp_text=0.7, top_k=0, top_k_text=25), "audio top-k"),
    (SeatSampling(temp=0.8, temp_text=0.7, top_k=251, top_k_text=25), "audio top-k"),
    (SeatSampling(temp=0.8, temp_text=0.7, top_k=250, top_k_text=101), "text top-k"),
])
def test_out_of_range_settings_are_refused_and_the_seat_keeps_its_own(settings, message):
    engine = FrameEngine(tiny_model(), EngineConfig(max_sessions=1), SamplingConfig())
    seat = engine.acquire("caller")
    with pytest.raises(SamplingError, match=message):
        seat.set_sampling(settings)
    seat.push(np.zeros(1920, np.float32))
    engine.step_once()
    assert seat.sampling == SeatSampling.defaults(SamplingConfig())


def test_sampling_request_reads_kyutais_names_and_refuses_garbage():
    assert sampling_request({}) == ()
    assert sampling_request({"text_temperature": "0.5", "audio_topk": 40.0, "voice": "ravi", "text_topk": ""}) == (
        ("temp_text", 0.5), ("top_k", 40))
    for bad in ({"audio_temperature": "hot"}, {"text_topk": 2.5}, {"audio_temperature": "inf"}, {"audio_topk": [1]}):
        with pytest.raises(SamplingError):
            sampling_request(bad)


def test_page_sliders_reach_the_seat(live_server):
    """The page sends [webrtc value, voice, emotion, text T, text k, audio T, audio k] (ui.build_demo)."""
    handler = MoshiHandler(live_server.service.hub)
    handler.latest_args = ["__webrtc_value__", "some-webrtc-id", "ravi", "sad", 0.0, 1.0, 0.5, 10.0]

    def applied(want: SeatSampling) -> bool:
        """Audio keeps coming, as in a call: new settings apply at the engine's next tick."""
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        return handler.session.figures().sampling == want

    try:
        assert wait_until(lambda: applied(SeatSampling(temp=0.5, temp_text=0.0, top_k=10, top_k_text=1)))
        session = handler.session
        handler.latest_args[4:] = [0.9, 30.0, 1.1, 200.0]
        assert wait_until(lambda: applied(SeatSampling(1.1, 0.9, 200, 30)))
        handler.latest_args[4] = 7.0  # out of range: a warning, the call keeps its settings
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        assert session.settings.sampling == (("temp", 1.1), ("temp_text", 0.9), ("top_k", 200), ("top_k_text", 30))
        assert not session.closed
    finally:
        handler.shutdown()


def test_api_chat_takes_kyutais_sampling_parameters(live_server):
    service = live_server.service
    base = f"ws://127.0.0.1:{live_server.port}/api/chat?voice=kiran"

    async def call(query: str, wait_for_seat: bool) -> tuple[bytes, SeatSampling | None]:
        async with aiohttp.ClientSession() as http, http.ws_connect(base + query) as ws:
            first = await ws.receive_bytes(timeout=5)
            seen = None
            if wait_for_seat:
                deadline = time.monotonic() + 5
                while seen is None and time.monotonic() < deadline:
                    # this call's session: the previous test's hung-up call may still be leaving the registry
                    live = [s for s in service.registry.live() if s.call_id.startswith("kyutai-") and not s.closed]
                    if live:  # a frame makes the engine tick, which applies the settings
                        live[0].receive(24_000, np.zeros(1920, np.float32))
                        seen = live[0].figures().sampling
                    await asyncio.sleep(0.02)
            return first, seen

    first, seen = asyncio.run(call("&text_temperature=0&text_topk=5&audio_temperature=0.4&audio_topk=50", True))
    assert first == b"\x00" and seen == SeatSampling(temp=0.4, temp_text=0.0, top_k=50, top_k_text=5)
    first, _ = asyncio.run(call("&audio_temperature=9", False))
    assert first[:1] == b"\x05" and b"audio temperature" in first
    assert wait_until(lambda: service.engine.seats_in_use() == 0)


def test_sampling_cost_text_token_is_moshis_own_draw_while_every_seat_agrees():
    """While every seat has the same settings (a CPU), moshi samples the text token itself: no hook
    that samples, writes the token back into the logits and lets moshi take a second argmax. A seat
    on its own settings brings the per-row hook back; agreeing again removes it."""
    engine = FrameEngine(tiny_model(), EngineConfig(max_sessions=2), SamplingConfig())
    gen, default = engine.lm_gen, SeatSampling.defaults(SamplingConfig())
    assert gen.on_text_logits_hook is None
    assert (gen.use_sampling, gen.temp_text, gen.top_k_text) == (True, default.temp_text, default.top_k_text)
    seats = [engine.acquire(f"caller{i}") for i in range(2)]
    feed = frames_of(varied_audio(3, 50))

    def step() -> None:
        for seat in seats:
            seat.push(feed[0])
        engine.step_once()
        for seat in seats:
            seat.pull()

    seats[1].set_sampling(HOT_SEAT)
    step()
    assert gen.on_text_logits_hook is not None and gen.use_sampling is False  # rows sampled one by one
    seats[0].set_sampling(GREEDY_SEAT)
    seats[1].set_sampling(GREEDY_SEAT)
    step()
    assert gen.on_text_logits_hook is None and gen.use_sampling is False  # greedy: moshi's argmax
