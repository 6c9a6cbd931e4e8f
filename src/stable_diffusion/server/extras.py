"""A1111's Extras endpoints: POST /extra-single-image and /extra-batch-images (upscaler 1, upscaler 2 blended
at its visibility, by a factor or to a size), run in the worker process like every computation; GET
/realesrgan-models; POST /interrogate (CLIP interrogation, metrics/interrogate.py, with ``sd serve --clip``). The
upscalers themselves: upscalers/."""

from __future__ import annotations

import base64
import html
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter

from ..images import png_bytes
from ..upscalers import find_upscalers
from ..upscalers.extras import ExtrasUpscale
from .executor import Job
from .generation import decode_image
from .protocol import ApiError
from .registry import ModelRegistry
from .schemas import ExtrasBatchImagesRequest, ExtrasFields, ExtrasSingleImageRequest, InterrogateRequest, Limits

Queued = Callable[..., Awaitable[Any]]


def _spec(body: ExtrasFields, registry: ModelRegistry) -> ExtrasUpscale:
    spec = ExtrasUpscale(body.resize_mode, body.upscaling_resize, body.upscaling_resize_w, body.upscaling_resize_h,
                         body.upscaling_crop, body.upscaler_1 or "None", body.upscaler_2 or "None",
                         body.extras_upscaler_2_visibility)
    try:
        spec.check(registry.models_dir)
    except ValueError as error:
        raise ApiError(422, str(error)) from None
    return spec


def _html_info(info: dict[str, Any]) -> str:
    """A1111's html_info: the parameters as one escaped paragraph."""
    return f"<p>{html.escape(', '.join(f'{k}: {v}' for k, v in info.items()))}</p>"


def extras_router(registry: ModelRegistry, queued: Queued, run_job: Callable[[Job], Any],
                  limits: Limits, return_ranks: Callable[[], bool] = lambda: False) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    async def upscale_all(body: ExtrasFields, images: list) -> list[tuple]:
        spec = _spec(body, registry)
        for image in images:
            w, h = spec.output_size(image)
            if max(w, h) > limits.max_upscaled:
                raise ApiError(422, f"the upscaled image would be {w}x{h}, over this server's limit of "
                                    f"{limits.max_upscaled} pixels a side")
        job = Job("extras", None, extra={"upscale": spec, "images": images, "models_dir": registry.models_dir})
        return await queued(lambda report: run_job(job)[1], 1, len(images), "extras")

    @router.post("/extra-single-image")
    async def extra_single_image(body: ExtrasSingleImageRequest):
        if not body.image:
            raise ApiError(404, "Image not found")  # A1111's answer
        [(image, info)] = await upscale_all(body, [decode_image(body.image, "image")])
        return {"html_info": _html_info(info), "image": base64.b64encode(png_bytes(image)).decode()}

    @router.post("/extra-batch-images")
    async def extra_batch_images(body: ExtrasBatchImagesRequest):
        images = [decode_image(item.data, f"imageList[{i}]") for i, item in enumerate(body.imageList)]
        done = await upscale_all(body, images) if images else []
        return {"html_info": _html_info(done[0][1]) if done else "",
                "images": [base64.b64encode(png_bytes(image)).decode() for image, _ in done]}

    @router.post("/interrogate")
    async def interrogate(body: InterrogateRequest):
        if body.model != "clip":
            raise ApiError(422, f"interrogate: model {body.model!r} is not available; this server has \"clip\"")
        if registry.clip is None:
            raise ApiError(422, "interrogate: no CLIP model on this server (start it with sd serve --clip FOLDER, a "
                                "CLIP model in transformers' layout); png-info reads the prompt of images made here")
        categories = registry.folder("interrogate")
        if categories is None or not any(categories.glob("*.txt")):
            raise ApiError(422, "interrogate: no term lists in the models folder's interrogate/ (A1111's *.txt)")
        if not body.image:
            raise ApiError(404, "Image not found")  # A1111's answer
        image = decode_image(body.image, "image")
        job = Job("interrogate", None, extra={"image": image, "clip": registry.clip, "ranks": return_ranks(),
                                              "categories": categories})
        return {"caption": await queued(lambda report: run_job(job)[1], 1, 1, "interrogate")}

    @router.get("/realesrgan-models")
    async def realesrgan_models():
        return [{"name": u.name, "path": registry.shown(u.path), "scale": int(u.scale)}
                for u in find_upscalers(registry.models_dir) if u.kind == "RealESRGAN"]

    return router
