"""The frame engine on the real moshi code (tiny model, greedy sampling, so every run is exact).

Each property is checked against a reference run of the same weights: a fresh single-seat engine,
or the same batch without the disturbance. A seat's first output after it is taken is silent and
carries token -2 (Moshi's acoustic delay), in every run alike, so outputs are compared whole.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent import FRAME_SIZE
from agent.config import EngineConfig
from agent.engine import FrameEngine, OutputFrame, Seat
from agent.errors import SeatsFullError
from conftest import tiny_model
from tiny_helpers import GREEDY, frames_of, varied_audio

N_FRAMES = 12


def make_engine(seats: int, **config) -> FrameEngine:
    return FrameEngine(tiny_model(), EngineConfig(max_sessions=seats, **config), GREEDY)


def caller(seed: int, n: int = N_FRAMES) -> list[np.ndarray]:
    return frames_of(varied_audio(n, seed))


def tick(engine: FrameEngine, feeds: dict[Seat, np.ndarray | None]) -> dict[Seat, OutputFrame]:
    """Push this tick's frames (None: the seat sends nothing), step once, pull what came out."""
    for seat, frame in feeds.items():
        if frame is not None:
            seat.push(frame)
    engine.step_once()
    outs = {seat: seat.pull() for seat in feeds}
    return {seat: out for seat, out in outs.items() if out is not None}


def solo(frames: list[np.ndarray]) -> list[OutputFrame]:
    """The reference: the same frames through a fresh one-seat engine."""
    engine = make_engine(1)
    seat = engine.acquire("solo")
    return [tick(engine, {seat: f})[seat] for f in frames]


def fresh_in_batch(rows: list[list[np.ndarray]], slot: int) -> list[OutputFrame]:
    """The reference for a slot in a batch: a fresh engine of the same size, every row fed from its
    start, `slot`'s outputs. (Against a one-seat engine only approximate equality holds: Mimi's
    batched convolutions round differently per batch size, and an RVQ code near a boundary can flip,
    after which greedy decoding diverges. Same batch size and row: the same arithmetic, so exact.)"""
    engine = make_engine(len(rows))
    seats = [engine.acquire(f"row{i}") for i in range(len(rows))]
    return [tick(engine, {s: rows[i][t] for i, s in enumerate(seats)})[seats[slot]] for t in range(len(rows[slot]))]


# Used only to tell outputs apart: float rounding between batch shapes stays below this.
BATCH_ATOL = 1e-6


def assert_same(got: list[OutputFrame], want: list[OutputFrame], atol: float = 0.0) -> None:
    assert len(got) == len(want)
    assert [o.text_token for o in got] == [o.text_token for o in want]
    assert [o.voiced for o in got] == [o.voiced for o in want]
    got_pcm, want_pcm = np.stack([o.pcm for o in got]), np.stack([o.pcm for o in want])
    if atol:
        np.testing.assert_allclose(got_pcm, want_pcm, rtol=0, atol=atol)
    else:
        np.testing.assert_array_equal(got_pcm, want_pcm)


def differs(a: list[OutputFrame], b: list[OutputFrame]) -> bool:
    """Different beyond float rounding: another token, or audio apart by more than BATCH_ATOL."""
    pcm_gap = np.abs(np.stack([o.pcm for o in a]) - np.stack([o.pcm for o in b])).max()
    return [o.text_token for o in a] != [o.text_token for o in b] or pcm_gap > BATCH_ATOL


def test_tiny_model_hears_its_input():
    """Guards the other tests: different callers must give different outputs, or equality proves nothing."""
    a, b = solo(caller(1)), solo(caller(2))
    assert differs(a, b)
    assert not a[0].voiced and a[0].text_token == -2 and not a[0].pcm.any()  # the acoustic delay
    assert all(o.voiced for o in a[1:]) and len({o.text_token for o in a}) > 2


