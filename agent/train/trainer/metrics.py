"""What a run says while it runs: metrics.csv (+ TensorBoard when installed) and progress lines."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.csv"


class MetricsLog:
    """metrics.csv (always) and TensorBoard (when installed), written by the main process."""

    FIELDS = ["step", "split", "loss", "text_loss", "audio_loss", "lr", "grad_norm", "frames_per_s", "seconds"]

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.path, self.enabled, self.writer = out / METRICS_FILE, enabled, None
        if not enabled:
            return
        rows = []
        if self.path.is_file() and resume_step > 0:  # drop rows past the checkpoint: they will be redone
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            pass  # CSV only

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})
        if self.writer is not None:
            for key in ("loss", "text_loss", "audio_loss", "lr", "grad_norm"):
                if row.get(key) not in (None, ""):
                    self.writer.add_scalar(f"{row['split']}/{key}", float(row[key]), int(row["step"]))
            self.writer.flush()


class Console:
    """Progress lines on stderr from the main process only."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def say(self, line: str) -> None:
        if not self.quiet:
            tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it
