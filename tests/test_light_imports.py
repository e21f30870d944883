"""Light entry points stay light: the command lines' --help and the voice catalogue load no torch.

Each check runs in a fresh interpreter (this one has torch loaded by other tests) and looks at
`sys.modules` when the interpreter exits, after argparse has printed the help and exited.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

REPORT = "import atexit, sys; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules))\n"
CASES = {
    "train --help": "import runpy; sys.argv = ['agent.train', '--help']; runpy.run_module('agent.train', "
                    "run_name='__main__')",
    "eval score --help": "import runpy; sys.argv = ['agent.eval', 'score', '--help']; "
                         "runpy.run_module('agent.eval', run_name='__main__')",
    "import agent.voices": "import agent.voices",
}


@pytest.mark.parametrize("code", CASES.values(), ids=list(CASES))
def test_loads_no_torch(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", REPORT + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch loaded: False" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
