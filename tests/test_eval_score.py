"""agent.eval.score on constructed Full-Duplex-Bench samples with known answers.

Real espeak-ng Telugu speech is placed at known times in input.wav (the user) and output.wav (the
agent), so the true turn ends, agent starts and take-overs are known; real Silero VAD times them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.eval.__main__ import main
from agent.eval.layout import EvalDataError, find_samples
from agent.eval.score import score
from agent.eval.speech import place, speak
from agent.eval.transcript import Speech, Word, write_words

RATE = 16_000
LENGTH_S = 9.0
USER_START = 0.5


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return {
        "question": speak("నమస్కారం, మీరు ఎలా ఉన్నారు?", "te", RATE),  # ~2.1 s
        "answer": speak("నేను బాగున్నాను, ధన్యవాదాలు. మీకు ఏమి కావాలి?", "te+f3", RATE),  # ~3.8 s
        "more": speak("ఒక్క నిమిషం, నేను మరొక విషయం అడగాలి.", "te", RATE),  # ~2.8 s
        "blip": speak("అవును", "te+f3", RATE),  # ~0.44 s: too short to take the turn
    }


def write_sample(folder: Path, user: list, agent: list, meta: dict[str, object] | None = None,
                 length_s: float = LENGTH_S) -> None:
    folder.mkdir(parents=True)
    sf.write(folder / "input.wav", place(length_s, RATE, user), RATE, subtype="PCM_16")
    sf.write(folder / "output.wav", place(length_s, RATE, agent), RATE, subtype="PCM_16")
    for name, data in (meta or {}).items():
        (folder / name).write_text(json.dumps(data))


def turn_taking_set(root: Path, clips) -> tuple[list[float | None], float]:
    """Five samples; returns each one's true latency (None: the agent did not take the turn)."""
    q = clips["question"]
    end = USER_START + q.size / RATE
    cases = {  # name: (agent clips, true latency)
        "0": ([(end + 0.3, clips["answer"])], 0.3),
        "1": ([], None),  # never speaks
        "2": ([(end + 1.0, clips["answer"])], 1.0),
        "3": ([(end - 0.5, clips["answer"])], 0.0),  # starts before the user stops: latency 0
        "4": ([(end + 0.2, clips["blip"])], None),  # a short sound does not take the turn
    }
    for name, (agent, _) in cases.items():
        write_sample(root / name, [(USER_START, q)], agent,
                     {"turn_taking.json": [{"text": "[TURN-TAKING]", "timestamp": [end, end + 0.4]}]})
    return [latency for _, latency in cases.values()], end


def test_eval_turn_taking_known_latency_and_tor(tmp_path, clips):
    truth, _ = turn_taking_set(tmp_path, clips)
    result = score(tmp_path, "turn-taking")
    rows = {r.name: r for r in result.samples}
    assert [rows[str(i)].took_turn for i in range(5)] == [t is not None for t in truth]
    summary = result.summary()
    assert summary["n"] == 5 and summary["tor"] == pytest.approx(3 / 5, abs=1e-12)  # exactly
    assert rows["0"].latency_s == pytest.approx(0.3, abs=0.15)
    assert rows["2"].latency_s == pytest.approx(1.0, abs=0.15)  # the check can fail: latency follows placement
    assert rows["3"].latency_s == 0.0
    assert rows["1"].latency_s is None and rows["4"].latency_s is None
    assert summary["latency_s"] == pytest.approx(np.mean([0.3, 1.0, 0.0]), abs=0.15)
    assert summary["speech_from"] == ["vad"]
    # v1.5's interval lists: the response interval of sample 0 is ~0.3 s long
    (user_end, model_start), = rows["0"].response_intervals
    assert model_start - user_end == pytest.approx(0.3, abs=0.15)


def test_eval_turn_end_from_vad_without_json(tmp_path, clips):
    """No turn_taking.json: the user's turn ends where the VAD hears the user stop."""
    end = USER_START + clips["question"].size / RATE
    write_sample(tmp_path / "0", [(USER_START, clips["question"])], [(end + 0.3, clips["answer"])])
    row, = score(tmp_path, "turn-taking").samples
    assert row.took_turn and row.latency_s == pytest.approx(0.3, abs=0.15)


