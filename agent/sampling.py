"""Sampling settings per seat: every call in the batch picks its own temperatures and top-k.

moshi's `LMGen` samples the whole batch with one temperature and one top-k. `SeatLMGen` is that
same `LMGen` (same `_step`, same streaming state, same CUDA graphs) with one change: each batch row
is sampled with its own settings, held in fixed-size tensors on the model's device so a CUDA graph
captured once stays valid when a caller changes them.

- Text token: moshi calls `on_text_logits_hook(text_logits)` right before it samples; with
  `use_sampling=False` it then takes the argmax. The hook samples each row with that row's settings
  and leaves the chosen token as the row's only finite logit, so moshi's argmax picks exactly it.
- Audio tokens: `depformer_step` is moshi 0.2.13's loop with the per-row sampler in place of
  `sample_token` (classifier-free guidance, which the engine does not use, is left out).

A temperature of 0 is greedy (the argmax, as moshi's `use_sampling=False`). Top-k is capped by the
server (`SamplingConfig.max_top_k*`): the cap fixes the shapes the sampler works on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping

import torch
from moshi.models.lm import LMGen, LMModel
from moshi.utils.sampling import multinomial

from agent.config import SamplingConfig

Stream = Literal["text", "audio"]
MAX_TEMP = 2.0  # beyond this Moshi's output is noise; a client asking more is told so
# Kyutai's web client sends these query parameters; we take the same names everywhere.
REQUEST_NAMES = {"text_temperature": "temp_text", "text_topk": "top_k_text",
                 "audio_temperature": "temp", "audio_topk": "top_k"}
SamplingRequest = tuple[tuple[str, float | int], ...]  # (SeatSampling field, value), sorted; () = defaults


class SamplingError(ValueError):
    """Sampling settings out of range; the message is fit to show a caller."""


@dataclass(frozen=True)
class SeatSampling:
    """One call's sampling settings (the names of Kyutai's web client, without the prefixes)."""

    temp: float
    temp_text: float
    top_k: int
    top_k_text: int

    @classmethod
    def defaults(cls, config: SamplingConfig) -> "SeatSampling":
        if not config.use_sampling:
            return cls(0.0, 0.0, config.top_k, config.top_k_text)
        return cls(config.temp, config.temp_text, config.top_k, config.top_k_text)

    def checked(self, config: SamplingConfig) -> "SeatSampling":
        """Itself, or SamplingError if a value is outside what this server allows."""
        for name, value in (("audio temperature", self.temp), ("text temperature", self.temp_text)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= MAX_TEMP:
                raise SamplingError(f"{name} must be a number from 0 (greedy) to {MAX_TEMP:g}, got {value!r}")
        for name, value, cap in (("audio top-k", self.top_k, config.max_top_k),
                                 ("text top-k", self.top_k_text, config.max_top_k_text)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
                raise SamplingError(f"{name} must be a whole number from 1 to {cap}, got {value!r}")
        return self

    def with_request(self, request: SamplingRequest) -> "SeatSampling":
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


def sample_rows(logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Sample logits [B, ..., card] -> tokens [B, ...], row b with temperature temp[b] (0 = argmax)
    and top-k top_k[b] <= k_max. No host sync: safe inside a CUDA graph."""
    logits = logits.float()
    shape = (logits.shape[0],) + (1,) * (logits.dim() - 1)
    scaled = logits / temp.clamp(min=1e-6).view(shape)
    values, indices = torch.topk(scaled, min(k_max, logits.shape[-1]), dim=-1)  # sorted, largest first
    rank = torch.arange(values.shape[-1], device=logits.device)
    values = values.masked_fill(rank >= top_k.view(shape), float("-inf"))
    choice = multinomial(torch.softmax(values, dim=-1), num_samples=1)
    sampled = indices.gather(-1, choice)[..., 0]
    greedy = (temp <= 0).view(shape[:-1])
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


class SeatSampler:
    """Per-seat settings as device tensors, written in place (CUDA-graph safe)."""

    def __init__(self, num_seats: int, device: torch.device, config: SamplingConfig):
        default = SeatSampling.defaults(config)
        self.config = config
        self.default = default
        self.k_max: dict[Stream, int] = {"audio": config.max_top_k, "text": config.max_top_k_text}
        self.temp: dict[Stream, torch.Tensor] = {
            "audio": torch.full((num_seats,), float(default.temp), device=device),
            "text": torch.full((num_seats,), float(default.temp_text), device=device)}
        self.top_k: dict[Stream, torch.Tensor] = {
            "audio": torch.full((num_seats,), default.top_k, device=device, dtype=torch.long),
            "text": torch.full((num_seats,), default.top_k_text, device=device, dtype=torch.long)}

    def set(self, index: int, settings: SeatSampling) -> None:
        self.temp["audio"][index] = settings.temp
        self.temp["text"][index] = settings.temp_text
        self.top_k["audio"][index] = settings.top_k
        self.top_k["text"][index] = settings.top_k_text

    def sample(self, logits: torch.Tensor, stream: Stream) -> torch.Tensor:
        return sample_rows(logits, self.temp[stream], self.top_k[stream], self.k_max[stream])


class SeatLMGen(LMGen):
    """moshi's LMGen, sampling each batch row with its seat's settings (see the module notes)."""

    def __init__(self, lm_model: LMModel, sampler: SeatSampler, **kwargs):
        if kwargs.get("cfg_coef", 1.0) != 1.0:
            raise ValueError("SeatLMGen does not support classifier-free guidance")
        super().__init__(lm_model, use_sampling=False, on_text_logits_hook=self._sample_text, **kwargs)
        self.sampler = sampler

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
