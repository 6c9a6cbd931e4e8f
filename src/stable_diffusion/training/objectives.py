"""The losses of the three stages as modules (so DistributedDataParallel can wrap them):
the VAE's reconstruction + KL and optional PatchGAN term (Rombach et al. 2022, sec. 3.1), the DDPM objective
(Ho et al. 2020, Algorithm 1; v-prediction: Salimans & Ho 2022) with the text encoder trained jointly, and CLIP's
contrastive loss. LoRA adapters live in ``stable_diffusion.lora``."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import sdxl_vector
from ..diffusion.denoiser import Denoiser
from ..models.clip import CLIPTextModel
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The random stream of one micro-batch: noise and timesteps depend only on (seed, rank, step)."""
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + rank) * 10_000_019 + step) * 101 + micro)


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (Isola et al. 2017): strided 4x4 convolutions ending in one real/fake logit per patch.
    GroupNorm rather than BatchNorm, so a logit does not depend on the rest of the batch."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for k in range(1, layers):
            out = channels * min(2 ** k, 8)
            blocks += [nn.Conv2d(width, out, 4, 2, 1), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 3, 1, 1))
        super().__init__(*blocks)


def object_weights(images: torch.Tensor, weight: float, threshold: float = 0.05,
                   contrast: float = 0.0, margin: int = 0) -> torch.Tensor:
    """(B, 1, H, W): ``weight`` where a pixel differs from its image's top-left pixel (the background of a flat
    scene) by more than ``threshold`` in some channel (images in [-1, 1]), else 1. With ``margin`` > 0, the
    background pixels within that many pixels (Chebyshev) of an object get ``weight`` too, so a glow or halo
    around a shape costs as much as the shape's own pixels. With ``contrast`` > 0, an object pixel whose RGB
    distance d to the background is below ``contrast`` counts ``contrast / d`` times more again (at most 4x): a
    pink star on white costs as much to blur as a yellow one on navy."""
    difference = images - images[:, :, :1, :1]
    differs = difference.abs().amax(dim=1, keepdim=True) > threshold
    near = F.max_pool2d(differs.float(), 2 * margin + 1, stride=1, padding=margin) if margin > 0 else differs.float()
    weights = 1 + (weight - 1) * near
    if contrast > 0:
        boost = (contrast / difference.norm(dim=1, keepdim=True).clamp_min(1e-3)).clamp(1, 4)
        weights = torch.where(differs, weights * boost, weights)
    return weights


