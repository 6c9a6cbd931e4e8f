"""Where the noise comes from, as AUTOMATIC1111 draws it (modules/rng.py), so a seed gives the same image in any
batch and on any device. ``initial_noise`` is each image's starting noise, with A1111's variation seeds and seed
resizing. A sampler's fresh noise source is called ``noise(like, sigma, sigma_next)`` and returns N(0, I) noise shaped like
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


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation between two (C, H, W) noises, ``low`` at t = 0 and ``high`` at 1: the angle
    is taken per channel and column (norms along dim 1), and nearly parallel noises are mixed linearly with the
    weights A1111 uses there."""
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)  # (C, W)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    return (torch.sin((1 - t) * omega) / torch.sin(omega)).unsqueeze(1) * low \
        + (torch.sin(t * omega) / torch.sin(omega)).unsqueeze(1) * high


def initial_noise(seeds: list[int], shape: tuple[int, int, int], subseeds: list[int] | None = None,
                  subseed_strength: float = 0.0, resize_from: tuple[int, int] | None = None,
                  ) -> tuple[torch.Tensor, list[torch.Generator]]:
    """A1111's starting noise: image i is ``torch.randn(shape, generator=cpu_generator(seeds[i]))``, and that
    generator continues for the ancestral samplers' noise. A variation (``subseed_strength`` > 0) slerps it
    toward subseed i's noise (1 gives the subseed's). ``resize_from`` (latent height, width) draws the seed's
    noise at that size and pastes it centred into the image's (cropped or surrounded by fresh noise), so a
    seed keeps its composition at another size."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    source = shape if resize_from is None else (shape[0], *resize_from)
    images = []
    for i, (seed, generator) in enumerate(zip(seeds, generators, strict=True)):
        noise = torch.randn(shape, generator=generator) if source == shape else _randn(seed, source)
        if subseeds is not None and subseed_strength != 0:
            noise = slerp(subseed_strength, noise, _randn(subseeds[i] if i < len(subseeds) else 0, source))
        if source != shape:
            canvas = torch.randn(shape, generator=generator)
            dy, dx = (shape[1] - source[1]) // 2, (shape[2] - source[2]) // 2  # negative: the source is larger
            h = source[1] + 2 * min(dy, 0)  # A1111's crop of a larger source (one row/column short when odd)
            w = source[2] + 2 * min(dx, 0)
            canvas[:, max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w] = \
                noise[:, max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]
            noise = canvas
        images.append(noise)
    return torch.stack(images), generators
