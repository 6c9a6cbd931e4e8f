"""stable_diffusion: Stable Diffusion (SD1.x, SD2.x, SDXL) written from the papers in PyTorch."""

from .pipeline import Pipeline, load_pipeline

__all__ = ["Pipeline", "load_pipeline"]
__version__ = "0.1.0"
