"""`synth --ray`: the per-item stage on a local Ray cluster gives the same bytes as the one-process run,
resumes after a kill, and reports an item that always fails without losing the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth_helpers import FAIL_WORD
from train_helpers import read_jsonl as _jsonl

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "assets" / "telugu_sentences.txt"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
       "RAY_DISABLE_USAGE_STATS": "1", "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.train", *args, "--quiet"], env=ENV, cwd=ROOT,
                          check=check, timeout=300)


@pytest.mark.slow
def test_ray_synth_is_byte_identical_resumes_and_reports_a_failing_item(tmp_path):
    lines = [{"id": f"d{i}", "voice": "ravi", "persona": "You are Ravi, a travel desk agent.", "licence": "CC0",
              "prompt_text": "రేపు మనం కలుద్దాం.",
              "turns": [{"speaker": "user", "text": f"బస్సు {i} ఎప్పుడు వస్తుంది?" + (f" {FAIL_WORD}" if i == 2 else "")},
                        {"speaker": "agent", "text": "బస్సు పది నిమిషాల్లో వస్తుంది.", "emotion": "happy"}]}
             for i in range(6)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), "utf-8")
    _run("script", "--from", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "A"))
    tts = ["--tts", "synth_helpers:SlowCrashingEspeak"]
    _run("synth", "--in", str(tmp_path / "A"), "--out", str(tmp_path / "one"))  # espeak-ng in one process
    ray_argv = [sys.executable, "-m", "agent.train", "synth", "--in", str(tmp_path / "A"), "--out",
                str(tmp_path / "ray"), *tts, "--ray", "local", "--quiet"]
    proc = subprocess.Popen(ray_argv, env=ENV, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not list((tmp_path / "ray/.done").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (its own session)
    proc.wait()
    done = len(list((tmp_path / "ray/.done").glob("*.json")))
    assert 1 <= done < 5 and not (tmp_path / "ray/manifest.jsonl").exists()  # killed mid-way
    subprocess.run(ray_argv, env=ENV, cwd=ROOT, check=True, timeout=300)
    summary = json.loads((tmp_path / "ray/summary.json").read_text())
    assert summary["reused"] >= done and summary["kept"] == 5
    kept = _jsonl(tmp_path / "ray/manifest.jsonl")
    assert [r["id"] for r in kept] == ["d0", "d1", "d3", "d4", "d5"]
    one = (tmp_path / "one/manifest.jsonl").read_text("utf-8").splitlines(keepends=True)
    assert (tmp_path / "ray/manifest.jsonl").read_text("utf-8") == "".join(one[:2] + one[3:])
    for record in kept:
        assert (tmp_path / "ray" / record["path"]).read_bytes() == (tmp_path / "one" / record["path"]).read_bytes()
    skipped = [r for r in _jsonl(tmp_path / "ray/report.jsonl") if r["action"] == "skipped"]
    assert [r["item"] for r in skipped] == ["d2"] and "engine crashed hard" in skipped[0]["reason"]