def test_eval_pause_tor(tmp_path, clips):
    q, more = clips["question"], clips["more"]
    pause_at = USER_START + q.size / RATE
    user = [(USER_START, q), (pause_at + 1.5, more)]
    write_sample(tmp_path / "0", user, [(pause_at + 0.2, clips["answer"])])  # talks into the pause
    write_sample(tmp_path / "1", user, [])
    write_sample(tmp_path / "2", user, [(pause_at + 0.3, clips["blip"])])  # a backchannel is fine
    result = score(tmp_path, "pause")
    assert [r.took_turn for r in result.samples] == [True, False, False]
    assert result.summary()["tor"] == pytest.approx(1 / 3, abs=1e-12)


def test_eval_interruption_stop_and_response(tmp_path, clips):
    """The agent talks, the user interrupts at 4.0-5.5 s; the agent stops 0.4 s after the onset and
    answers 0.5 s after the interruption ends."""
    onset, end = 4.0, 5.5
    talking = clips["answer"][: round((onset + 0.4 - 2.6) * RATE)]  # 2.6 s -> 4.4 s
    interruption = clips["more"][: round((end - onset) * RATE)]
    meta = {"interrupt.json": [{"context": "...", "interrupt": "...", "timestamp": [onset, end]}]}
    write_sample(tmp_path / "0", [(0.5, clips["question"]), (onset, interruption)],
                 [(2.6, talking), (end + 0.5, clips["answer"])], meta)
    write_sample(tmp_path / "1", [(0.5, clips["question"]), (onset, interruption)], [(2.6, talking)], meta)
    result = score(tmp_path, "interruption")
    first, second = result.samples
    assert first.took_turn and first.latency_s == pytest.approx(0.5, abs=0.15)
    assert first.stop_s == pytest.approx(0.4, abs=0.15)
    assert not second.took_turn and second.latency_s is None  # stopped and never answered
    assert result.summary()["tor"] == 0.5 and result.summary()["n_stopped"] == 2


def test_eval_backchannel_rate_and_jsd(tmp_path, clips):
    user = [(0.5, clips["question"]), (3.0, clips["more"])]
    write_sample(tmp_path / "0", user, [(1.0, clips["blip"]), (4.5, clips["blip"])])
    write_sample(tmp_path / "1", user, [(2.0, clips["answer"])])  # a spoken answer: segments >= 1 s
    write_sample(tmp_path / "2", user, [])
    uniform = [1.0 / 50] * 50
    result = score(tmp_path, "backchannel", gt_distribution={"0": uniform, "1": uniform, "2": uniform})
    bc, turn, silent = result.samples
    assert (bc.took_turn, bc.backchannels) == (False, 2)
    assert bc.backchannel_freq == pytest.approx(2 / LENGTH_S)
    assert 0 < bc.jsd < 1
    assert turn.took_turn  # (FDB also counts its <= 3 s segments in the frequency: their loop does)
    assert silent.backchannels == 0 and silent.jsd == 1.0 and not silent.took_turn
    assert result.summary()["freq"] == pytest.approx((2 + turn.backchannels) / LENGTH_S / 3)
    assert result.summary()["tor"] == pytest.approx(1 / 3)


def test_eval_word_rule_as_fdb():
    """>= 1 s or > 3 words takes the turn; no words never does."""
    def words(n, span):
        return [Word(f"w{i}", i * span / n, (i + 1) * span / n) for i in range(n)]

    assert not Speech.from_words([]).took_turn()
    assert not Speech.from_words(words(3, 0.9)).took_turn()
    assert Speech.from_words(words(4, 0.9)).took_turn()
    assert Speech.from_words(words(1, 1.0)).took_turn()
    assert not Speech.from_segments([(0.0, 0.5), (0.6, 0.7), (0.8, 0.85), (0.9, 0.95)]).took_turn()


