"""Frechet Inception Distance (Heusel et al. 2017): the Frechet distance between Gaussians fitted to the
features of real and generated images, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``.

The matrix square root is taken through symmetric eigendecompositions in float64 (S1^1/2 S2 S1^1/2 is
symmetric positive semi-definite, so its trace-root is the sum of the roots of its clipped eigenvalues),
which stays real and stable where the non-symmetric ``sqrtm(S1 S2)`` of the classic code can go complex.
The feature extractor is pluggable: any module mapping images in [0, 1] to (B, d) features."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Features = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] -> (B, d)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root)


class FeatureStatistics:
    """Running mean and covariance of features (sums in float64), fed batch by batch."""

    def __init__(self) -> None:
        self.n, self.total, self.outer = 0, None, None

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().double().cpu()
        self.total = f.sum(0) if self.total is None else self.total + f.sum(0)
        self.outer = f.T @ f if self.outer is None else self.outer + f.T @ f
        self.n += len(f)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ValueError("FID needs at least 2 images per set")
        mu = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


@torch.no_grad()
def statistics(features: Features, batches: Iterable[torch.Tensor]) -> FeatureStatistics:
    stats = FeatureStatistics()
    for images in batches:
        stats.update(features(images))
    return stats


def fid(features: Features, real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor]) -> float:
    """FID between two streams of image batches (B, 3, H, W) in [0, 1]."""
    return frechet_distance(*statistics(features, real).mean_cov(), *statistics(features, fake).mean_cov())
