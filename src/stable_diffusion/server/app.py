"""``sd serve``: the AUTOMATIC1111 HTTP API (/sdapi/v1, OpenAPI at /docs) and the web UI at /.

Safety: every bad request is a 4xx in A1111's error shape {error, detail, body, errors}; the body size is capped;
optional HTTP basic auth (``--api-auth user:pass``) and bearer token; models are chosen only by listed names."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import secrets
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedules import SCHEDULERS
from ..generate import decode_latents
from ..infotext import parse_infotext
from .generation import (
    VERSION,
    ApiError,
    build_request,
    check_limits,
    decode_image,
    guidance_skip,
    respond,
    run_generation,
)
from .jobs import JobQueue, QueueFull
from .registry import ModelRegistry
from .schemas import Img2ImgRequest, Limits, PngInfoRequest, Txt2ImgRequest

STATIC = Path(__file__).parent / "static"


def _error(status: int, detail: str, body: str = "", kind: str = "HTTPException",
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail, "body": body, "errors": detail}, status, headers=headers)


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read into memory."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


def _authorised(header: str | None, users: dict[str, str], token: str | None) -> bool:
    if not users and not token:
        return True
    if not header:
        return False
    kind, _, value = header.partition(" ")
    if kind.lower() == "bearer" and token:
        return secrets.compare_digest(value.strip(), token)
    if kind.lower() == "basic" and users:
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user in users and secrets.compare_digest(password, users[user])
    return False


def create_app(registry: ModelRegistry, limits: Limits | None = None, max_queue: int = 16,
               outputs: str | Path | None = "outputs", api_auth: str | None = None, api_token: str | None = None,
               max_body: int = 50 * 2**20) -> FastAPI:
    limits = limits or Limits()
    outputs_dir = Path(outputs) if outputs else None
    users = dict(pair.split(":", 1) for pair in api_auth.split(",")) if api_auth else {}

    jobs = JobQueue(max_queue, decode_preview=lambda z: decode_latents(registry.pipe, z))
    options: dict = {"sd_model_checkpoint": registry.current_entry.title, "sd_vae": "Automatic",
                     "CLIP_stop_at_last_layers": 1, "samples_save": True, "samples_format": "png",
                     "outdir_samples": str(outputs_dir or ""), "live_previews_enable": True, "eta_ddim": 0.0,
                     "s_min_uncond": 0.0, "s_min_uncond_all": False, "skip_early_cond": 0.0}
    app = FastAPI(title="stable_diffusion", version=VERSION, description=__doc__)
    app.state.jobs, app.state.registry, app.state.options = jobs, registry, options

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error.status, error.detail, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return _error(422, problems, kind="RequestValidationError")

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if not _authorised(request.headers.get("authorization"), users, api_token):
            return _error(401, "unauthorised", headers={"WWW-Authenticate": 'Basic realm="sd"'})
        return await call_next(request)

    async def queued(run, steps: int, batches: int, name: str):
        try:
            future = jobs.submit(run, steps, batches, name)
        except QueueFull as error:
            raise ApiError(503, str(error), {"Retry-After": "5"}) from None
        return await asyncio.wrap_future(future)

    async def generation(body: Txt2ImgRequest | Img2ImgRequest, kind: str) -> dict:
        """txt2img and img2img: check, resolve, queue, run on the worker, answer."""
        check_limits(body, limits)
        request = build_request(body, options, registry.folder("Lora"), registry.folder("embeddings"),
                                registry.pipe.config.image_size)

        def run(callback):
            entry, pipe = registry.current_entry, registry.pipe
            return entry, pipe, run_generation(pipe, request, callback)

        entry, pipe, result = await queued(run, request.sampling_steps(), request.n_iter, kind)
        inpainting = kind == "img2img" and pipe.config.is_inpainting
        return respond(body, result, (entry.name, entry.sha), inpainting, outputs_dir, kind)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest):
        return await generation(body, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest):
        return await generation(body, "img2img")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return jobs.state(skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        jobs.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        jobs.skip()
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            changes = json.loads(await request.body() or b"{}")
        except ValueError:
            raise ApiError(422, "options: the body must be a JSON object") from None
        if not isinstance(changes, dict):
            raise ApiError(422, "options: the body must be a JSON object")
        guidance_skip({**options, **changes})
        if "sd_model_checkpoint" in changes:
            try:
                entry = registry.find(str(changes["sd_model_checkpoint"]))
            except KeyError as error:
                raise ApiError(404, str(error.args[0])) from None
            await queued(lambda _: registry.select(entry.title), 1, 1, "load model")
            changes["sd_model_checkpoint"] = entry.title
        options.update(changes)
        return {}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [e.listing() for e in registry.entries]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await asyncio.to_thread(registry.refresh)
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": name, "aliases": [f"k_{name.lower().replace(' ', '_').replace('+', 'p')}"], "options": {}}
                for name in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        names = ["automatic", *SCHEDULERS]
        return [{"name": n, "label": n.replace("_", " ").title(), "aliases": None,
                 "default_rho": 7.0 if n == "karras" else -1.0, "need_inner_model": False} for n in names]

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
                for n in ("None", "Lanczos", "Nearest")]

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return [{"model_name": p.stem, "filename": str(p)} for p in registry.files("VAE", {".safetensors", ".pt"})]

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
                for p in registry.files("Lora", {".safetensors", ".pt"})]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        files = registry.files("embeddings", {".safetensors", ".pt", ".bin"})
        return {"loaded": {p.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                    "vectors": None} for p in files}, "skipped": {}}

    @app.get("/sdapi/v1/memory")
    async def memory():
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
        cuda = ({"system": {"free": torch.cuda.mem_get_info()[0], "total": torch.cuda.mem_get_info()[1]}}
                if torch.cuda.is_available() else {"error": "no CUDA device"})
        return {"ram": {"free": free, "used": total - free, "total": total}, "cuda": cuda}

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        return {"api": True, "listen": False, "api_auth": None}

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: PngInfoRequest):
        text = decode_image(body.image, "image").info.get("parameters")
        return {"info": text or "", "items": {"parameters": text} if text else {},
                "parameters": parse_infotext(text) if text else {}}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/ui/model", include_in_schema=False)
    async def ui_model():  # what the web UI needs beyond A1111's API: the model's native size
        return {"title": registry.current_entry.title, "native_size": registry.pipe.config.image_size}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return BodyLimit(app, max_body)  # type: ignore[return-value]