def test_eval_output_json_words_are_used(tmp_path, clips):
    """A transcript beside output.wav (FDB's asr.py format) decides, not the VAD."""
    truth, end = turn_taking_set(tmp_path, clips)
    write_words(tmp_path / "1" / "output.json",  # the silent sample, with 4 quick words 0.5 s after
                [Word(w, end + 0.5 + 0.2 * i, end + 0.6 + 0.2 * i)
                 for i, w in enumerate(["ఒకటి", "రెండు", "మూడు", "నాలుగు"])])
    write_words(tmp_path / "0" / "output.json", [Word("అవును", end + 0.3, end + 0.6)])  # one short word
    rows = {r.name: r for r in score(tmp_path, "turn-taking").samples}
    assert rows["1"].took_turn and rows["1"].latency_s == pytest.approx(0.5)
    assert rows["1"].speech_from == "output.json"
    assert not rows["0"].took_turn


def test_eval_score_cli_table_and_json(tmp_path, clips, capsys):
    turn_taking_set(tmp_path / "set", clips)
    out = tmp_path / "scores.json"
    assert main(["score", str(tmp_path / "set"), "--task", "turn-taking", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["turn_taking"]["tor"] == pytest.approx(0.6) and data["turn_taking"]["n"] == 5
    assert data["turn_taking"]["latency_s"] == pytest.approx(np.mean([0.3, 1.0, 0.0]), abs=0.15)
    assert len(data["samples"]) == 5
    table = capsys.readouterr().out
    assert "turn-taking" in table and "0.600" in table


def test_eval_bad_input_is_a_clear_error(tmp_path, clips, capsys):
    turn_taking_set(tmp_path, clips)
    (tmp_path / "2" / "output.wav").unlink()
    assert main(["score", str(tmp_path), "--task", "turn-taking"]) == 2
    for bad in ("{not json", "[]", '[{"timestamp": []}]', '[{"timestamp": ["soon"]}]'):
        (tmp_path / "0" / "turn_taking.json").write_text(bad)
        with pytest.raises(EvalDataError, match="turn_taking.json"):
            find_samples(tmp_path)
    (tmp_path / "0" / "turn_taking.json").unlink()
    (tmp_path / "1" / "input.wav").write_bytes(b"RIFF junk")
    with pytest.raises(EvalDataError, match="input.wav"):
        score(tmp_path / "1", "pause")
    with pytest.raises(EvalDataError, match="no sample folders"):
        (tmp_path / "empty").mkdir()
        find_samples(tmp_path / "empty")


def test_eval_v15_interval_lists_by_hand():
    from agent.eval.timing import merge_gaps, overlaps, response_gaps
    assert merge_gaps([(3.0, 4.0), (0.0, 1.0), (1.5, 2.0), (4.5, 5.0)], 0.5) == [(0.0, 2.0), (3.0, 5.0)]
    user, model = [(0.0, 2.0), (3.0, 5.0)], [(1.0, 3.5), (4.8, 6.0)]
    assert overlaps(user, model) == [(1.0, 2.0), (3.0, 3.5), (4.8, 5.0)]
    # one response per model start, from the latest user end before it
    assert response_gaps([(0.0, 1.0), (1.2, 2.0), (3.0, 5.0)], [(2.5, 2.8), (5.3, 6.0)]) == [(2.0, 2.5), (5.0, 5.3)]
    assert response_gaps([(0.0, 1.0)], [(0.5, 0.9)]) == []  # the model never starts after the user ends


def test_eval_interruption_words_before_the_interruption_end_do_not_count(tmp_path, clips):
    """An output.json transcribed without FDB's crop: the agent's words before the interruption's
    end are not its reply."""
    meta = {"interrupt.json": [{"context": "...", "interrupt": "...", "timestamp": [3.0, 4.0]}]}
    write_sample(tmp_path / "0", [(0.5, clips["question"])], [], meta)
    write_words(tmp_path / "0" / "output.json", [Word(f"w{i}", 1.0 + 0.3 * i, 1.2 + 0.3 * i) for i in range(6)]
                + [Word("later", 4.5, 4.8)])
    row, = score(tmp_path, "interruption").samples
    assert not row.took_turn  # one short word after the end
    write_words(tmp_path / "0" / "output.json", [Word(f"w{i}", 4.2 + 0.3 * i, 4.4 + 0.3 * i) for i in range(5)])
    row, = score(tmp_path, "interruption").samples
    assert row.took_turn and row.latency_s == pytest.approx(0.2)
