"""Training data: fixed-length windows of the token shards, in an order that depends only on (seed, step),
and the held-out split (by a hash of each dialogue's id)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from agent.train.records import TokenRecord


class Windows:
    """Every `frames`-long window of the shards of one split; sample k of the run is a pure function of k."""

    def __init__(self, records: list[TokenRecord], root: Path, frames: int, seed: int, zero_token: int):
        self.records, self.root, self.frames, self.seed, self.zero = records, root, frames, seed, zero_token
        self.index = [(r, start) for r in range(len(records)) for start in range(0, records[r].frames, frames)]
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, r: int) -> dict[str, torch.Tensor]:
        if r not in self._cache:
            self._cache[r] = load_file(str(self.root / self.records[r].path))
        return self._cache[r]

    def sample(self, k: int) -> int:
        epoch, position = divmod(k, len(self.index))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.index)))
        return int(self._order[1][position])

    def window(self, i: int) -> tuple[torch.Tensor, dict[str, str | None]]:
        """codes [1 + 2K, frames] (text, agent, user), past-the-end frames = zero_token (no loss, no input)."""
        r, start = self.index[i]
        shard = self._shard(r)
        text, audio = shard["text"][start:start + self.frames], shard["audio"][:, start:start + self.frames]
        codes = torch.full((1 + audio.shape[0], self.frames), self.zero, dtype=torch.long)
        codes[0, :text.shape[0]] = text.long()
        codes[1:, :audio.shape[1]] = audio.long()
        return codes, self.records[r].conditions

    def batch(self, ks: list[int]) -> tuple[torch.Tensor, list[dict[str, str | None]]]:
        items = [self.window(self.sample(k)) for k in ks]
        return torch.stack([c for c, _ in items]), [cond for _, cond in items]


def split_records(records: list[TokenRecord], eval_fraction: float) -> tuple[list[TokenRecord], list[TokenRecord]]:
    def held_out(record: TokenRecord) -> bool:
        return int(hashlib.sha1(record.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction
    train = [r for r in records if not held_out(r)]
    evals = [r for r in records if held_out(r)]
    if not train:  # a tiny corpus: train on everything rather than nothing
        train, evals = records, []
    return train, evals