class VAELoss(nn.Module):
    """L1 + L2 reconstruction of a posterior sample, plus ``kl_weight`` x KL to N(0, I). ``object_weight`` > 1
    weights the pixels that differ from the image's background (its top-left pixel's colour) that much more, so
    small shapes on flat backgrounds are not averaged away (their points and corners are few pixels). With ``disc_weight``,
    LDM's adversarial term as hinge losses of a PatchGAN. Both players sit in one loss for one optimiser: the
    generator term sees the discriminator's weights detached (so it trains only the VAE) and the discriminator
    term sees the reconstruction detached (so it trains only the discriminator)."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float, disc_weight: float = 0.0, disc_channels: int = 64,
                 disc_layers: int = 3, object_weight: float = 1.0, object_contrast: float = 0.0,
                 object_margin: int = 0) -> None:
        super().__init__()
        self.vae, self.kl_weight, self.disc_weight, self.object_weight = vae, kl_weight, disc_weight, object_weight
        self.object_contrast, self.object_margin = object_contrast, object_margin
        self.discriminator = PatchDiscriminator(disc_channels, disc_layers) if disc_weight > 0 else None

    def forward(self, images: torch.Tensor, generator: torch.Generator, adversarial: bool = False) -> torch.Tensor:
        posterior = self.vae.encode(images)
        reconstruction = self.vae.decode(posterior.sample(generator))
        error = reconstruction - images
        weighted = self.object_weight != 1 or self.object_contrast > 0
        weight = object_weights(images, self.object_weight, contrast=self.object_contrast,
                                margin=self.object_margin) if weighted else 1.0
        loss = (weight * error.abs()).mean() + (weight * error.pow(2)).mean() + self.kl_weight * posterior.kl().mean()
        if self.discriminator is None:
            return loss
        real, fake = self.discriminator(images), self.discriminator(reconstruction.detach())
        loss = loss + (F.relu(1 - real).mean() + F.relu(1 + fake).mean()) / 2  # the discriminator always learns
        if adversarial:  # the VAE plays from ``disc_start`` on
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            fooled = torch.func.functional_call(self.discriminator, frozen, (reconstruction,))
            loss = loss - self.disc_weight * fooled.mean()
        return loss


def snr_loss_weights(abar: torch.Tensor, weighting: str, gamma: float = 5.0, cap: float = math.inf,
                     floor: float = 1.0) -> torch.Tensor:
    """Per-timestep weights on the noise (eps) error, normalised to mean 1 over the timesteps; with SNR =
    abar / (1 - abar) (= 1 / sigma^2), and x0 error = sigma x noise error:
    - ``none``: 1 (Ho et al.'s L_simple);
    - ``min_snr``: min(1, gamma / SNR), Min-SNR-gamma (Hang et al. 2023), which lightens the nearly clean steps;
    - ``truncated_snr``: max(SNR, floor) on the x0 error, i.e. max(1, floor / SNR) on the noise error
      (Salimans & Ho 2022 with floor 1, close to what v-prediction implies), at most ``cap``: the noisy steps,
      where the layout is decided, weigh more than under eps; a floor below 1 or a cap keeps the nearly
      pure-noise steps, whose x0 error is mostly irreducible, from drowning the rest."""
    inverse_snr = (1 - abar) / abar  # sigma^2
    if weighting == "none":
        weights = torch.ones_like(abar)
    elif weighting == "min_snr":
        weights = (gamma * inverse_snr).clamp(max=1.0)
    elif weighting == "truncated_snr":
        weights = (floor * inverse_snr).clamp(min=1.0, max=cap)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r} (none, min_snr, truncated_snr)")
    return weights / weights.mean()


def caption_loss_weights(captions: list[str], weights: dict[str, float]) -> torch.Tensor:
    """Each caption's loss weight: the largest ``weights[key]`` whose key occurs in it as whole words
    (case-insensitive), else 1. Unlike a weight that depends on the image, one that depends only on the
    conditioning leaves the optimal denoiser for each caption unchanged; it only spends more of the model on
    those captions, like repeating them in the dataset."""
    patterns = [(re.compile(rf"\b{re.escape(key.strip())}\b", re.IGNORECASE), w) for key, w in weights.items()]
    return torch.tensor([max([w for pattern, w in patterns if pattern.search(c)], default=1.0) for c in captions])


class DiffusionLoss(nn.Module):
    """The DDPM objective (Ho et al. 2020, Algorithm 1): t uniform, noise ~ N(0, I), and the denoiser's own
    ``loss`` (the target its scalings imply: the noise for eps, v for v-prediction). The text encoders learn
    through it; their contexts are concatenated as in generation, and for SDXL (``size_embed_dim`` > 0) the UNet
    also gets y: the last encoder's pooled text and the size ids of ``image_size`` training images. With a
    ``weighting`` other than "none", each sample's error is measured on the noise (for v: abar times the v
    error, which equals it) and weighted by :func:`snr_loss_weights`."""

    def __init__(self, unet: UNetModel, text_encoders: list[CLIPTextModel], abar: torch.Tensor, prediction: str,
                 train_text_encoder: bool, weighting: str = "none", snr_gamma: float = 5.0,
                 snr_weight_cap: float = math.inf, snr_floor: float = 1.0, size_embed_dim: int = 0,
                 image_size: int = 0) -> None:
        super().__init__()
        self.denoiser, self.text_encoders = Denoiser(unet, abar, prediction), nn.ModuleList(text_encoders)
        self.size_embed_dim, self.image_size = size_embed_dim, image_size
        weights = None
        if weighting != "none":
            weights = snr_loss_weights(abar.float(), weighting, snr_gamma, snr_weight_cap, snr_floor)
            if prediction == "v":  # eps - eps_hat = sqrt(abar) (v - v_hat)
                weights = weights * abar.float()
        self.register_buffer("weights", weights, persistent=False)
        self.text_encoders.requires_grad_(train_text_encoder)

    def forward(self, latents: torch.Tensor, ids: torch.Tensor, generator: torch.Generator,
                sample_weights: torch.Tensor | None = None, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``ids`` (encoders, B, 77): each text encoder's tokens. ``sample_weights`` (B,), e.g. from
        :func:`caption_loss_weights`: the loss is their weighted mean; ``pixel_weights`` (B, 1, h, w) weigh the
        latent's positions within each sample."""
        b = latents.shape[0]
        timesteps = len(self.denoiser.schedule.sigmas)
        t = torch.randint(0, timesteps, (b,), generator=generator, device=generator.device).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
        encoded = [encoder(tokens) for encoder, tokens in zip(self.text_encoders, ids, strict=True)]
        context = torch.cat([c for c, _ in encoded], dim=-1)
        y = sdxl_vector(encoded[-1][1], self.image_size, self.image_size, self.size_embed_dim) \
            if self.size_embed_dim else None
        per_sample = self.denoiser.loss(latents, noise, t, context, y, pixel_weights)  # (B,)
        if self.weights is not None:
            per_sample = self.weights[t] * per_sample
        if sample_weights is None:
            return per_sample.mean()
        sample_weights = sample_weights.to(per_sample)
        return (sample_weights * per_sample).sum() / sample_weights.sum()


class HintedUNet(nn.Module):
    """The frozen UNet with a ControlNet's residuals for the batch's control images (``hint``, set per batch)."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module) -> None:
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.hint: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, context, y, control=self.controlnet(x, self.hint, t, context, y))


class ControlNetLoss(DiffusionLoss):
    """Algorithm 1 through the frozen UNet with a ControlNet: only the ControlNet learns (Zhang et al. 2023).
    ``object_weight`` > 1: the latent positions under the control image's white pixels (and one position around
    them) count that many times in each sample's error, so the drawn shapes, a small part of the latent, drive
    the learning rather than the background."""

    object_weight: float = 1.0

    def forward(self, latents: torch.Tensor, ids: torch.Tensor, generator: torch.Generator,
                hints: torch.Tensor) -> torch.Tensor:
        self.denoiser.unet.hint = hints
        weights = None
        if self.object_weight > 1:
            drawn = (hints.amax(1, keepdim=True) > 0.5).float()  # (B, 1, H, W)
            drawn = F.adaptive_max_pool2d(drawn, latents.shape[-2:])  # any drawn pixel marks its latent position
            drawn = F.max_pool2d(drawn, 3, 1, 1)
            weights = 1 + (self.object_weight - 1) * drawn
        return super().forward(latents, ids, generator, pixel_weights=weights)


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE over a batch of (image, caption) pairs (Radford et al. 2021)."""

    def __init__(self, pair: nn.Module) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        image_emb = self.pair.embed_images((images + 1) / 2)
        text_emb = self.pair.embed_texts(ids)
        logits = self.pair.logit_scale.clamp(max=math.log(100)).exp() * image_emb @ text_emb.T  # (B, B)
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
