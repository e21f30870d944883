"""Sampling settings per seat: every call in the batch picks its own temperatures and top-k.

moshi's `LMGen` samples the whole batch with one temperature and one top-k. `SeatLMGen` is that
same `LMGen` (same `_step`, same streaming state, same CUDA graphs) with one change: each batch row
is sampled with its own settings, held in fixed-size tensors on the model's device so a CUDA graph
captured once stays valid when a caller changes them.

- Text token: moshi calls `on_text_logits_hook(text_logits)` right before it samples; with
  `use_sampling=False` it then takes the argmax. The hook samples each row with that row's settings
  and leaves the chosen token as the row's only finite logit, so moshi's argmax picks exactly it.
  While every seat agrees (and on a CPU), moshi samples the text token itself with those settings.
- Audio tokens: `depformer_step` is moshi 0.2.13's loop with the per-row sampler in place of
  `sample_token` (classifier-free guidance, which the engine does not use, is left out).

A temperature of 0 is greedy (the argmax, as moshi's `use_sampling=False`). Top-k is capped by the
server (`SamplingConfig.max_top_k*`): the cap fixes the shapes the sampler works on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from moshi.models.lm import LMGen, LMModel
from moshi.utils.sampling import multinomial, sample_token

from agent.config import MAX_TEMP, SamplingConfig, SamplingRequest
from agent.errors import SamplingError

Stream = Literal["text", "audio"]
# Kyutai's web client sends these query parameters; we take the same names everywhere.
REQUEST_NAMES = {"text_temperature": "temp_text", "text_topk": "top_k_text",
                 "audio_temperature": "temp", "audio_topk": "top_k"}




@dataclass(frozen=True)
class SeatSampling:
    """One call's sampling settings (moshi LMGen's names; `REQUEST_NAMES` maps Kyutai's client's)."""

    temp: float
    temp_text: float
    top_k: int
    top_k_text: int

    @classmethod
    def defaults(cls, config: SamplingConfig) -> SeatSampling:
        if not config.use_sampling:
            return cls(0.0, 0.0, config.top_k, config.top_k_text)
        return cls(config.temp, config.temp_text, config.top_k, config.top_k_text)

    def checked(self, config: SamplingConfig) -> SeatSampling:
        """Itself, or SamplingError if a value is outside what this server allows."""
        for name, value in (("audio temperature", self.temp), ("text temperature", self.temp_text)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= MAX_TEMP:
                raise SamplingError(f"{name} must be a number from 0 (greedy) to {MAX_TEMP:g}, got {value!r}")
        for name, value, cap in (("audio top-k", self.top_k, config.max_top_k),
                                 ("text top-k", self.top_k_text, config.max_top_k_text)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
                raise SamplingError(f"{name} must be a whole number from 1 to {cap}, got {value!r}")
        return self

    def with_request(self, request: SamplingRequest) -> SeatSampling:
        return replace(self, **dict(request))


def sampling_request(params: Mapping[str, Any]) -> SamplingRequest:
    """What a client asked for, by Kyutai's names (`REQUEST_NAMES`); absent, None or '' values are
    left to the server's defaults. Raises SamplingError for values that are not numbers (ranges are
    checked against the server's caps when the seat takes them)."""
    request: list[tuple[str, float | int]] = []
    for name, field_name in REQUEST_NAMES.items():
        raw = params.get(name)
        if raw is None or raw == "":
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise SamplingError(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise SamplingError(f"{name} must be a finite number, got {raw!r}")
        if field_name.startswith("top_k"):
            if not value.is_integer():
                raise SamplingError(f"{name} must be a whole number, got {raw!r}")
            request.append((field_name, int(value)))
        else:
            request.append((field_name, value))
    return tuple(sorted(request))


def sample_rows(logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Sample logits [B, ..., card] -> tokens [B, ...]: row b from the softmax of logits / temp[b]
    over its top_k[b] largest. `rank` is arange(k_max), k_max >= every top_k. Greedy rows come as
    top_k 1 (the argmax at any temperature). No host sync: safe inside a CUDA graph."""
    shape = (logits.shape[0],) + (1,) * (logits.dim() - 1)
    values, indices = torch.topk(logits.float() / temp.view(shape), rank.numel(), dim=-1)  # largest first
    values = values.masked_fill(rank >= top_k.view(shape), float("-inf"))
    choice = multinomial(torch.softmax(values, dim=-1), num_samples=1)  # moshi's: no host sync either
    return indices.gather(-1, choice)[..., 0]


class SeatSampler:
    """Per-seat settings as device tensors, written in place (CUDA-graph safe).

    When every seat has the same settings and no CUDA graph records the sampling (a CPU), moshi's
    own scalar sampler runs instead: the same distribution for less work per step (the engine's
    overhead over a bare moshi loop is held under 5 % on a CPU). On CUDA the per-row path always
    runs, because a captured graph replays whichever path it recorded."""

    def __init__(self, num_seats: int, device: torch.device, config: SamplingConfig):
        self.config = config
        self.default = SeatSampling.defaults(config)
        self._rows = [self.default] * num_seats  # the host's copy, to know when all seats agree
        self._uniform: SeatSampling | None = self.default
        self._scalar_allowed = device.type != "cuda"
        self.rank: dict[Stream, torch.Tensor] = {
            "audio": torch.arange(config.max_top_k, device=device),
            "text": torch.arange(config.max_top_k_text, device=device)}
        self.temp: dict[Stream, torch.Tensor] = {s: torch.ones(num_seats, device=device) for s in ("audio", "text")}
        self.top_k: dict[Stream, torch.Tensor] = {
            s: torch.ones(num_seats, device=device, dtype=torch.long) for s in ("audio", "text")}
        for index in range(num_seats):
            self.set(index, self.default)

    def set(self, index: int, settings: SeatSampling) -> None:
        self._rows[index] = settings
        self._uniform = settings if all(row == settings for row in self._rows) else None
        for stream, temp, top_k in (("audio", settings.temp, settings.top_k),
                                    ("text", settings.temp_text, settings.top_k_text)):
            greedy = temp <= 0  # top-1 is the argmax; temperature 1 keeps the division harmless
            self.temp[stream][index] = 1.0 if greedy else temp
            self.top_k[stream][index] = 1 if greedy else top_k

    def scalar(self, stream: Stream) -> tuple[bool, float, int] | None:
        """moshi's scalar sampler's (use_sampling, temp, top_k) for `stream` when it may run for every
        seat (all seats agree, no CUDA graph records the sampling); else None."""
        uniform = self._uniform
        if uniform is None or not self._scalar_allowed:
            return None
        temp, top_k = (uniform.temp, uniform.top_k) if stream == "audio" else (uniform.temp_text, uniform.top_k_text)
        return temp > 0, temp, top_k

    def sample(self, logits: torch.Tensor, stream: Stream) -> torch.Tensor:
        if (scalar := self.scalar(stream)) is not None:
            return sample_token(logits.float(), *scalar)
        if self.rank[stream].numel() > logits.shape[-1]:  # a cap above the vocabulary: the whole of it
            self.rank[stream] = self.rank[stream][:logits.shape[-1]]
        return sample_rows(logits, self.temp[stream], self.top_k[stream], self.rank[stream])


class SeatLMGen(LMGen):
    """moshi's LMGen, sampling each batch row with its seat's settings (see the module notes)."""

    def __init__(self, lm_model: LMModel, sampler: SeatSampler, **kwargs):
        if kwargs.get("cfg_coef", 1.0) != 1.0:
            raise ValueError("SeatLMGen does not support classifier-free guidance")
        super().__init__(lm_model, use_sampling=False, on_text_logits_hook=self._sample_text, **kwargs)
        self.sampler = sampler
        self.sync_text_sampling()

    def sync_text_sampling(self) -> None:
        """Call after the sampler's settings change. While moshi's scalar sampler may serve every seat,
        moshi samples the text token itself (its `use_sampling`, `temp_text`, `top_k_text`: the same
        call the hook would make, without the hook's write-back and second argmax); otherwise the hook
        samples each row. Only the text token reads these (the audio tokens: `depformer_step`)."""
        scalar = self.sampler.scalar("text")
        if scalar is None:
            self.on_text_logits_hook, self.use_sampling = self._sample_text, False
        else:
            self.on_text_logits_hook = None
            self.use_sampling, self.temp_text, self.top_k_text = scalar

    def set_condition_row(self, index: int, row: torch.Tensor) -> None:
        """Overwrite one seat's row of the summed condition (voice, emotion) in place, between steps:
        moshi keeps it in LMGen's streaming state and CUDA graphs copy it in on every replay, so an
        in-place write stays graph-safe."""
        self._streaming_state.condition_sum[index].copy_(row)

    def _sample_text(self, text_logits: torch.Tensor) -> None:
        token = self.sampler.sample(text_logits, "text")
        text_logits.fill_(float("-inf")).scatter_(-1, token[..., None], 0.0)

    def depformer_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        lm_model = self.lm_model
        assert lm_model.depformer is not None and not lm_model.depformer.is_streaming
        prev_token = text_token
        tokens: list[torch.Tensor] = []
        with lm_model.depformer.streaming(text_token.shape[0]):
            for cb_index in range(lm_model.dep_q):
                logits = lm_model.forward_depformer(cb_index, prev_token[:, None, None], transformer_out)
                prev_token = self.sampler.sample(logits, "audio")[:, 0, 0]
                tokens.append(prev_token)
        return torch.stack(tokens, dim=1)
