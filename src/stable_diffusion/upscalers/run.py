"""Running an upscaler as A1111 does (modules/upscaler.py, modules/images.py): ``upscale`` applies the upscaler
until the image is at least ``scale`` times larger (at most 3 passes; a 4x net run once for 2x), then Lanczos-
resizes to the size rounded down to 8; ``resize_image`` is A1111's "just resize" with an upscaler, the step hires
fix and img2img use. Nets run in overlapping tiles so that big images fit in memory."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


@torch.inference_mode()
def run_tiled(net: nn.Module, pixels: torch.Tensor, tile: int = 192, overlap: int = 16) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> the net's output, computed ``tile`` pixels at a time, each tile run with
    ``overlap`` pixels of context on every side that are cut from its output (the net sees its neighbours, so
    seams stay below visibility); tile 0 runs the whole image at once."""
    multiple = getattr(net, "multiple", 1)
    h, w = pixels.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple  # pixel-unshuffling nets need whole blocks
    if pad_h or pad_w:
        pixels = torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h), mode="reflect")
    scale = net.scale
    if tile <= 0 or max(pixels.shape[-2:]) <= tile:
        out = net(pixels)
    else:
        tile = max(multiple, tile // multiple * multiple)
        overlap = overlap // multiple * multiple
        H, W = pixels.shape[-2:]
        out = pixels.new_zeros(pixels.shape[0], pixels.shape[1], int(H * scale), int(W * scale))
        for y in range(0, H, tile):
            for x in range(0, W, tile):
                y0, x0 = max(y - overlap, 0), max(x - overlap, 0)
                y1, x1 = min(y + tile + overlap, H), min(x + tile + overlap, W)
                part = net(pixels[..., y0:y1, x0:x1])
                ty, tx = int((y - y0) * scale), int((x - x0) * scale)
                th, tw = int((min(y + tile, H) - y) * scale), int((min(x + tile, W) - x) * scale)
                out[..., int(y * scale):int(y * scale) + th, int(x * scale):int(x * scale) + tw] = \
                    part[..., ty:ty + th, tx:tx + tw]
    return out[..., :int(h * scale), :int(w * scale)]


def run_net(net: nn.Module, image: Image.Image, tile: int = 192) -> Image.Image:
    """One pass of an upscaler net over an RGB image."""
    param = next(net.parameters())
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(param.device, param.dtype)
    out = run_tiled(net, pixels, tile).float().clamp(0, 1)
    return Image.fromarray((out[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
