"""The loss: moshi-finetune's weighted cross-entropy on the text stream and the agent's codebooks, in one
module with the LM and its conditioning so DDP/FSDP see every trainable parameter in their forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moshi.conditioners import ConditionAttributes
from moshi.models.lm import LMModel

from agent.train.trainer.config import TrainConfig


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """moshi-finetune's compute_loss_with_mask: a weighted mean over valid positions."""
    target = torch.where(mask, target, torch.zeros_like(target))
    weights = weights * mask.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), reduction="none")
    loss = torch.where(weights.reshape(-1) > 0, loss * weights.reshape(-1), torch.zeros_like(loss))
    return loss.sum() / weights.sum().clamp_min(1e-6)


class LossModule(torch.nn.Module):
    """LM + conditioning + loss in one forward, so DDP/FSDP see every trainable parameter in their forward."""

    def __init__(self, lm: LMModel, config: TrainConfig):
        super().__init__()
        self.lm, self.config = lm, config

    def forward(self, codes: torch.Tensor, conditions: list[dict[str, str | None]]) -> dict[str, torch.Tensor]:
        lm, config = self.lm, self.config
        condition_tensors = None
        if lm.condition_provider is not None:
            names = list(lm.condition_provider.conditioners)
            attrs = [ConditionAttributes(text={n: (c.get(n) if config.use_conditions else None) for n in names})
                     for c in conditions]
            condition_tensors = lm.condition_provider.prepare_and_provide(attrs)
        out = lm(codes, condition_tensors)
        text_target = codes[:, :lm.audio_offset]
        text_weights = torch.ones_like(text_target, dtype=torch.float32)
        padding = (text_target == lm.text_padding_token_id) | (text_target == lm.end_of_text_padding_id)
        text_weights[padding] = config.text_padding_weight
        text_loss = masked_cross_entropy(out.text_logits, text_target, out.text_mask, text_weights)
        audio_target = codes[:, lm.audio_offset:lm.audio_offset + lm.dep_q]
        audio_weights = torch.ones_like(audio_target, dtype=torch.float32)
        audio_weights[:, 0] *= config.first_codebook_weight_multiplier
        audio_loss = masked_cross_entropy(out.logits, audio_target, out.mask, audio_weights)
        return {"loss": text_loss + audio_loss, "text_loss": text_loss.detach(), "audio_loss": audio_loss.detach()}
