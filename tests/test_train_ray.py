"""The per-item stages on Ray (`--ray`): a local Ray (`--ray local`) and a real two-node cluster on
127.0.0.1 (`ray start --head` + `ray start --address`, separate processes and temp dirs) give the same
bytes as the one-process run, resume after a kill, and report an item that always fails without losing
the others. Every Ray process a test starts is stopped by its id in the teardown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port
from synth_helpers import FAIL_WORD
from train_helpers import read_jsonl as _jsonl

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
# The one-process runs keep torch's default threads (the Ray workers get one each): the outputs must not
# follow it. Auth off: Ray 2.60 turns token auth on when ~/.ray/auth_token exists; no drain wait on SIGTERM.
ENV = {**{k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")},
       "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "RAY_DISABLE_USAGE_STATS": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
IDS = [f"d{i}" for i in range(6)]  # d2 always fails


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.train", *args, "--quiet"], env=ENV, cwd=ROOT,
                          check=True, timeout=300)


def _same_files(a: Path, b: Path, records: list[dict], keys: tuple[str, ...]) -> None:
    for record in records:
        for key in keys:
            if record.get(key):
                assert (a / record[key]).read_bytes() == (b / record[key]).read_bytes(), (record["id"], key)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """Six scripted dialogues (d2 holds FAIL_WORD), synthesised and encoded in one process each."""
    work = tmp_path_factory.mktemp("ray")
    lines = [{"id": i, "voice": "ravi", "persona": "You are Ravi, a travel desk agent.", "licence": "CC0",
              "prompt_text": "రేపు మనం కలుద్దాం.",
              "turns": [{"speaker": "user", "text": f"బస్సు {n} ఎప్పుడు వస్తుంది?" + (f" {FAIL_WORD}" if n == 2 else "")},
                        {"speaker": "agent", "text": "బస్సు పది నిమిషాల్లో వస్తుంది.", "emotion": "happy"}]}
             for n, i in enumerate(IDS)]
    (work / "s.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), "utf-8")
    _run("script", "--from", str(work / "s.jsonl"), "--out", str(work / "script"))
    _run("synth", "--in", str(work / "script"), "--out", str(work / "synth"))  # espeak-ng, d2 included
    _run("tokens", "--in", str(work / "synth/manifest.jsonl"), "--out", str(work / "tokens"))
    return work


def _ray_start(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own session: SIGTERM to it stops the node's processes."""
    with log.open("w") as out:
        return subprocess.Popen([str(RAY), "start", "--block", "--num-cpus", "1", "--object-store-memory",
                                 str(100 * 2**20), "--ray-client-server-port", str(free_port()),
                                 "--dashboard-agent-listen-port", str(free_port()), *args], env=ENV, cwd=log.parent,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(nodes: list[subprocess.Popen]) -> None:
    for proc in reversed(nodes):  # the worker node first, then the head
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(nodes):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that node's session still alive


def _wait_started(log: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[tuple[str, list[Path]]]:
    """A Ray head and a second node on 127.0.0.1, one CPU each: (address, the two nodes' temp dirs)."""
    work = tmp_path_factory.mktemp("cluster")
    port = free_port()
    dirs = [work / "head", work / "node"]
    for d in dirs:
        d.mkdir()
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_ray_start(["--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--temp-dir",
                                 str(dirs[0]), "--include-dashboard", "false"], work / "head.log"))
        _wait_started(work / "head.log", nodes[0])
        nodes.append(_ray_start(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--temp-dir",
                                 str(dirs[1])], work / "node.log"))
        _wait_started(work / "node.log", nodes[1])
        yield f"127.0.0.1:{port}", dirs
    finally:
        _stop(nodes)


@pytest.mark.slow
def test_ray_synth_is_byte_identical_resumes_and_reports_a_failing_item(one, tmp_path):
    ray_argv = [sys.executable, "-m", "agent.train", "synth", "--in", str(one / "script"), "--out",
                str(tmp_path / "ray"), "--tts", "synth_helpers:SlowCrashingEspeak", "--ray", "local", "--quiet"]
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
    whole = (one / "synth/manifest.jsonl").read_text("utf-8").splitlines(keepends=True)
    assert (tmp_path / "ray/manifest.jsonl").read_text("utf-8") == "".join(whole[:2] + whole[3:])
    _same_files(tmp_path / "ray", one / "synth", kept, ("path", "alignment", "voice_prompt"))
    skipped = [r for r in _jsonl(tmp_path / "ray/report.jsonl") if r["action"] == "skipped"]
    assert [r["item"] for r in skipped] == ["d2"]
    assert skipped[0]["reason"] == "failed on Ray after retries: RuntimeError: engine crashed hard (injected)"


@pytest.mark.slow
def test_ray_tokens_on_two_nodes_match_one_process_and_resume(one, two_nodes, tmp_path):
    """Mimi on actors spread over a real two-node cluster (`--ray 127.0.0.1:PORT`): the same shards and
    manifest as the one-process run; a rerun reuses every item."""
    address, node_dirs = two_nodes
    argv = ["tokens", "--in", str(one / "synth/manifest.jsonl"), "--out", str(tmp_path / "ray"), "--ray", address]
    _run(*argv)
    assert (tmp_path / "ray/manifest.jsonl").read_bytes() == (one / "tokens/manifest.jsonl").read_bytes()
    records = _jsonl(one / "tokens/manifest.jsonl")
    assert [r["id"] for r in records] == IDS
    _same_files(tmp_path / "ray", one / "tokens", records, ("path", "voice_prompt"))
    info = json.loads((tmp_path / "ray/tokens.json").read_text())
    assert info == json.loads((one / "tokens/tokens.json").read_text())
    for node in node_dirs:  # an actor ran on each node (Ray names an actor's class in its worker's log)
        logs = [p.read_text(errors="replace") for p in node.glob("session_*/logs/worker-*.out")]
        assert any(":actor_name:_Holder" in text for text in logs), node
    _run(*argv)
    summary = json.loads((tmp_path / "ray/summary.json").read_text())
    assert summary["reused"] == summary["kept"] == len(IDS) and summary["made"] == 0
