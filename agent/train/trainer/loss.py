"""The loss: moshi-finetune's weighted cross-entropy on the text stream and the agent's codebooks, in one
module with the LM and its conditioning so DDP/FSDP see every trainable parameter in their forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moshi.conditioners import ConditionAttributes
from moshi.models.lm import LMModel, LMOutput

from agent.train.trainer.config import TrainConfig


def weighted_sums(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted cross-entropies, sum of weights) over the valid positions."""
    target = torch.where(mask, target, torch.zeros_like(target))
    weights = weights * mask.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), reduction="none")
    loss = torch.where(weights.reshape(-1) > 0, loss * weights.reshape(-1), torch.zeros_like(loss))
    return loss.sum(), weights.sum()


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """moshi-finetune's compute_loss_with_mask: a weighted mean over valid positions."""
    total, weight = weighted_sums(logits, target, mask, weights)
    return total / weight.clamp_min(1e-6)


class LossModule(torch.nn.Module):
    """LM + conditioning + loss in one forward, so DDP/FSDP see every trainable parameter in their forward."""

    def __init__(self, lm: LMModel, config: TrainConfig):
        super().__init__()
        self.lm, self.config = lm, config

    def forward(self, codes: torch.Tensor, conditions: list[dict[str, str | None]],
                prompt_frames: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        lm, config = self.lm, self.config
        condition_tensors = None
        if lm.condition_provider is not None:
            names = list(lm.condition_provider.conditioners)
            attrs = [ConditionAttributes(text={n: (c.get(n) if config.use_conditions else None) for n in names})
                     for c in conditions]
            condition_tensors = lm.condition_provider.prepare_and_provide(attrs)
        return self.losses(lm(codes, condition_tensors), codes, prompt_frames)

    def losses(self, out: LMOutput, targets: torch.Tensor, prompt_frames: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """The weighted losses of the LM's output against `targets` [B, 1 + 2K, T] (undelayed, as the input
        codes). The first prompt_frames[b] frames of row b are a forced prompt: input only, never a target.
        Also the weighted sums and weights behind each mean, so several processes can pool them into the
        loss one process would compute over all their windows (loop.pooled_loss)."""
        lm, config = self.lm, self.config
        keep = torch.ones(targets.shape[0], 1, targets.shape[-1], dtype=torch.bool, device=targets.device)
        if prompt_frames is not None:
            positions = torch.arange(targets.shape[-1], device=targets.device)
            keep = (positions[None, :] >= prompt_frames.to(targets.device)[:, None])[:, None, :]
        text_target = targets[:, :lm.audio_offset]
        text_weights = torch.ones_like(text_target, dtype=torch.float32)
        padding = (text_target == lm.text_padding_token_id) | (text_target == lm.end_of_text_padding_id)
        text_weights[padding] = config.text_padding_weight
        text_sum, text_weight = weighted_sums(out.text_logits, text_target, out.text_mask & keep, text_weights)
        audio_target = targets[:, lm.audio_offset:lm.audio_offset + lm.dep_q]
        audio_weights = torch.ones_like(audio_target, dtype=torch.float32)
        audio_weights[:, 0] *= config.first_codebook_weight_multiplier
        audio_sum, audio_weight = weighted_sums(out.logits, audio_target, out.mask & keep, audio_weights)
        text_loss, audio_loss = text_sum / text_weight.clamp_min(1e-6), audio_sum / audio_weight.clamp_min(1e-6)
        return {"loss": text_loss + audio_loss, "text_loss": text_loss.detach(), "audio_loss": audio_loss.detach(),
                "text_sum": text_sum, "text_weight": text_weight.detach(),
                "audio_sum": audio_sum, "audio_weight": audio_weight.detach()}
