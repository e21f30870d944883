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
