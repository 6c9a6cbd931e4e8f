"""``sd serve``: the AUTOMATIC1111 HTTP API (/sdapi/v1, OpenAPI at /docs) and the web UI at /.

The HTTP process only checks, queues and answers; models load and jobs run in the worker process
(server/worker.py), so ``progress`` and ``interrupt`` answer at once during any job. Safety: every bad request
is a 4xx in A1111's error shape {error, detail, body, errors}; the body size is capped; optional HTTP basic auth
(``--api-auth user:pass``) and bearer token; models are chosen only by listed names."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..outpainting import plan as outpaint_plan
from .controlnet import control_units, controlnet_router
from .executor import Job
from .extras import extras_router
from .generation import VERSION, build_request, check_limits, refiner_name, respond, settings_for
from .jobs import JobQueue, QueueFull
from .listings import listings_router
from .protocol import (
    ApiError,
    BodyLimit,
    ErrorBody,
    SafeJSONResponse,
    authorised,
    error_response,
    parse_users,
    redact,
)
from .registry import ModelEntry, ModelRegistry
from .schemas import Img2ImgRequest, Limits, Txt2ImgRequest, limited
from .scripts import plan_plot, run_plot
from .worker import WorkerError, WorkerProcess

STATIC = Path(__file__).parent / "static"
BROKER_THREADS = 64  # with a broker: requests in flight at once (each thread waits for its job's answer)
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 422, 500, 503)}


def caller(request: Request) -> str:
    """Who asks: the client's address and credentials (their progress, interrupt and skip, with a broker)."""
    return f"{request.client.host if request.client else ''}|{request.headers.get('authorization', '')}"


