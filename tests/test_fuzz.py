"""Fuzzing the HTTP API (bounded, derandomized): in-process with hypothesis, every operation of the OpenAPI schema
gets bodies and query strings of NaN, infinities, huge and negative numbers, wrong types, unicode (lone
surrogates too) and deep nesting, and no answer is a 5xx, and every error has A1111's body; then schemathesis
runs against a live `sd serve` over its own schema, with zero server errors and zero schema violations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stable_diffusion.server.app import create_app
from stable_diffusion.server.registry import ModelRegistry
from stable_diffusion.server.schemas import Limits

from .live_server import live_server, tiny_models

ERROR_KEYS = {"error", "detail", "body", "errors"}
SMALL = Limits(max_width=64, max_height=64, max_steps=2, max_images=2, max_batch_size=2)
text = st.one_of(st.text(max_size=30), st.sampled_from(["\ud800", "a\udfffb", "BREAK " * 50, "(" * 200, "[" * 200,
                                                         "\x00", "é" * 40, "<lora:" + "x" * 300 + ">",
                                                         "openpose", "lineart_realistic", "canny"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), text,
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1, 0, 1, 7, 64, 10**9]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=6)


@pytest.fixture(scope="module")
def fuzz_client(models_dir, tmp_path_factory):
    app = create_app(ModelRegistry(models_dir, default="tiny"), SMALL, outputs=tmp_path_factory.mktemp("out"))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _operations(client: TestClient) -> list[tuple[str, str, list[str], list[str]]]:
    """(method, path, body field names, query parameter names) of every operation in the schema."""
    schema = client.get("/openapi.json").json()
    components = schema.get("components", {}).get("schemas", {})
    operations = []
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" in body:
                body = components[body["$ref"].split("/")[-1]]
            query = [p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"]
            operations.append((method.upper(), path, sorted(body.get("properties", {})), query))
    return operations


def test_every_operation_survives_hostile_input(fuzz_client):
    operations = _operations(fuzz_client)
    assert len(operations) >= 18  # every endpoint of the A1111 dialect we serve

    @settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(operations), st.data())
    def check(operation, data):
        method, path, fields, query = operation
        body = data.draw(st.dictionaries(st.sampled_from(fields) | text, values, max_size=6)) if fields \
            else data.draw(st.one_of(st.none(), values))
        params = {name: str(data.draw(scalars)).encode("utf-8", "replace").decode()  # a URL holds no surrogate
                  for name in query if data.draw(st.booleans())}
        content = json.dumps(body, allow_nan=True).encode("utf-8", errors="surrogatepass") if body is not None else b""
        r = fuzz_client.request(method, path, content=content, params=params,
                                headers={"content-type": "application/json"})
        assert r.status_code < 500, (method, path, body, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()) == ERROR_KEYS, (method, path, r.text[:300])

    check()


def _survives(client: TestClient, path: str, body: dict) -> None:
    """A hostile JSON body (NaN, lone surrogates kept) gets no 5xx, and any error has A1111's body."""
    r = client.post(path, content=json.dumps(body, allow_nan=True).encode("utf-8", errors="surrogatepass"),
                    headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()) == ERROR_KEYS, r.text[:300]


def test_xyz_plot_script_args_and_refiner_survive_hostile_input(fuzz_client):
    """The X/Y/Z plot's positional script_args (axis types, value texts with ranges, flags) and refiner fields."""
    axis = st.one_of(st.integers(-3, 50), st.sampled_from(["Steps", "Seed", "Size", "Prompt S/R", "nope"]), scalars)
    texts = st.one_of(text, st.sampled_from(["1-2", "1-3 (+1)", "1-2 [2]", "0.5-1 (+0.5)", "64x64", "a,b",
                                             "1-99999", "9" * 30, "-1", "2-1 (+0)"]), scalars)

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        args = [item for _ in range(3) for item in (data.draw(axis), data.draw(texts), data.draw(values))]
        args += data.draw(st.lists(scalars, min_size=0, max_size=10))
        body = {"prompt": "a b", "steps": 1, "width": 64, "height": 64, "script_name": "x/y/z plot",
                "script_args": args, "refiner_checkpoint": data.draw(st.one_of(st.none(), text)),
                "refiner_switch_at": data.draw(scalars)}
        _survives(fuzz_client, "/sdapi/v1/txt2img", body)

    check()


def test_outpainting_script_and_latent_mask_survive_hostile_input(fuzz_client):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, "PNG")
    png = base64.b64encode(buffer.getvalue()).decode()

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(scalars, st.lists(st.sampled_from(["left", "up", "x"]), max_size=3)), max_size=5),
           st.one_of(st.none(), st.just(png), text), st.booleans())
    def check(args, latent_mask, with_mask):
        body = {"prompt": "a", "steps": 1, "width": 64, "height": 64, "init_images": [png],
                "script_name": "poor man's outpainting" if not with_mask else "", "script_args": args,
                "latent_mask": latent_mask, "mask": png if with_mask else None}
        if with_mask:
            body["script_args"] = []
        _survives(fuzz_client, "/sdapi/v1/img2img", body)

    check()


def test_controlnet_units_survive_hostile_input(fuzz_client):
    keys = st.sampled_from(["image", "module", "model", "weight", "resize_mode", "control_mode", "guidance_start",
                            "guidance_end", "processor_res", "threshold_a", "threshold_b", "pixel_perfect",
                            "hr_option", "enabled", "mask"])

    @settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(values, st.dictionaries(keys, values, max_size=8)), max_size=3),
           st.sampled_from(["controlnet", "ControlNet"]))
    def check(units, key):
        body = {"prompt": "a", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {key: {"args": units}}}
        _survives(fuzz_client, "/sdapi/v1/txt2img", body)

    check()


def test_deeply_nested_and_malformed_bodies_are_4xx(fuzz_client):
    nested = b"[" * 100_000 + b"]" * 100_000
    for path in ("/sdapi/v1/options", "/sdapi/v1/txt2img", "/sdapi/v1/png-info"):
        nan = (b'{"prompt": NaN}',) if path != "/sdapi/v1/png-info" else ()  # png-info ignores other keys, as A1111
        for content in (nested, b"{", b"\xff\xfe", b"null", *nan):
            r = fuzz_client.post(path, content=content, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and set(r.json()) == ERROR_KEYS, (path, content[:20], r.text[:200])


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path_factory):
    """Every check but positive_data_acceptance: a schema-valid base64 string is not a valid PNG, so the server
    rightly refuses some schema-valid bodies."""
    models = tiny_models(tmp_path_factory.mktemp("models"))
    limits = ["--max-size", "64", "--max-steps", "2", "--max-images", "2"]
    with live_server(models, tmp_path_factory.mktemp("out"), *limits) as (port, _):
        checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
                  "response_headers_conformance,negative_data_rejection,unsupported_method,allow_header_conformance")
        run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run",
                              f"http://127.0.0.1:{port}/openapi.json", "--checks", checks, "--max-examples", "25",
                              "--generation-deterministic", "--workers", "1", "--request-timeout", "60",
                              "--no-color", "--suppress-health-check", "all"],
                             capture_output=True, text=True, timeout=900,
                             cwd=tmp_path_factory.mktemp("schemathesis"))  # its cache stays out of the repo
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
