"""Fixtures shared by the test files: tiny random-weight pipelines of each family, the built-in model,  and an
A1111-style models folder. Plain helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from stable_diffusion import Pipeline, load_pipeline
from stable_diffusion.models.configs import preset


@pytest.fixture(scope="session")
def sd1() -> Pipeline:
    """tiny-sd1 with its seed-0 random weights (read-only: tests that change weights build their own)."""
    return load_pipeline("tiny-sd1")


@pytest.fixture(scope="session")
def builtin() -> Pipeline:
    """The shipped built-in model."""
    return load_pipeline()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An A1111 models folder with two tiny-sd1 checkpoints of different weights: tiny and other."""
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    Pipeline.from_config(preset("tiny-sd1"), seed=0).save(root / "Stable-diffusion" / "tiny.safetensors")
    Pipeline.from_config(preset("tiny-sd1"), seed=1).save(root / "Stable-diffusion" / "other.safetensors")
    return root
