"""EnCodec's multi-scale STFT discriminator, its hinge losses and feature matching, for the codec.

Reconstruction losses alone give a muffled average of the plausible signals; a discriminator that
sees the complex spectrum (phase included) at several resolutions pushes the decoder toward sharp,
speech-like detail, and feature matching (L1 between its layers' outputs on real and decoded audio)
gives the decoder a dense signal from it (EnCodec, Défossez et al. 2022; ../shared/notes/codec-facts.md).

Contract: `MultiScaleSTFTDiscriminator(filters, scales)`: `forward(x [B, 1, T])` -> per scale
(logits, feature maps). `Adversary(config, seed)` holds the discriminator and its optimizer:
`discriminator_step(fake, real)` trains it on detached audio (hinge loss) and returns that loss;
`generator_losses(fake, real)` -> (adversarial hinge loss, feature-matching loss) for the codec, with
the discriminator's own weights left out of the graph's leaves. `state_dict` / `load_state_dict`
carry both (an interrupted run resumes exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

# EnCodec's five scales are (n_fft 2048, 1024, 512, 256, 128); on a 2-core CPU three carry most of it
DEFAULT_SCALES = (2048, 1024, 512)


class STFTDiscriminator(nn.Module):
    """One scale: real and imaginary STFT as two channels, 2-D convolutions dilated along time and
    strided along frequency (EnCodec's layout, narrower)."""

    def __init__(self, n_fft: int, filters: int, dilations: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        layers = [weight_norm(nn.Conv2d(2, filters, (3, 9), padding=(1, 4)))]
        for d in dilations:
            layers.append(weight_norm(nn.Conv2d(filters, filters, (3, 9), stride=(1, 2), dilation=(d, 1),
                                                padding=(d, 4))))
        layers.append(weight_norm(nn.Conv2d(filters, filters, (3, 3), padding=(1, 1))))
        self.layers = nn.ModuleList(layers)
        self.post = weight_norm(nn.Conv2d(filters, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(x.reshape(-1, x.shape[-1]), self.n_fft, hop_length=self.n_fft // 4, window=self.window,
                          return_complex=True)
        h = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2, frames, freq]
        features = []
        for layer in self.layers:
            h = F.leaky_relu(layer(h), 0.2)
            features.append(h)
        return self.post(h), features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, filters: int = 16, scales: tuple[int, ...] = DEFAULT_SCALES) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(n, filters) for n in scales)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [d(x) for d in self.discriminators]


def discriminator_hinge(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over scales of relu(1 - D(real)) + relu(1 + D(fake)): low when real scores high, fake low."""
    terms = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).mean()


def generator_hinge(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over scales of relu(1 - D(fake)): low when the discriminator takes decoded audio for real."""
    return torch.stack([F.relu(1 - f).mean() for f in fake_logits]).mean()


def feature_matching(real_features: list[list[torch.Tensor]], fake_features: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between the discriminator's layer outputs on real (fixed targets) and decoded audio, each
    layer's divided by the mean magnitude of its real output (EnCodec's relative feature loss)."""
    terms = [F.l1_loss(f, r.detach()) / r.detach().abs().mean().clamp_min(1e-8)
             for rs, fs in zip(real_features, fake_features) for r, f in zip(rs, fs)]
    return torch.stack(terms).mean()


@dataclass
class AdversaryConfig:
    filters: int = 16
    scales: tuple[int, ...] = DEFAULT_SCALES
    lr: float = 3e-4  # EnCodec's
    betas: tuple[float, float] = (0.5, 0.9)


class Adversary:
    """The discriminator with its optimizer: one update per codec step, on the same batch."""

    def __init__(self, config: AdversaryConfig, seed: int) -> None:
        with torch.random.fork_rng():  # its initial weights do not shift the codec's random stream
            torch.manual_seed(seed + 7919)
            self.discriminator = MultiScaleSTFTDiscriminator(config.filters, tuple(config.scales))
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=config.betas)

    def discriminator_step(self, fake: torch.Tensor, real: torch.Tensor) -> float:
        outputs_real = self.discriminator(real)
        outputs_fake = self.discriminator(fake.detach())  # the codec gets no gradient from this step
        loss = discriminator_hinge([o[0] for o in outputs_real], [o[0] for o in outputs_fake])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def generator_losses(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.discriminator.requires_grad_(False)  # gradients reach the codec, not the discriminator
        try:
            with torch.no_grad():
                outputs_real = self.discriminator(real)
            outputs_fake = self.discriminator(fake)
        finally:
            self.discriminator.requires_grad_(True)
        adversarial = generator_hinge([o[0] for o in outputs_fake])
        matching = feature_matching([o[1] for o in outputs_real], [o[1] for o in outputs_fake])
        return adversarial, matching

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
