"""`python app.py ARGS` as a subprocess, its output collected (tests/test_share.py, tests/test_space.py,
tests/test_package.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class AppProcess:
    """`python app.py ARGS` (or another command line) with its merged output collected line by line."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], command: list[str] | None = None):
        self.proc = subprocess.Popen([*(command or [sys.executable, str(ROOT / "app.py")]), *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, *needles: str, timeout: float) -> str | None:
        """The first of `needles` to appear in the output, or None if the process ended or time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((n for n in needles if n in self.output), None)
            if found or self.proc.poll() is not None:
                return found
            time.sleep(0.1)
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
