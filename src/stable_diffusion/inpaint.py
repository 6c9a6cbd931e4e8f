"""Inpainting: blended latent diffusion for any model (Avrahami et al. 2023: the known region is re-imposed
on every x0 prediction) and the 9-channel inpainting UNets (mask + masked-image latent concatenated to the
input). Outside the mask the final image keeps the original pixels. The mask and its options are fields of the
GenerationRequest (A1111's names: mask_blur, inpainting_fill, inpainting_mask_invert, inpaint_full_res)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    from .request import GenerationRequest

FILL_MODES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def check_mask(mask: Image.Image, image: Image.Image, fill: int) -> None:
    """The one check of an inpainting request: the mask is the image's size and the fill mode exists."""
    if mask.size != image.size:
        raise ValueError(f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")
    if fill not in FILL_MODES:
        raise ValueError(f"inpainting_fill must be one of {sorted(FILL_MODES)} ({', '.join(FILL_MODES.values())})")


def effective_mask(request: GenerationRequest) -> Image.Image:
    """The request's mask as 8-bit grey, white = repaint (inverted first with ``inpainting_mask_invert``)."""
    mask = request.mask.convert("L")
    return Image.eval(mask, lambda v: 255 - v) if request.inpainting_mask_invert else mask


def pixel_mask(request: GenerationRequest, width: int, height: int) -> torch.Tensor:
    """(1, 1, H, W) in [0, 1], 1 where the image is repainted; blurred by ``mask_blur`` pixels."""
    mask = effective_mask(request)
    if request.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    mask = mask.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def fill_masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill mode 0: the repainted region starts as the mean colour of the kept region."""
    keep = 1 - mask
    mean = (pixels * keep).sum(dim=(2, 3), keepdim=True) / keep.sum().clamp(min=1)
    return pixels * keep + mean * mask


def start_latent(init_latent: torch.Tensor, latent_mask: torch.Tensor, fill: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill modes 2 (latent noise) and 3 (latent nothing) replace the masked part of the starting latent."""
    if fill == 2:
        noise = torch.randn(init_latent.shape, generator=generator).to(init_latent)
        return init_latent * (1 - latent_mask) + noise * latent_mask
    if fill == 3:
        return init_latent * (1 - latent_mask)
    return init_latent


class BlendedDenoiser(torch.nn.Module):
    """Re-imposes the known latent outside the mask on every x0 prediction."""

    def __init__(self, model: torch.nn.Module, init_latent: torch.Tensor, latent_mask: torch.Tensor) -> None:
        super().__init__()
        self.model, self.init_latent, self.latent_mask = model, init_latent, latent_mask

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **options: object) -> torch.Tensor:
        out = self.model(x, sigma, **options)
        if isinstance(out, tuple):  # CFG++: (guided, unconditional), both kept to the known region
            return tuple(self.init_latent * (1 - self.latent_mask) + o * self.latent_mask for o in out)
        return self.init_latent * (1 - self.latent_mask) + out * self.latent_mask


class ConcatUNet(torch.nn.Module):
    """A 9-channel inpainting UNet seen as a 4-channel one: [x, mask, masked-image latent] along channels."""

    def __init__(self, unet: torch.nn.Module, concat: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.concat = unet, concat

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        concat = self.concat.repeat(x.shape[0] // self.concat.shape[0], 1, 1, 1).to(x)
        return self.unet(torch.cat([x, concat], dim=1), t, context, y)


def latent_size(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask, size=shape, mode="bilinear", align_corners=False)


def composite(original: Image.Image, generated: Image.Image, mask: torch.Tensor) -> Image.Image:
    """Original pixels where the (blurred) mask is 0, generated ones where it is 1, a blend between."""
    m = mask[0, 0].numpy()[..., None]
    out = np.asarray(original.convert("RGB").resize(generated.size), np.float32) * (1 - m) + \
        np.asarray(generated, np.float32) * m
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def only_masked_crop(request: GenerationRequest, native_size: int) -> tuple[GenerationRequest, tuple[int, int, int, int]]:
    """A1111's "inpaint at full resolution": the request for a crop around the mask (plus padding), resized to
    width x height (the native size when unset), and the crop's box in the original image."""
    check_mask(request.mask, request.init_image, request.inpainting_fill)
    size = (request.width or native_size, request.height or native_size)
    box = crop_box(effective_mask(request), request.inpaint_full_res_padding, *size)
    return replace(request, init_image=request.init_image.crop(box).resize(size, Image.LANCZOS),
                   mask=request.mask.crop(box).resize(size, Image.LANCZOS), inpaint_full_res=False,
                   width=size[0], height=size[1]), box


def paste_back(request: GenerationRequest, images: list[Image.Image], box: tuple[int, int, int, int]) -> list[Image.Image]:
    """Each crop's result scaled back into its box of the original image, blended in through the whole mask."""
    init = request.init_image
    full_mask = pixel_mask(request, init.width, init.height)
    pasted = []
    for image in images:
        canvas = init.convert("RGB").copy()
        canvas.paste(image.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
        pasted.append(composite(init, canvas, full_mask))
    return pasted


def crop_box(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The mask's bounding box grown by ``padding`` and then to the aspect ratio width:height, kept inside
    the image (A1111's crop for "only masked")."""
    box = mask.getbbox()
    if box is None:
        raise ValueError("the mask is empty: nothing to inpaint")
    x1, y1, x2, y2 = box
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, mask.width), min(y2 + padding, mask.height)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) < ratio:  # too tall: widen
        grow = round((y2 - y1) * ratio) - (x2 - x1)
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:  # too wide: heighten
        grow = round((x2 - x1) / ratio) - (y2 - y1)
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    # shift back inside the image, then clip
    for lo, hi, size in ((0, 2, mask.width), (1, 3, mask.height)):
        b = [x1, y1, x2, y2]
        if b[lo] < 0:
            b[hi], b[lo] = b[hi] - b[lo], 0
        if b[hi] > size:
            b[lo], b[hi] = max(b[lo] - (b[hi] - size), 0), size
        x1, y1, x2, y2 = b
    return x1, y1, x2, y2
