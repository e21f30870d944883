"""The one parser of a call's settings, for every transport: the page's inputs, the query of a
fastrtc WebSocket URL (`/websocket/offer?voice=ravi&audio_temperature=0.6`) and Kyutai's
`/api/chat` query all use the same names.

Names: `voice`, `emotion` (catalogue ids); Kyutai's sampling names (`text_temperature`, `text_topk`,
`audio_temperature`, `audio_topk`); PersonaPlex's `voice_prompt`, `text_prompt` and seeds (`seed`,
`text_seed`, `audio_seed`: integers, accepted, but in a shared batch one call's sampling cannot be
seeded on its own); `resume`, the token of a dropped call the connection continues.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.engine.sampling import sampling_request
from agent.errors import CatalogueError, SamplingError
from agent.voices import CallSettings, Catalogue

# The page's inputs after the call component, in this order (ui.build_demo); other clients may send fewer.
PAGE_INPUTS = ("voice", "emotion", "text_temperature", "text_topk", "audio_temperature", "audio_topk",
               "text_prompt", "voice_prompt", "resume")
SEED_NAMES = ("seed", "text_seed", "audio_seed")  # PersonaPlex's server, and its web client
_TEXT_NAMES = ("voice", "emotion", "voice_prompt", "text_prompt")


def parse_call_settings(catalogue: Catalogue, values: Mapping[str, Any]) -> CallSettings:
    """A call's settings from its values by name; absent, empty or non-text values mean the defaults.
    CatalogueError or SamplingError (both ValueError) with a message for the caller."""
    check_seeds(values)
    text = {name: value if isinstance(value := values.get(name), str) else None for name in _TEXT_NAMES}
    return catalogue.settings(text["voice"], text["emotion"], sampling_request(values), text["voice_prompt"],
                              text["text_prompt"])


def check_seeds(values: Mapping[str, Any]) -> None:
    """PersonaPlex's seeds: integers or absent (SamplingError otherwise)."""
    for name in SEED_NAMES:
        raw = values.get(name)
        if raw in (None, ""):
            continue
        try:
            int(raw)
        except (TypeError, ValueError):
            raise SamplingError(f"{name} must be a whole number, got {raw!r}") from None


def resume_token(values: Mapping[str, Any]) -> str | None:
    """The token of a dropped call this connection resumes, if it names one."""
    token = values.get("resume")
    return token if isinstance(token, str) and token else None


@dataclass(frozen=True)
class Requested:
    """What a connection's inputs ask for: the settings, or why they cannot be had (for the caller)."""

    settings: CallSettings | None
    error: str | None = None


class SettingsCache:
    """A connection's inputs, parsed when they change: a transport may ask on every audio chunk."""

    def __init__(self, catalogue: Catalogue):
        self.catalogue = catalogue
        self._inputs: dict[str, Any] | None = None
        self._requested = Requested(None, "no inputs yet")

    def get(self, inputs: Mapping[str, Any]) -> Requested:
        if self._inputs is None or self._inputs != inputs:
            self._inputs = dict(inputs)
            try:
                self._requested = Requested(parse_call_settings(self.catalogue, inputs))
            except (CatalogueError, SamplingError) as exc:
                self._requested = Requested(None, str(exc))
        return self._requested
