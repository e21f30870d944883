"""Engine-wide figures and health, and how many seats a device holds.

`EngineStats` is one object for the engine's life (the seats and the prompt admission count into
it; `clear()` empties it in place). Faults are counted here: after `FAILING_AFTER` failed steps in
a row `health()` says the engine is failing until a step succeeds again, so a load balancer stops
sending calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from agent.config import EngineConfig
from agent.models import LoadedModel
from agent.ops.metrics import RollingWindow, StepTimes

# On a CPU every seat costs compute each tick, idle or not (the batch is fixed); 4 keeps a lone
# caller's tiny-model step near 20 ms on 2 cores. GPU seats come from memory instead.
CPU_DEFAULT_SEATS = 4
MAX_DEFAULT_SEATS = 64
GPU_RESERVE_BYTES = 2 * 1024**3  # activations, CUDA graphs, allocator slack
FAILING_AFTER = 3  # steps failed in a row before the engine reports itself unhealthy


@dataclass
class EngineStats:
    """Engine-wide totals since start (seat counters vanish with their seat; these do not)."""

    ticks: int = 0
    seats_total: int = 0
    seats_in_use: int = 0
    calls_started: int = 0
    calls_refused: int = 0
    input_dropped: int = 0
    output_dropped: int = 0
    late_ticks: int = 0
    step_failures: int = 0  # steps that raised (their seats were reset and told)
    failures_in_a_row: int = 0  # since the last step that succeeded
    last_failure: str = ""
    step: StepTimes = field(default_factory=StepTimes)
    lateness: RollingWindow = field(default_factory=RollingWindow)  # ms each tick started after it was due
    prompts_restored: int = 0  # calls started from a prompt state (cached or new)
    prompt_prefills: int = 0  # prompt states computed (cache misses)
    prompt_prefill_ms: float = 0.0  # the last one's time, spent between two ticks
    prompt_cache_entries: int = 0
    prompt_cache_bytes: int = 0

    def clear(self) -> None:
        """Every figure back to a fresh start's (the seat total stays), in place: the seats and
        the prompt admission keep counting into this object."""
        fresh = EngineStats(seats_total=self.seats_total)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def stepped(self, encode_s: float, lm_s: float, decode_s: float, batch: int) -> None:
        """A step succeeded (engine lock held)."""
        self.ticks += 1
        self.failures_in_a_row = 0
        self.step.add(encode_ms=1e3 * encode_s, lm_ms=1e3 * lm_s, decode_ms=1e3 * decode_s, batch=batch)

    def lateness_ms(self) -> dict[str, float | None]:
        """Tick lateness over the last minute: p50, p99 and the worst, in ms."""
        values = self.lateness.values()
        if not values.size:
            return {"p50": None, "p99": None, "max": None}
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
                "max": float(values.max())}

    def failed(self, exc: Exception) -> None:
        """A step raised (engine lock held)."""
        self.step_failures += 1
        self.failures_in_a_row += 1
        self.last_failure = f"{type(exc).__name__}: {exc}"[:200]

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): unhealthy after FAILING_AFTER failed steps in a row."""
        if self.failures_in_a_row >= FAILING_AFTER:
            return False, f"engine failing: {self.failures_in_a_row} steps in a row ({self.last_failure})"
        return True, "ok"


def default_seat_count(model: LoadedModel, config: EngineConfig | None = None) -> int:
    """Seats from device memory: one KV cache per seat (about 1.5 GiB for the 7B at context 3000),
    after the prompt cache's budget on a model that takes prompts."""
    if model.device.type != "cuda":
        return CPU_DEFAULT_SEATS
    lm = model.lm
    bytes_per = torch.tensor([], dtype=model.dtype).element_size()
    kv_per_seat = 2 * len(lm.transformer.layers) * lm.transformer.layers[0].self_attn.context * lm.dim * bytes_per
    free, _ = torch.cuda.mem_get_info(model.device)
    reserve = GPU_RESERVE_BYTES + ((config or EngineConfig()).prompt_cache_mib * 2**20 if model.takes_prompts else 0)
    return int(max(1, min(MAX_DEFAULT_SEATS, (free - reserve) // max(kv_per_seat, 1))))
