"""DeepCache (Ma, Fang & Wang 2023, "DeepCache: Accelerating Diffusion Models for Free"): adjacent sampling steps
have nearly the same deep UNet features, so a full UNet pass runs every ``interval`` calls and keeps the feature
that enters the last ``branch + 1`` output blocks; the calls between run only the shallow blocks around that skip
branch and reuse the kept feature. The paper's uniform schedule (its N) on its shallowest branch (0) by default;
branch ``"level"`` is the last block of the highest-resolution level (its residual blocks and its downsample), the
shallowest branch that keeps an ancestral sampler's adherence (docs/speed.md: the branch sweep).

``deep_cache(unet, interval, branch)`` installs it on a UNet for one sampling run (generate.py), over whatever runs the
UNet: a backend that can run the two parts registers them as ``unet.deepcache_parts(branch)``; otherwise the
torch methods ``forward_deep`` / ``forward_shallow`` run. Calls it cannot serve (ControlNet residuals, a batch
shape other than the kept feature's) run the UNet whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class DeepCacheRunner:
    """``unet.forward`` while DeepCache is on: full pass on every ``interval``-th call, shallow ones between."""

    def __init__(self, whole: Callable[..., torch.Tensor], deep: Callable, shallow: Callable, interval: int) -> None:
        self.whole, self.deep, self.shallow, self.interval = whole, deep, shallow, interval
        self.calls = 0
        self.feature: torch.Tensor | None = None
        self.key: tuple | None = None
        self.full_calls = self.shallow_calls = 0

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                 y: torch.Tensor | None = None, control: Any = None, **kwargs: Any) -> torch.Tensor:
        if control is not None or kwargs or context is None:
            return self.whole(x, timesteps, context, y, control=control, **kwargs)
        key = (tuple(x.shape), tuple(context.shape), None if y is None else tuple(y.shape))
        if self.feature is None or key != self.key or self.calls % self.interval == 0:
            out, self.feature = self.deep(x, timesteps, context, y)
            self.key, self.calls = key, 0
            self.full_calls += 1
        else:
            out = self.shallow(x, timesteps, context, self.feature, y)
            self.shallow_calls += 1
        self.calls += 1
        return out


LEVEL = "level"  # the branch after the whole highest-resolution level


def resolve_branch(unet: nn.Module, interval: int | None, branch: int | str) -> int:
    """``branch`` as an input-block index (``"level"``: the UNet's first level's last block: SD1.x, SD2.x and SDXL
    3, the built-in model 2); a ValueError naming the fault unless ``interval`` is None or a whole number >= 1 and
    ``branch`` one of the UNet's skip branches (its input blocks) or ``"level"``."""
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise ValueError(f"deepcache takes a whole number of steps >= 1, not {interval!r}")
    last = len(unet.input_blocks) - 1
    if branch == LEVEL:
        return min(unet.config.num_res_blocks + 1, last)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= last:
        raise ValueError(f"deepcache branch must be a whole number in [0, {last}] for this model or "
                         f"'{LEVEL}', not {branch!r}")
    return branch


@contextmanager
def deep_cache(unet: nn.Module, interval: int | None, branch: int | str = 0) -> Iterator[DeepCacheRunner | None]:
    """DeepCache on ``unet`` for the ``with`` block (``interval`` <= 1 or None: off)."""
    if not interval or interval <= 1:
        yield None
        return
    branch = resolve_branch(unet, interval, branch)
    previous = unet.__dict__.get("forward")
    parts = unet.__dict__.get("deepcache_parts")
    if parts is not None:
        deep, shallow = parts(branch)
    else:
        def deep(x, t, context, y):
            return unet.forward_deep(x, t, context, y, branch=branch)

        def shallow(x, t, context, feature, y):
            return unet.forward_shallow(x, t, context, feature, y, branch=branch)
    runner = DeepCacheRunner(unet.forward, deep, shallow, interval)
    unet.forward = runner
    try:
        yield runner
    finally:
        if previous is None:
            unet.__dict__.pop("forward", None)
        else:
            unet.forward = previous
