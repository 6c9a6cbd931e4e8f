"""The read-only endpoints of /sdapi/v1: what models, samplers, schedules, LoRAs, embeddings and memory the
server has, png-info and cmd-flags, in A1111's shapes. Paths are given relative to the models folder."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import torch
from fastapi import APIRouter

from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedules import SCHEDULERS
from ..embeddings import embedding_info
from ..hires import LATENT_UPSCALE_MODES
from ..infotext import parse_infotext
from ..upscalers import find_upscalers
from .executor import ModelInfo
from .generation import decode_image
from .protocol import ApiError
from .registry import ModelRegistry
from .schemas import PngInfoRequest, PngInfoResponse
from .scripts import SCRIPTS, script_info


async def _nothing():
    return None


def listings_router(registry: ModelRegistry, flags: dict, model_info: Callable[[], ModelInfo]) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    shown = registry.shown

    @router.get("/sd-models")
    async def sd_models():
        return [{**e.listing(), "filename": shown(e.path)} for e in registry.entries]

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints():
        await asyncio.to_thread(registry.refresh)
        return {}

    @router.get("/samplers")
    async def samplers():
        return [{"name": name, "aliases": [f"k_{name.lower().replace(' ', '_').replace('+', 'p')}"], "options": {}}
                for name in SAMPLERS]

    @router.get("/schedulers")
    async def schedulers():
        rho = {"karras": 7.0, "polyexponential": 1.0}
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                 "need_inner_model": False}] + [
            {"name": name, "label": s.label, "aliases": ["SGMUniform"] if name == "sgm_uniform" else None,
             "default_rho": rho.get(name, -1.0), "need_inner_model": s.needs == "model"}
            for name, s in SCHEDULERS.items()]

    @router.get("/upscalers")
    async def upscalers():
        return [{**u.listing(), "model_path": shown(u.path) if u.path else None}
                for u in find_upscalers(registry.models_dir)]

    @router.get("/sd-vae")
    async def sd_vae():
        return [{"model_name": p.stem, "filename": shown(p)} for p in registry.files("VAE", {".safetensors", ".pt"})]

    @router.get("/loras")
    async def loras():
        return [{"name": p.stem, "alias": p.stem, "path": shown(p), "metadata": {}}
                for p in registry.files("Lora", {".safetensors", ".pt"})]

    @router.get("/embeddings")
    async def embeddings():
        """A1111's listing: those that fit the loaded model's text encoders, and those skipped."""
        widths = model_info().text_widths
        loaded, skipped = {}, {}
        for path in registry.files("embeddings", {".safetensors", ".pt", ".bin"}):
            try:
                info = await asyncio.to_thread(embedding_info, path)
            except ValueError:  # unreadable: skipped, as A1111 does
                skipped[path.stem] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                      "vectors": None}
                continue
            fits = all(w in info["widths"] for w in widths)
            (loaded if fits else skipped)[path.stem] = {k: v for k, v in info.items() if k != "widths"}
        return {"loaded": loaded, "skipped": skipped}

    @router.get("/prompt-styles")
    async def prompt_styles():
        try:
            styles = registry.styles()
        except ValueError as error:
            raise ApiError(500, str(error)) from None
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.values()]

    @router.get("/memory")
    async def memory():
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
        cuda = ({"system": {"free": torch.cuda.mem_get_info()[0], "total": torch.cuda.mem_get_info()[1]}}
                if torch.cuda.is_available() else {"error": "unavailable"})
        return {"ram": {"free": free, "used": total - free, "total": total}, "cuda": cuda}

    @router.get("/scripts")
    async def scripts():
        return SCRIPTS

    @router.get("/script-info")
    async def scripts_info():
        return script_info()  # the selectable scripts; always-on ones take only their defaults

    @router.get("/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @router.get("/face-restorers")
    async def face_restorers():
        return []  # none: restore_faces takes only its default

    @router.get("/hypernetworks")
    async def hypernetworks():
        return []  # hypernetworks are not implemented; <hypernet:...> is not read

    @router.get("/extensions")
    async def extensions():
        return []

    @router.get("/sd-modules")
    async def sd_modules():
        return [{"model_name": p.stem, "filename": shown(p)} for p in registry.files("VAE", {".safetensors", ".pt"})]

    for name in ("refresh-loras", "refresh-vae", "refresh-embeddings"):  # listed from disk on every call already
        router.add_api_route(f"/{name}", _nothing, methods=["POST"], name=name.replace("-", "_"))

    @router.get("/cmd-flags")
    async def cmd_flags():
        return flags

    @router.post("/png-info", response_model=PngInfoResponse)
    async def png_info(body: PngInfoRequest):
        if not body.image.strip():  # A1111 answers an empty image with an empty info
            return PngInfoResponse()
        image = decode_image(body.image, "image")
        text = image.info.get("parameters")
        items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str | int | float)}
        return PngInfoResponse(info=text or "", items=items, parameters=parse_infotext(text) if text else {})

    return router
