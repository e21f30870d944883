"""The recogniser: two 1-D convolutions (the second strides 3: 30 ms frames), a BiLSTM, a linear layer
to the CTC labels (agent.eval.ctc.alphabet). A folder holds `model.safetensors` (fp16) and
`recipe.json` (its geometry under "model", how it was trained and what it scored).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from agent.eval.ctc import alphabet
from agent.eval.ctc.features import N_MELS

WEIGHTS, RECIPE = "model.safetensors", "recipe.json"


@dataclass(frozen=True)
class ModelConfig:
    conv: int = 128  # channels of the convolutions
    hidden: int = 96  # per direction
    layers: int = 2
    stride: int = 3  # frames of 10 ms per output frame
    dropout: float = 0.15


class CtcRecogniser(nn.Module):
    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        c = config.conv
        self.front = nn.Sequential(
            nn.Conv1d(N_MELS, c, 5, padding=2), nn.BatchNorm1d(c), nn.GELU(),
            nn.Conv1d(c, c, 5, stride=config.stride, padding=2), nn.BatchNorm1d(c), nn.GELU(),
            nn.Dropout(config.dropout))
        self.lstm = nn.LSTM(c, config.hidden, config.layers, batch_first=True, bidirectional=True,
                            dropout=config.dropout)
        self.out = nn.Linear(2 * config.hidden, alphabet.SIZE)

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames for inputs of `lengths` 10 ms frames."""
        return (lengths - 1) // self.config.stride + 1

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, frames, 80) features -> (batch, out frames, labels) log-probabilities and their lengths."""
        h = self.front(x.transpose(1, 2)).transpose(1, 2)
        out_lengths = self.frames(lengths)
        packed = nn.utils.rnn.pack_padded_sequence(h, out_lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True)
        return self.out(h).log_softmax(-1), out_lengths


def save(model: CtcRecogniser, folder: Path, recipe: dict) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / RECIPE).write_text(json.dumps({**recipe, "model": asdict(model.config)}, ensure_ascii=False, indent=1),
                                 encoding="utf-8")


def load(folder: Path) -> tuple[CtcRecogniser, dict]:
    """The recogniser in `folder`, in eval mode, fp32, and its recipe."""
    from safetensors.torch import load_file
    recipe = json.loads((folder / RECIPE).read_text(encoding="utf-8"))
    known = {f.name for f in fields(ModelConfig)}
    model = CtcRecogniser(ModelConfig(**{k: v for k, v in recipe["model"].items() if k in known}))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in load_file(str(folder / WEIGHTS)).items()})
    return model.eval(), recipe