def test_reset_slot_matches_fresh_engine_and_leaves_others_alone():
    cut, newcomer = 6, caller(13, n=8)  # seat 1's first caller hangs up after `cut` frames; a newcomer takes it
    streams = [caller(seed, n=cut + len(newcomer)) for seed in (10, 11, 12)]

    def run(reset: bool) -> tuple[list[list[OutputFrame]], list[OutputFrame]]:
        """Every seat's outputs (seat 1: its first caller's only) and the newcomer's."""
        engine = make_engine(3)
        seats = [engine.acquire(f"caller{i}") for i in range(3)]
        outs: list[list[OutputFrame]] = [[], [], []]
        new_outs: list[OutputFrame] = []
        for t in range(cut + len(newcomer)):
            if reset and t == cut:
                seats[1].release("hung up")
                seats[1] = engine.acquire("newcomer")
                assert seats[1].index == 1
            frames = {s: streams[i][t] for i, s in enumerate(seats)}
            if reset and t >= cut:
                frames[seats[1]] = newcomer[t - cut]
            got = tick(engine, frames)
            for i, s in enumerate(seats):
                if reset and i == 1 and t >= cut:
                    new_outs.append(got[s])
                else:
                    outs[i].append(got[s])
        return outs, new_outs

    plain, _ = run(reset=False)
    outs, new_outs = run(reset=True)
    assert_same(new_outs, fresh_in_batch([streams[0][cut:], newcomer, streams[2][cut:]], slot=1))
    assert_same(outs[0], plain[0])
    assert_same(outs[2], plain[2])
    assert_same(outs[1], plain[1][:cut])
    # the check can fail: without the reset, the newcomer would continue the first caller's state
    continued = fresh_in_batch([streams[0], streams[1][:cut] + newcomer, streams[2]], slot=1)[cut:]
    assert differs(continued, new_outs)


def test_frozen_slot_does_not_advance():
    steady, gappy = caller(20, n=16), caller(21)
    gaps = {0, 3, 4, 9}  # ticks on which seat 1 sends nothing (tick 0: right after it was taken)

    def run(gap_ticks: set[int], zeros_on_gaps: bool = False) -> tuple[list[OutputFrame], Seat]:
        """Seat 1's outputs for its real frames; `zeros_on_gaps` steps it on silence instead of freezing."""
        engine = make_engine(2)
        a, b = engine.acquire("steady"), engine.acquire("gappy")
        queue, outs = list(gappy), []
        for t in range(N_FRAMES + len(gap_ticks)):
            gap = t in gap_ticks
            if not gap:
                frame = queue.pop(0)
            else:
                frame = np.zeros(FRAME_SIZE, np.float32) if zeros_on_gaps else None
            got = tick(engine, {a: steady[t], b: frame})
            assert (b in got) == (frame is not None)
            if not gap:
                outs.append(got[b])
        return outs, b

    no_gaps, _ = run(set())
    with_gaps, seat = run(gaps)
    assert_same(with_gaps, no_gaps)
    assert seat.counters.frozen_ticks == len(gaps) and seat.counters.frames_out == N_FRAMES
    # the check can fail: a slot stepped on silence during the gaps answers its real frames differently
    stepped, _ = run(gaps, zeros_on_gaps=True)
    assert differs(stepped, no_gaps)


def test_seats_full_refuses_cleanly_and_release_frees_at_once():
    streams = [caller(30), caller(31)]

    def run(knock: bool) -> list[list[OutputFrame]]:
        engine = make_engine(2)
        seats = [engine.acquire("a"), engine.acquire("b")]
        outs: list[list[OutputFrame]] = [[], []]
        for t in range(N_FRAMES):
            if knock and t == 4:
                with pytest.raises(SeatsFullError, match=r"^All 2 seats are in use\. "):
                    engine.acquire("third")
                assert engine.stats.calls_refused == 1 and engine.seats_in_use() == 2
            got = tick(engine, {s: streams[i][t] for i, s in enumerate(seats)})
            for i, s in enumerate(seats):
                outs[i].append(got[s])
        if knock:
            seats[0].release("bye")
            assert engine.seats_in_use() == 1 and seats[0].closed
            again = engine.acquire("third")
            assert again.index == 0 and not again.closed and engine.seats_in_use() == 2
        return outs

    undisturbed, knocked = run(knock=False), run(knock=True)
    for got, want in zip(knocked, undisturbed):
        assert_same(got, want)


