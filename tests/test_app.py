"""app.py's two entry points: `from app import demo` (notebooks, Spaces) and its command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_import_app_builds_demo_from_the_environment():
    code = ("import gradio as gr; import app; "
            "assert app._demo is None; d = app.demo; assert isinstance(d, gr.Blocks); "
            "assert app.demo is d; print('seats', app._service.seats_total())")
    env = dict(os.environ, AGENT_MODEL="tiny", AGENT_DEVICE="cpu", AGENT_MAX_SESSIONS="2", NO_TORCH_COMPILE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seats 2" in proc.stdout


def test_import_app_alone_loads_no_model():
    code = "import app, sys; assert 'agent.models' not in sys.modules; print(app.parse_args(['--model', 'a,b']).model)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "a,b"


@pytest.mark.parametrize("flags, message", [(["--auth", "nocolon"], "user:password"),
                                            (["--temp", "5"], "temperatures must be"),
                                            (["--top-k", "0"], "top-k must be")])
def test_bad_flags_are_a_clear_error(flags, message):
    proc = subprocess.run([sys.executable, "app.py", *flags, "--model", "tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, NO_TORCH_COMPILE="1"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_slow_request_limits_from_flags_and_environment(monkeypatch):
    """--max-unfinished-requests-per-client and --request-header-seconds reach ServerConfig (0: no
    limit), as do their environment variables; the defaults are ServerConfig's."""
    import app
    from agent.config import ServerConfig

    *_, server = app.configs(app.parse_args([]))
    assert (server.max_unfinished_requests_per_client, server.request_header_seconds) == (
        ServerConfig.max_unfinished_requests_per_client, ServerConfig.request_header_seconds)
    *_, server = app.configs(app.parse_args(["--max-unfinished-requests-per-client", "0",
                                             "--request-header-seconds", "2.5"]))
    assert (server.max_unfinished_requests_per_client, server.request_header_seconds) == (None, 2.5)
    monkeypatch.setenv("AGENT_MAX_UNFINISHED_REQUESTS_PER_CLIENT", "8")
    monkeypatch.setenv("AGENT_REQUEST_HEADER_SECONDS", "4")
    *_, server = app.configs(app.parse_args([]))
    assert (server.max_unfinished_requests_per_client, server.request_header_seconds) == (8, 4.0)
    # bad values are told before any model loads (main() runs configs() first and exits 2 with the message)
    with pytest.raises(ValueError, match="--request-header-seconds must be"):
        app.configs(app.parse_args(["--request-header-seconds", "0"]))
    with pytest.raises(ValueError, match="--max-unfinished-requests-per-client must be"):
        app.configs(app.parse_args(["--max-unfinished-requests-per-client", "-1"]))
