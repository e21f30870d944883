"""The generated Telugu evaluation set: its known timings hold, and `make-set` -> `run` -> `score`
works end to end on the tiny model on a CPU (one sample per task, to stay quick). Silero's times
are within 0.15 s of where the speech was placed (a soft first consonant starts it a little late)."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from agent.eval.__main__ import main
from agent.eval.evalset import TASK_FOLDERS, make_set
from agent.eval.layout import find_samples, read_audio
from agent.eval.timing import USER_MERGE_GAP_S, merge_gaps, speech_segments

TASKS = dict(zip(TASK_FOLDERS, ("turn-taking", "pause", "interruption", "backchannel")))


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    assert main(["make-set", str(root), "--per-task", "1"]) == 0
    return root


def test_eval_set_layout_and_known_timings(tmp_path):
    folders = make_set(tmp_path, per_task=2)
    assert sorted(folders) == sorted(TASK_FOLDERS)
    for sample in find_samples(folders["turn_taking"]):
        audio, rate = read_audio(sample.input)
        user = merge_gaps(speech_segments(audio, rate), USER_MERGE_GAP_S)
        assert rate == 16_000 and user[-1][1] == pytest.approx(sample.turn_end_s, abs=0.15)
    for sample in find_samples(folders["user_interruption"]):
        audio, rate = read_audio(sample.input)
        segments = merge_gaps(speech_segments(audio, rate), USER_MERGE_GAP_S)
        start, end = sample.interrupt_s
        assert segments[-1][0] == pytest.approx(start, abs=0.15) and segments[-1][1] == pytest.approx(end, abs=0.15)
        assert (sample.folder / "context.wav").exists() and (sample.folder / "interrupt.wav").exists()
    for sample in find_samples(folders["pause_handling"]):
        pause = json.loads((sample.folder / "pause.json").read_text())[0]["timestamp"]
        audio, rate = read_audio(sample.input)
        segments = merge_gaps(speech_segments(audio, rate), 0.0)
        gaps = [(a[1], b[0]) for a, b in zip(segments, segments[1:])]
        widest = max(gaps, key=lambda g: g[1] - g[0])  # the pause is the longest silence in the speech
        assert rate == 48_000 and widest == pytest.approx(tuple(pause), abs=0.15)
    with pytest.raises(ValueError):
        make_set(tmp_path / "none", per_task=0)


@pytest.mark.slow
def test_eval_run_and_score_end_to_end_on_tiny_model(eval_set, tmp_path, capsys):
    dirs = [str(eval_set / task) for task in TASK_FOLDERS]
    assert main(["run", *dirs, "--model", "tiny", "--device", "cpu", "--seats", "4", "--threads", "1"]) == 0
    assert "4 samples" in capsys.readouterr().out
    for task, cli_task in TASKS.items():
        sample, = find_samples(eval_set / task)
        assert sf.info(sample.output).frames == sf.info(sample.input).frames
        out = tmp_path / f"{task}.json"
        assert main(["score", str(eval_set / task), "--task", cli_task, "--json", str(out)]) == 0
        data = json.loads(out.read_text())
        key = {"turn-taking": "turn_taking"}.get(cli_task, cli_task)
        assert data[key]["n"] == 1 and data[key]["tor"] in (0.0, 1.0)
        assert len(data["samples"]) == 1
    assert "backchannel" in capsys.readouterr().out
    everything = tmp_path / "all.json"
    assert main(["score", str(eval_set), "--task", "all", "--json", str(everything)]) == 0
    data = json.loads(everything.read_text())
    assert sorted(data) == sorted(TASK_FOLDERS) and data["turn_taking"]["turn_taking"]["n"] == 1
    assert main(["score", str(tmp_path), "--task", "all"]) == 2  # no task folders there
