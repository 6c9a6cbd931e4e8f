"""The procedural shapes domain the built-in model lives in: scenes, their renderer and captions (``scenes``),
the adherence checker that reads a scene back from an image (``adherence``), the domain CLIP that scores and
featurises its images (``DOMAIN_CLIP``, trained by configs/domain_clip.toml), and ``sd eval`` (``evaluate``)."""

from pathlib import Path

DOMAIN_CLIP = Path(__file__).resolve().parents[1] / "assets" / "domain_clip"