def create_app(registry: ModelRegistry, limits: Limits | None = None, max_queue: int = 16,
               outputs: str | Path | None = "outputs", api_auth: str | None = None, api_token: str | None = None,
               max_body: int = 50 * 2**20, max_prompt_chars: int = 20_000, listen: bool = False,
               broker: str | None = None) -> FastAPI:
    """The app, with its worker process started and the current model loaded (a ValueError if it cannot be).
    With ``broker`` (a Redis URL), jobs go to ``sd worker`` processes on that queue instead (server/broker.py),
    many at once."""
    limits = limits or Limits()
    outputs_dir = Path(outputs) if outputs else None
    users = parse_users(api_auth)
    folders = [f for f in (registry.models_dir, outputs_dir) if f is not None]
    if broker:
        from .broker import BrokerClient

        worker: Any = BrokerClient(broker, registry.models_dir)
        print(f"sd serve: waiting for a worker on {broker} to load the model", flush=True)
    else:
        worker = WorkerProcess(registry.options)
    try:
        model_info, _ = worker.run(Job("load", registry.current_entry.ref()))
    except WorkerError as error:
        worker.close()
        raise ValueError(f"cannot load {registry.current_entry.title}: {redact(error.detail, folders)}") from None
    jobs = JobQueue(max_queue, *worker.stop_signals(), concurrency=BROKER_THREADS if broker else 1,
                    backlog=worker.waiting)
    options: dict = {"sd_model_checkpoint": registry.current_entry.title, "sd_vae": "Automatic",
                     "CLIP_stop_at_last_layers": 1, "samples_save": True, "samples_format": "png",
                     "outdir_samples": str(outputs_dir or ""), "live_previews_enable": True, "eta_ddim": 0.0,
                     "s_min_uncond": 0.0, "s_min_uncond_all": False, "skip_early_cond": 0.0}
    state = {"model": model_info}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="stable_diffusion", version=VERSION, description=__doc__, lifespan=lifespan,
                  responses=ERRORS, default_response_class=SafeJSONResponse)
    app.state.jobs, app.state.registry, app.state.options, app.state.worker = jobs, registry, options, worker

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, redact(error.detail, folders), headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        headers = dict(error.headers or {})
        if error.status_code == 405:  # every method the path answers, not only the first route's
            allowed = sorted({m for route in app.routes if getattr(route, "path_regex", None)
                              and route.path_regex.match(request.url.path) for m in getattr(route, "methods", ())})
            headers["Allow"] = ", ".join(allowed)
        return error_response(error.status_code, str(error.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return error_response(422, problems, kind="RequestValidationError")

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if not authorised(request.headers.get("authorization"), users, api_token):
            return error_response(401, "unauthorised", headers={"WWW-Authenticate": 'Basic realm="sd"'})
        return await call_next(request)

    async def queued(run, steps: int, batches: int, name: str, owner: str = ""):
        try:
            future = jobs.submit(run, steps, batches, name, owner)
        except QueueFull as error:
            raise ApiError(503, str(error), {"Retry-After": "5"}) from None
        try:
            return await asyncio.wrap_future(future)
        except WorkerError as error:
            raise ApiError(error.status, error.detail) from None

    def chosen_vae(name: object) -> Path | None:
        try:
            return registry.vae(str(name))
        except KeyError as error:
            raise ApiError(422, str(error.args[0])) from None

    def find(title: str, status: int = 422) -> ModelEntry:
        try:
            return registry.find(title)
        except KeyError as error:
            raise ApiError(status, str(error.args[0])) from None

    async def generation(body: Txt2ImgRequest | Img2ImgRequest, kind: str, owner: str) -> dict:
        """txt2img and img2img: check, resolve, queue, run in the worker, answer."""
        check_limits(body, limits)
        for name, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
            if len(text) > max_prompt_chars:
                raise ApiError(422, f"{name}: {len(text)} characters, over this server's limit of {max_prompt_chars}")
        override = (body.override_settings or {}).get("sd_model_checkpoint")
        chosen = find(str(override)) if override else None  # this request's model (A1111's override_settings)
        try:
            styles = registry.styles()
        except ValueError as error:  # the server's styles file, not the request, is at fault
            raise ApiError(500, str(error)) from None
        controls = control_units(body, registry)  # sd-webui-controlnet's units in alwayson_scripts
        request = build_request(body, options, registry.models_dir, state["model"].native_size, styles, controls)

        vae = chosen_vae((body.override_settings or {}).get("sd_vae", options["sd_vae"]))
        refiner = None
        if refiner_name(body):  # A1111's refiner_checkpoint: a listed model
            try:
                refiner = registry.find(refiner_name(body)).ref()
            except KeyError as error:
                raise ApiError(422, f"refiner_checkpoint: {error.args[0]}") from None

        plotted = plan_plot(body, request, kind, registry, refiner, limits, state["model"].native_size, styles)

        def run(report):
            entry = chosen or registry.current_entry
            ref = entry.ref()
            ref.vae = vae
            if plotted is not None:  # A1111's X/Y/Z plot: its cells one after another, in this queue slot
                result = run_plot(*plotted, lambda job: worker.run(job, report), jobs.interrupted,
                                  request, ref)
                return entry, state["model"], result
            info, result = worker.run(Job("generate", ref, request, refiner=refiner), report)
            return entry, info, result

        cells = [p.cell.request for p in plotted[1]] if plotted else [request]
        batches = sum(r.n_iter for r in cells)
        if request.outpaint is not None:  # poor man's outpainting: one batch per border tile
            batches = len(outpaint_plan(request.init_image, request.outpaint, request.width, request.height)[1])
            if batches > limits.max_plot_cells:
                raise ApiError(422, f"poor man's outpainting: {batches} tiles, over this server's limit of "
                                    f"{limits.max_plot_cells}")
        entry, info, result = await queued(run, max(r.progress_steps() for r in cells), batches, kind, owner)
        maps = await asyncio.to_thread(lambda: [unit.control_map(request.width, request.height)  # as the extension
                                                for unit in request.controls])
        return respond(body, result, (entry.name, entry.sha), kind == "img2img" and info.inpainting, outputs_dir,
                       kind, vae.stem if vae else None, maps)

    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await generation(body, "txt2img", caller(request))

    async def img2img(body: Img2ImgRequest, request: Request):
        return await generation(body, "img2img", caller(request))

    # the bodies are classes built here with this server's limits, which a string annotation cannot name
    txt2img.__annotations__["body"], img2img.__annotations__["body"] = limited(Txt2ImgRequest, limits), \
        limited(Img2ImgRequest, limits)
    app.post("/sdapi/v1/txt2img")(txt2img)
    app.post("/sdapi/v1/img2img")(img2img)

    @app.get("/sdapi/v1/progress")
    async def progress(request: Request, skip_current_image: bool = False):
        return jobs.state(skip_current_image, caller(request))

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request):
        jobs.interrupt(caller(request))
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip(request: Request):
        jobs.skip(caller(request))
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            changes = json.loads(await request.body() or b"{}")
        except (ValueError, RecursionError):
            raise ApiError(422, "options: the body must be a JSON object") from None
        if not isinstance(changes, dict):
            raise ApiError(422, "options: the body must be a JSON object")
        checked = settings_for(options, changes)  # a bad value: 422, and nothing is stored
        if "sd_vae" in changes:
            chosen_vae(checked.sd_vae)
        if "sd_model_checkpoint" in changes:
            entry = find(str(changes["sd_model_checkpoint"]), 404)

            def load(report):
                info, _ = worker.run(Job("load", entry.ref()))
                registry.current_entry, state["model"] = entry, info

            await queued(load, 1, 1, "load model")
            checked.sd_model_checkpoint = entry.title
        options.update({k: getattr(checked, k, v) for k, v in changes.items()})
        return {}

    app.include_router(listings_router(registry, {"api": True, "listen": listen, "api_auth": None,
                                                  "max_prompt_chars": max_prompt_chars}, lambda: state["model"]))

    @app.post("/sdapi/v1/unload-checkpoint")
    async def unload_checkpoint():
        await queued(lambda report: worker.broadcast(Job("unload", None)), 1, 1, "unload model")
        return {}

    @app.post("/sdapi/v1/reload-checkpoint")
    async def reload_checkpoint():
        entry = registry.current_entry

        def load(report):
            state["model"] = worker.run(Job("load", entry.ref()))[0]

        await queued(load, 1, 1, "load model")
        return {}

    app.include_router(controlnet_router(registry, queued, worker.run))
    app.include_router(extras_router(registry, queued, worker.run, limits,
                                     lambda: bool(options.get("interrogate_return_ranks", False))))

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/ui/model", include_in_schema=False)
    async def ui_model():  # what the web UI needs beyond A1111's API: the model's native size
        return {"title": registry.current_entry.title, "native_size": state["model"].native_size}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return BodyLimit(app, max_body)  # type: ignore[return-value]
