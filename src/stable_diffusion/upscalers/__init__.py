"""Image upscalers as A1111 has them: Lanczos, Nearest, and ESRGAN-family model files (RRDBNet, Real-ESRGAN's
compact net) written here and loaded weights-only (see registry.py)."""

from .registry import Upscaler, find_upscalers, get_upscaler, resize_image, upscale

__all__ = ["Upscaler", "find_upscalers", "get_upscaler", "resize_image", "upscale"]
