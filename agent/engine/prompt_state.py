"""A prompt's state, computed once and copied into any batch row: the one place that reads and
writes moshi's streaming state for prompts.

Contract (stock moshi 0.2.13 terms; P = len(frames), d_k = the LM's delay of stream k). A plain
single-row run of PersonaPlex's prompt is P `LMGen.step`s: step s (0 <= s < P) is given the
prompt's user codes of frame s, and its outputs (written at ring position s + 1) are forced to the
prompt's text and agent codes there - text and agent semantic of frame s + 1 while s + 1 < P, the
agent's acoustic codebooks of frame s always - and left to the model otherwise (at s = P - 1:
the text token and the first codebook of the first answer frame). The user's own audio starts at
step P. (PersonaPlex's fork does the same; its calls are shifted by one, its first call only
initialises, so its frame 0 is never seen either.)

Every input of those P steps is known in advance, so `PromptLMGen.prefill` runs them as ONE
transformer pass over positions 0..P-1 (batch 1, in a streaming state of its own, swapped in and
out around the pass) instead of P sequential steps; no sampling, no depformer, except at the last
position, where the text token and the first codebook are chosen greedily, once per prompt.
The result, a `PromptState`, holds per attention layer the P keys and values, the offsets (P) and
the token ring's column at position P. `restore(row, state)` writes it into one batch row of the
live state (KV slots 0..P-1, end offsets, offsets, ring); the row must have been reset (moshi's
`reset_streaming(mask)`) first. Other rows are untouched.

With sampling, that first answer frame's text token and first codebook are the greedy ones for
every call sharing the prompt; every later token is sampled with the call's own settings.

When the conversation outgrows the context (3000 frames = 4 min for the 7B), moshi's ring KV
cache drops the oldest positions, the prompt first: the model then no longer attends to its voice
or persona and drifts. The engine ends such a call just before (`engine.PROMPT_CONTEXT_MARGIN`)
rather than let it drift; the transports tell the caller or start a fresh call on the same prompt.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agent.engine.prompts import PromptFrames
from agent.engine.sampling import SeatLMGen


@dataclass(frozen=True)
class PromptState:
    length: int  # P: positions the transformer has consumed; the row's offsets after a restore
    keys: tuple[torch.Tensor, ...]  # per attention layer, [heads, P, head_dim]
    values: tuple[torch.Tensor, ...]
    ring_column: torch.Tensor  # [K] the token ring at position P (text/agent/user streams)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.ring_column))


class PromptLMGen(SeatLMGen):
    """`SeatLMGen` that can compute a prompt's state off the batch and restore it into a row."""

    @torch.no_grad()
    def prefill(self, frames: PromptFrames) -> PromptState:
        """Run the prompt's P positions through the transformer in one pass (see the module notes).
        Call it between steps, on the thread that steps (the live state is swapped out meanwhile)."""
        lm = self.lm_model
        if lm.fuser is not None:
            raise ValueError("prompts on a model with conditioners (speaker/emotion LUTs) are not supported")
        sequence = self._delayed(frames)  # [1, K, P + 1]
        length = len(frames)
        live = lm.get_streaming_state()
        lm.set_streaming_state({name: None for name in live})
        try:
            with lm.streaming(1):
                transformer_out, text_logits = self._forward(sequence[:, :, :length], frames.voice_embeddings)
                keys, values = [], []
                for state in lm.get_streaming_state().values():
                    kv = getattr(state, "kv_cache", None)
                    if kv is not None:
                        keys.append(kv.cache[0, 0, :, :length].clone())
                        values.append(kv.cache[1, 0, :, :length].clone())
            last = transformer_out[:, -1:]
            text_token = text_logits[:, 0, -1].argmax(-1)  # [1]
            with lm.depformer.streaming(1):
                first_codebook = lm.forward_depformer(0, text_token[:, None, None], last).argmax(-1)[0, 0, 0]
        finally:
            lm.set_streaming_state(live)
        column = sequence[0, :, length].clone()
        column[0] = text_token[0]
        column[1] = first_codebook
        return PromptState(length, tuple(keys), tuple(values), column)

    def _forward(self, sequence: torch.Tensor, embeddings: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """moshi's `forward_text`, with a saved voice's embeddings in place of its first positions."""
        lm = self.lm_model
        if embeddings is None:
            return lm.forward_text(sequence)
        x = self.embed(sequence)
        x[:, :embeddings.shape[0]] = embeddings.to(x)
        out = lm.transformer(x)
        if lm.out_norm:
            out = lm.out_norm(out)
        return out, lm.text_linear(out)[:, None]

    def embed(self, sequence: torch.Tensor) -> torch.Tensor:
        """The LM's summed input embeddings of ring positions [B, K, T] -> [B, T, dim], as moshi's
        `forward_text` (and PersonaPlex's `embed_codes`) compute them."""
        lm = self.lm_model
        x = None
        for cb in range(lm.num_audio_codebooks):  # moshi's order: audio codebooks, then text
            emb = lm.emb[cb](sequence[:, cb + lm.audio_offset])
            x = emb if x is None else x + emb
        text = lm.text_emb(sequence[:, 0])
        return text if x is None else x + text

    @torch.no_grad()
    def save_voice_embeddings(self, frames: PromptFrames, path: str | Path) -> None:
        """Write the voice phase of `frames` as PersonaPlex's .pt voice: the summed input embeddings
        of positions 0..N-2 and the token ring (4 wide, as theirs) after N steps. Needs no state."""
        n = frames.voice_frames
        sequence = self._delayed(frames)  # the silence phase follows, so positions N-1 and N exist
        embeddings = self.embed(sequence[:, :, :n - 1])[0][:, None, None]  # [N-1, 1, 1, dim]
        ring = torch.full((1, self.lm_model.num_codebooks, 4), self.lm_model.zero_token_id, dtype=torch.long)
        for position in (n - 1, n):
            ring[0, :, position % 4] = sequence[0, :, position].cpu()
        torch.save({"embeddings": embeddings.cpu(), "cache": ring}, path)

    def _delayed(self, frames: PromptFrames) -> torch.Tensor:
        """Ring positions 0..P as the LM reads them: stream k at position p holds frame p - d_k,
        and the initial token where p <= d_k (moshi's `is_init`)."""
        lm = self.lm_model
        length = len(frames)
        per_frame = torch.from_numpy(np.concatenate([frames.text[:, None], frames.agent, frames.user], axis=1)).T
        if per_frame.shape[0] != lm.num_codebooks:
            raise ValueError(f"prompt frames carry {per_frame.shape[0]} streams, the LM reads {lm.num_codebooks}")
        out = torch.full((lm.num_codebooks, length + 1), lm.zero_token_id, dtype=torch.long)
        initial = [lm.text_initial_token_id] + [lm.initial_token_id] * lm.num_audio_codebooks
        for k, delay in enumerate(lm.delays):
            n = min(length, length + 1 - delay)
            out[k, delay:delay + n] = per_frame[k, :n]
            out[k, :delay + 1] = initial[k]
        # the user's semantic codebook at position P is the caller's first frame, written by its first step
        return out[None].to(lm.device)

    @torch.no_grad()
    def restore(self, row: int, state: PromptState) -> None:
        """Copy a prompt's state into batch row `row` (already reset)."""
        lm = self.lm_model
        layers = [s for s in lm.get_streaming_state().values() if getattr(s, "kv_cache", None) is not None]
        if len(layers) != len(state.keys):
            raise ValueError(f"a prompt state of {len(state.keys)} layers for a model with {len(layers)}")
        length = state.length
        for layer, k, v in zip(layers, state.keys, state.values):
            layer.kv_cache.cache[0, row, :, :length].copy_(k)
            layer.kv_cache.cache[1, row, :, :length].copy_(v)
            layer.kv_cache.end_offset[row] = length
            layer.offset[row] = length
        for s in lm.get_streaming_state().values():
            offsets = getattr(s, "offsets", None)
            if isinstance(offsets, torch.Tensor):
                offsets[row] = length
        gen = self._streaming_state
        ring = gen.cache
        ring[row, :, length % ring.shape[-1]] = state.ring_column.to(ring.device)
        gen.offsets[row] = length


class PromptCache:
    """Prompt states by key, least recently used dropped first, bounded in entries and in bytes (the
    7B holds ~0.5 MiB per prompt frame in bf16, on the device). Thread-safe."""

    def __init__(self, max_entries: int, max_bytes: int | None = None):
        self.max_entries = max(1, max_entries)
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, PromptState] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> PromptState | None:
        with self._lock:
            state = self._items.get(key)
            if state is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return state

    def put(self, key: str, state: PromptState) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= old.nbytes if old is not None else 0
            self._items[key] = state
            self._bytes += state.nbytes
            while len(self._items) > 1 and (len(self._items) > self.max_entries or
                                            (self.max_bytes is not None and self._bytes > self.max_bytes)):
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes
