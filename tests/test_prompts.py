"""Voice and text prompts (PersonaPlex's way of choosing a voice and a persona per call)."""

from __future__ import annotations

import subprocess
import sys

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_prompt_catalogue_reads_without_torch_or_moshi():
    """A page, a client or a script reads the voice catalogue (and its prompt voices) without a model."""
    code = ("import sys, agent.voices; agent.voices.load_catalogue(); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'moshi')); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"importing agent.voices pulled in {run.stdout.strip()} {run.stderr[-500:]}"
