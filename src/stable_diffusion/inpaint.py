"""img2img's resize modes (A1111's resize_image) and inpainting: blended latent diffusion for any model
(Avrahami et al. 2023: the known region is re-imposed on every x0 prediction) and the 9-channel inpainting UNets
(mask + masked-image latent concatenated to the input). Outside the mask the final image keeps the original
pixels. The mask and its options are fields of the GenerationRequest (A1111's names: mask_blur,
inpainting_fill, inpainting_mask_invert, inpaint_full_res)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

if TYPE_CHECKING:
    from .request import GenerationRequest

FILL_MODES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}


def fit_image(image: Image.Image, width: int, height: int, mode: int = 0) -> Image.Image:
    """A1111's resize_image (Lanczos): 0 stretch to width x height; 1 scale to cover it and crop the centre;
    2 scale to fit inside it and fill the two empty bands with the image's edge row or column stretched across
    them (any other mode: as 2, as A1111's function does)."""
    if image.size == (width, height):
        return image
    if mode == 0:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == 1
    wide = ratio > src_ratio if cover else ratio < src_ratio  # the side that matches the target exactly
    src_w = width if wide else image.width * height // image.height
    src_h = height if not wide else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if cover:
        return out
    if ratio < src_ratio:  # bands above and below: the top and bottom rows stretched
        band = height // 2 - src_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            out.paste(resized.resize((width, band), box=(0, src_h, width, src_h)), (0, band + src_h))
    elif ratio > src_ratio:  # bands left and right: the first and last columns stretched
        band = width // 2 - src_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(resized.resize((band, height), box=(src_w, 0, src_w, height)), (band + src_w, 0))
    return out


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
    # A1111 fits the mask as the image (a latent-space resize, mode 3, fits it as mode 2 does)
    return mask_tensor(fit_image(mask, width, height, request.resize_mode))


def latent_side_mask(request: GenerationRequest, width: int, height: int) -> torch.Tensor:
    """The mask the latent blending and fill mode 0 use: A1111's latent_mask when the request has one (as it is,
    unblurred), else the blurred pixel mask."""
    if request.latent_mask is None:
        return pixel_mask(request, width, height)
    return mask_tensor(fit_image(request.latent_mask.convert("L"), width, height, request.resize_mode))


def blur_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Fill mode 0 as A1111's masking.fill: the masked part painted with the kept pixels blurred outward, from a
    256-pixel blur down to none, each layer composited over the last (premultiplied alpha, so only kept pixels
    spread)."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """An 8-bit mask -> (1, 1, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]


def mask_image(mask: torch.Tensor) -> Image.Image:
    """(1, 1, H, W) in [0, 1] -> an 8-bit mask."""
    return Image.fromarray((mask[0, 0].numpy() * 255).round().clip(0, 255).astype(np.uint8), "L")


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
                y: torch.Tensor | None = None, **options: object) -> torch.Tensor:
        concat = self.concat.repeat(x.shape[0] // self.concat.shape[0], 1, 1, 1).to(x)
        return self.unet(torch.cat([x, concat], dim=1), t, context, y, **options)


def latent_size(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A binary pixel mask at the latent's size, nearest-neighbour (the 9-channel UNet's mask input, as A1111 and
    diffusers make it)."""
    return F.interpolate(mask, size=shape, mode="nearest")


def latent_blend_mask(mask: torch.Tensor, shape: tuple[int, int], round_mask: bool = True) -> torch.Tensor:
    """A1111's latent mask for the blending: the 8-bit pixel mask resized to the latent's size (bicubic, as PIL
    resizes), rounded to 0 and 1 unless ``mask_round`` is off (soft blending)."""
    small = mask_tensor(mask_image(mask).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return small.round() if round_mask else small


def composite(original: Image.Image, generated: Image.Image, mask: torch.Tensor) -> Image.Image:
    """Original pixels where the (blurred) mask is 0, generated ones where it is 1, a blend between."""
    m = mask[0, 0].numpy()[..., None]
    out = np.asarray(original.convert("RGB").resize(generated.size), np.float32) * (1 - m) + \
        np.asarray(generated, np.float32) * m
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def only_masked_crop(request: GenerationRequest, native_size: int) -> tuple[GenerationRequest, tuple[int, int, int, int]]:
    """A1111's "inpaint at full resolution": the request for a crop around the mask (plus padding), resized to
    width x height (the native size when unset), and the crop's box in the original image."""
    for image in request.inits:
        check_mask(request.mask, image, request.inpainting_fill)
    size = (request.width or native_size, request.height or native_size)
    box = crop_box(effective_mask(request), request.inpaint_full_res_padding, *size)
    crops = [image.crop(box).resize(size, Image.LANCZOS) for image in request.inits]
    return replace(request, init_image=crops[0], init_images=crops if request.init_images else [],
                   mask=request.mask.crop(box).resize(size, Image.LANCZOS), inpaint_full_res=False,
                   width=size[0], height=size[1]), box


def paste_back(request: GenerationRequest, images: list[Image.Image], box: tuple[int, int, int, int]) -> list[Image.Image]:
    """Each crop's result scaled back into its box of its original image, blended in through the whole mask."""
    full_mask = pixel_mask(request, request.init_of(0).width, request.init_of(0).height)
    pasted = []
    for k, image in enumerate(images):
        init = request.init_of(k)
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
