"""A fingerprint of a module's weights that a compiled backend keys its cache on, recomputed only when a weight
changes: each tensor's in-place version counter and identity are checked on every call (microseconds); the
fingerprint itself hashes every tensor's name, shape, dtype, float64 sum and sum of squares, and 256 values
sampled along its elements, so a LoRA merged into the weights, a fine-tune or another checkpoint gives another one
without hashing gigabytes of bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SAMPLES = 256


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES)
    sample = flat[::step][:SAMPLES].double()
    whole = flat.double()
    head = f"{name}|{tuple(t.shape)}|{t.dtype}|{whole.sum().item():.17g}|{whole.square().sum().item():.17g}|"
    return head.encode() + sample.numpy().tobytes()


def weights_fingerprint(module: nn.Module, release: Callable[[torch.Tensor], Any] | None = None) -> str:
    """20 hex digits naming the weights (parameters and buffers) of ``module``; ``release(tensor)`` after each is
    read (a memory-mapped model's pages then come and go one tensor at a time instead of all becoming resident)."""
    h = hashlib.blake2b(digest_size=10)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            h.update(tensor_digest(name, t))
            if release is not None:
                release(t)
    return h.hexdigest()


class WeightsWatch:
    """``fingerprint()`` of ``module``, cached until one of its tensors is modified in place or replaced."""

    def __init__(self, module: nn.Module, release: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.module, self.release = module, release
        self._state: tuple | None = None
        self._fingerprint = ""

    def _current_state(self) -> tuple:
        return tuple((id(t), t._version) for t in self.module.state_dict(keep_vars=True).values())

    def fingerprint(self) -> str:
        state = self._current_state()
        if state != self._state:
            self._fingerprint, self._state = weights_fingerprint(self.module, self.release), state
        return self._fingerprint
