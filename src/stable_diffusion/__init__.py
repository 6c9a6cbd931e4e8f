"""stable_diffusion: Stable Diffusion (SD1.x, SD2.x, SDXL) written from the papers in PyTorch."""

__version__ = "0.1.0"  # the one version: pyproject.toml, the server and the infotext read it from here

from .generate import GenerationResult, generate  # noqa: E402
from .pipeline import Pipeline, load_pipeline  # noqa: E402
from .request import GenerationRequest  # noqa: E402

__all__ = ["GenerationRequest", "GenerationResult", "Pipeline", "__version__", "generate", "load_pipeline"]
