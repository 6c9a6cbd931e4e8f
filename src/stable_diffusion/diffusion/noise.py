"""Where a sampler's fresh noise comes from, as AUTOMATIC1111 draws it, so a seed gives the same image in any
batch. A noise source is called ``noise(like, sigma, sigma_next)`` and returns N(0, I) noise shaped like
``like`` for the step from ``sigma`` to ``sigma_next``:

- ``PerImageNoise``: each image's own CPU generator, continuing from its initial noise (the ancestral samplers);
- ``BrownianNoise``: k-diffusion's Brownian-tree noise, one torchsde tree per image seeded with the image's seed
  (the SDE samplers, A1111's "brownian_noise"): the noise of an interval depends only on the seed and the
  interval, so the same image comes out whatever the batch."""

from __future__ import annotations

import warnings

import torch


class PerImageNoise:
    """Noise from each image's own generator, one draw per image per call."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    def __call__(self, like: torch.Tensor, sigma: torch.Tensor | None = None,
                 sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([torch.randn(like.shape[1:], generator=g) for g in self.generators]).to(like)


class BrownianNoise:
    """The increment of a Brownian motion W over [sigma_next, sigma], divided by its standard deviation: one
    torchsde BrownianTree per image over [sigma_min, sigma_max], seeded with the image's seed (k-diffusion's
    BrownianTreeNoiseSampler, which A1111 seeds per image)."""

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seeds: list[int]) -> None:
        import torchsde

        if len(seeds) != like.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {like.shape[0]}")
        low, high = torch.as_tensor(float(sigma_min)), torch.as_tensor(float(sigma_max))
        start = torch.zeros_like(like[0])
        self.trees = [torchsde.BrownianTree(low, start, high, entropy=seed) for seed in seeds]

    def __call__(self, like: torch.Tensor, sigma: torch.Tensor | None = None,
                 sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        a, b = torch.as_tensor(float(sigma)), torch.as_tensor(float(sigma_next))
        low, high, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():  # torchsde's float32 end-point notes (k-diffusion's trees print them too)
            warnings.filterwarnings("ignore", message="Should have t")
            w = torch.stack([tree(low, high) for tree in self.trees]) * sign  # W(sigma_next) - W(sigma)
        return (w / (b - a).abs().sqrt()).to(like)
