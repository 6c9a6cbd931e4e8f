"""Plain helpers shared by the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

from stable_diffusion.training.config import TrainConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


def pixels(image: Image.Image) -> np.ndarray:
    """An image's pixels as a signed integer array (H, W, C), so differences do not wrap around."""
    return np.asarray(image).astype(int)


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (capped at 100 for equal images)."""
    mse = ((pixels(a) - pixels(b)) ** 2).mean()
    return float(10 * np.log10(255**2 / max(mse, 10 ** -(100 / 10) * 255**2)))


def smoke_config(folder: Path, **train_overrides: object) -> TrainConfig:
    """configs/smoke.toml (a seconds-long run of every stage) writing to ``folder/run``, with ``[train]`` keys
    overridden by the keywords."""
    data = tomllib.loads(SMOKE.read_text())
    data["train"].update(save_path=str(folder / "run"), **train_overrides)
    return parse_config(data)