def test_idle_seat_is_freed_by_the_engine_thread():
    engine = make_engine(2, idle_timeout_s=0.5).start()
    try:
        quiet, busy = engine.acquire("vanishes"), engine.acquire("talks")
        for f in caller(40, n=3):
            quiet.push(f)
        last_input = time.monotonic()
        frames = caller(41, n=40)
        deadline = last_input + 4.0
        while not quiet.closed and time.monotonic() < deadline:
            busy.push(frames.pop(0) if frames else np.zeros(FRAME_SIZE, np.float32))
            time.sleep(0.08)
        freed_after = time.monotonic() - last_input
        assert quiet.closed and quiet.closed_reason.startswith("no audio"), quiet.closed_reason
        assert 0.5 <= freed_after < 3.0
        assert not busy.closed and engine.seats_in_use() == 1
        assert quiet.counters.frames_out == 3  # its frames were served before it went quiet
        assert engine.acquire("next").index == quiet.index
    finally:
        engine.stop()
    assert busy.closed and engine._thread is None


def test_nan_frame_stays_in_its_own_seat():
    clean, other = caller(50), caller(51)
    poisoned = [f.copy() for f in clean]
    poisoned[3][100:900] = np.nan
    poisoned[3][5] = np.inf
    sanitised = [np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0) for f in poisoned]

    def run(frames: list[np.ndarray]) -> tuple[list[OutputFrame], list[OutputFrame], Seat]:
        engine = make_engine(2)
        a, b = engine.acquire("nan"), engine.acquire("other")
        outs_a, outs_b = [], []
        for t in range(N_FRAMES):
            got = tick(engine, {a: frames[t], b: other[t]})
            outs_a.append(got[a])
            outs_b.append(got[b])
        return outs_a, outs_b, a

    nan_a, nan_b, seat = run(poisoned)
    ref_a, ref_b, _ = run(sanitised)
    assert seat.counters.non_finite_frames == 1
    assert_same(nan_b, ref_b)
    assert_same(nan_a, ref_a)  # the NaN seat itself hears the frame with zeros for NaN/Inf
    assert all(np.isfinite(o.pcm).all() for o in nan_a + nan_b)
    assert differs(ref_a, run(clean)[0])  # the poisoned frame did change seat 0's own input


def test_bounded_queues_drop_the_oldest():
    frames = caller(60, n=5)
    engine = make_engine(1, input_queue_frames=3, output_queue_frames=2)
    seat = engine.acquire("bursty")
    for f in frames[:5]:
        seat.push(f)
    assert seat.counters.input_dropped == 2 and seat.input_backlog == 3
    for _ in range(4):
        engine.step_once()  # three frames in the queue; the fourth tick finds none
    assert seat.counters.frames_out == 3 and seat.counters.output_dropped == 1
    kept = [seat.pull(), seat.pull()]
    assert seat.pull() is None
    # the newest input frames (2, 3, 4) were stepped, and the newest two outputs kept
    assert_same(kept, solo(frames[2:5])[1:])


def test_reset_survives_a_tick_without_input():
    """A seat taken by a new caller is reset on the next tick. If that tick has no input at all
    (step_once() returns 0, as the engine thread does right after freeing an idle seat), the reset
    must still happen before the new caller's first frame."""
    engine = make_engine(1)
    first = engine.acquire("first")
    for f in caller(70, n=5):
        tick(engine, {first: f})
    first.release("hung up")
    second = engine.acquire("second")
    assert engine.step_once() == 0
    newcomer = caller(71, n=6)
    assert_same([tick(engine, {second: f})[second] for f in newcomer], solo(newcomer))
