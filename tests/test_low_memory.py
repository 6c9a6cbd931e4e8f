"""Low memory: weights memory-mapped from .safetensors (no second copy, pages released on demand), model and
sequential offload, attention slicing, and the tiled VAE, each against the plain path; their peak memory on a
full-size model is in `make bench` (benchmarks/bench_memory.py)."""

from __future__ import annotations

import base64
import io
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from stable_diffusion import load_pipeline
from stable_diffusion.checkpoints import mapped
from stable_diffusion.checkpoints.errors import CheckpointError
from stable_diffusion.checkpoints.io import read_state_dict, write_safetensors
from stable_diffusion.cli import main
from stable_diffusion.images import to_batch, to_pil
from stable_diffusion.models.attention import attention
from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import BUILTIN_MODEL, Pipeline, RunOptions
from stable_diffusion.server.app import create_app
from stable_diffusion.server.registry import ModelRegistry

from .helpers import psnr

PROMPT = "a blue square on the left and a yellow star on the right on a black background"


def mapped_rss(path: Path) -> int:
    """Bytes of ``path`` resident in this process's mappings (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.split()[-1] == str(path.resolve())
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_safetensors_are_mapped_not_copied_and_release_gives_pages_back(tmp_path):
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {f"w{i}": torch.randn(1024, 1024) for i in range(16)})  # 64 MiB
    tensors, _ = read_state_dict(path)
    assert all(mapped.is_mapped(t) for t in tensors.values())
    assert mapped_rss(path) < 2**20  # nothing read yet
    total = sum(float(t.sum()) for t in tensors.values())  # every page read once
    assert mapped_rss(path) > 60 * 2**20
    for t in tensors.values():
        assert mapped.release(t)
    assert mapped_rss(path) < 2**20
    assert sum(float(t.sum()) for t in tensors.values()) == total  # read back from the file, unchanged
    assert not mapped.release(torch.ones(3)) and not mapped.is_mapped(torch.ones(3))


def _safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("content,words", [
    (b"\x01\x02", "shorter than its header"),
    (struct.pack("<Q", 10**12) + b"{}", "header length"),
    (_safetensors(b"{not json"), "not JSON"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "past the end"),
    (_safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "do not hold"),
    (_safetensors({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "known dtype"),
    (_safetensors({"__metadata__": {"a": 1}}), "__metadata__"),
])
def test_malformed_safetensors_headers_are_clear_errors(tmp_path, content, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words):
        read_state_dict(path)


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory) -> Path:
    """The built-in model (shipped in fp16) saved in fp32, so that an fp32 run needs no conversion."""
    path = tmp_path_factory.mktemp("fp32") / "builtin-fp32.safetensors"
    load_pipeline().save(path)
    return path


def test_loaded_weights_view_the_file_and_only_converted_ones_are_copied(fp32_file):
    pipe = load_pipeline(fp32_file)
    assert all(mapped.is_mapped(p) for p in pipe.text_encoder.parameters())  # fp32 file, fp32 run: no copy
    convs = [m.weight for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(mapped.is_mapped(w) for w in convs)  # copied into channels-last layout...
    # ... and the file's pages they were copied from given back (what stays is the kernel's fault-around:
    # up to 16 neighbouring pages mapped with each page read)
    assert mapped_rss(fp32_file) < fp32_file.stat().st_size / 10
    offloaded = load_pipeline(fp32_file, offload="sequential")
    assert all(mapped.is_mapped(p) for p in offloaded.unet.parameters())  # offload keeps the file's layout
    half = load_pipeline(BUILTIN_MODEL)  # fp16 file run in fp32: converted copies, file pages given back
    assert not any(mapped.is_mapped(p) for p in half.unet.parameters())
    assert mapped_rss(BUILTIN_MODEL) < BUILTIN_MODEL.stat().st_size / 10


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_the_same_images_and_keeps_weights_off_the_resident_set(builtin, fp32_file, mode):
    reference = builtin.txt2img(PROMPT, seed=3, steps=8)[0]
    pipe = load_pipeline(fp32_file, offload=mode)
    assert pipe.device == torch.device("cpu") and pipe.offload.mode == mode
    image = pipe.txt2img(PROMPT, seed=3, steps=8)[0]
    assert psnr(image, reference) >= 60  # the file's NCHW layout instead of channels-last: float noise only
    assert mapped_rss(fp32_file) < fp32_file.stat().st_size / 10  # every weight went home afterwards
    again = pipe.img2img(reference, PROMPT, denoising_strength=0.5, seed=4)[0]
    assert psnr(again, builtin.img2img(reference, PROMPT, denoising_strength=0.5, seed=4)[0]) >= 60


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_keeps_an_fp16_file_in_fp16_and_computes_in_fp32(builtin, tmp_path, mode):
    """The built-in model ships in fp16: offloaded on the CPU its weights rest as the file has them (mapped,
    releasable) and each unit runs on an fp32 cast of them, the numbers of a model converted at load; a LoRA merges
    in fp32; turning offload off converts them."""
    from stable_diffusion.lora import _targets, applied_loras

    from .test_lora import _kohya_file

    pipe = load_pipeline(BUILTIN_MODEL, offload=mode)
    assert pipe.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert all(p.dtype == torch.float16 and mapped.is_mapped(p) for p in pipe.unet.parameters())
    image = pipe.txt2img(PROMPT, seed=3, steps=8)[0]
    assert psnr(image, builtin.txt2img(PROMPT, seed=3, steps=8)[0]) >= 60  # NCHW against channels-last: float noise
    assert mapped_rss(BUILTIN_MODEL) < BUILTIN_MODEL.stat().st_size / 5
    name = next(k for k in _targets(pipe) if k.startswith("lora_unet") and k.endswith("attn2_to_v"))
    module, delta = next(iter(_kohya_file(tmp_path / "l.safetensors", pipe, [name]).items()))
    before = module.weight.detach().clone()
    with applied_loras(pipe, [(tmp_path / "l.safetensors", 1.0)]):
        assert module.weight.dtype == torch.float32
        torch.testing.assert_close(module.weight, before.float() + delta)
    assert torch.equal(module.weight, before) and mapped.is_mapped(module.weight)  # the file's weight again
    pipe.enable_offload("sequential" if mode == "model" else "model")  # another mode: still fp16 run in fp32
    assert pipe.dtype == torch.float32 and all(p.dtype == torch.float16 for p in pipe.unet.parameters())
    assert psnr(pipe.txt2img(PROMPT, seed=3, steps=8)[0], image) >= 60
    pipe.enable_offload("none")
    assert pipe.dtype == torch.float32 and all(p.dtype == torch.float32 for p in pipe.unet.parameters())


def test_sequential_offload_holds_one_layer_at_a_time(fp32_file):
    pipe = load_pipeline(fp32_file, offload="sequential")
    peak = []

    def watch(_module, _args):
        peak.append(mapped_rss(fp32_file))

    for block in pipe.unet.output_blocks:
        block.register_forward_pre_hook(watch)
    pipe.txt2img(PROMPT, seed=3, steps=2)
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    assert peak and max(peak) < unet_bytes / 4  # between layers, only a layer's pages (and page edges) stay


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd1-inpaint"])
def test_offload_runs_every_family_with_loras_untouched(tmp_path, name):
    source = load_pipeline(name)
    source.save(tmp_path / "m.safetensors")
    reference = source.txt2img("a cat", seed=1, steps=2, width=64, height=64)[0]
    for mode in ("model", "sequential"):
        pipe = load_pipeline(tmp_path / "m.safetensors", offload=mode)
        assert psnr(pipe.txt2img("a cat", seed=1, steps=2, width=64, height=64)[0], reference) >= 60


def test_attention_slices_give_the_same_result():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 300, 16), torch.randn(2, 4, 77, 16), torch.randn(2, 4, 77, 16)
    whole = attention(q, k, v)
    for budget in (1, 4096, 2 * 4 * 77 * 4 * 37, 10**9):
        torch.testing.assert_close(attention(q, k, v, budget), whole, atol=1e-6, rtol=1e-5)  # kernel rounding


def test_attention_slicing_leaves_images_unchanged(builtin):
    reference = builtin.txt2img(PROMPT, seed=3, steps=4)[0]
    sliced = load_pipeline(attention_slicing=1).txt2img(PROMPT, seed=3, steps=4)[0]
    assert np.array_equal(np.asarray(sliced), np.asarray(reference))
    with pytest.raises(ValueError, match="'auto' or a size in MiB"):
        load_pipeline(attention_slicing=0)


@pytest.fixture(scope="module")
def latents_256():
    """The built-in model's latents of a 256 px image, and that image decoded untiled."""
    pipe = load_pipeline()
    image = pipe.txt2img(PROMPT, width=256, height=256, steps=10, seed=3)[0]
    with torch.inference_mode():
        z = pipe.vae.encode(to_batch(image, 256, 256)).mean
        return pipe, z, to_pil(pipe.vae.decode(z))[0]


def test_tiled_vae_decode_is_45_db_from_untiled_and_beats_diffusers_tiles(latents_256):
    from diffusers import AutoencoderKL

    pipe, z, full = latents_256
    ours, theirs = {}, {}
    with torch.inference_mode():
        with tempfile.TemporaryDirectory() as folder:
            pipe.save(folder, format="diffusers")
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        vae.enable_tiling()  # a quarter of each tile overlapping, blended
        for tile in (64, 128):  # 64 px: diffusers' default tiles for this model
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // pipe.vae.downscale
            theirs[tile] = psnr(to_pil(vae.decode(z).sample)[0], full)
            ours[tile] = psnr(to_pil(pipe.vae.decode_tiled(z, tile))[0], full)
    assert all(ours[tile] >= 45 and ours[tile] > theirs[tile] + 5 for tile in ours), (ours, theirs)


def test_tiled_vae_encode_matches_untiled(latents_256):
    pipe, z, full = latents_256
    with torch.inference_mode():
        tiled = pipe.vae.encode_tiled(to_batch(full, 256, 256), tile=64).mean
        assert psnr(to_pil(pipe.vae.decode(tiled))[0], full) >= 40


def test_tiled_vae_from_the_cli_and_the_api(tmp_path, capsys, models_dir):
    assert main(["txt2img", PROMPT, "--seed", "2", "--steps", "4", "--width", "256", "--height", "256",
                 "--tiled-vae", "128", "--offload", "sequential", "--attention-slicing", "4",
                 "--out", str(tmp_path / "tiled")]) == 0
    assert main(["txt2img", PROMPT, "--seed", "2", "--steps", "4", "--width", "256", "--height", "256",
                 "--out", str(tmp_path / "whole")]) == 0
    tiled, whole = (Image.open(next((tmp_path / d).glob("*.png"))) for d in ("tiled", "whole"))
    assert psnr(tiled, whole) >= 30
    with pytest.raises(SystemExit):  # argparse's usage and error, exit 2
        main(["txt2img", "x", "--attention-slicing", "lots"])
    assert "takes 'auto' or a size in MiB" in capsys.readouterr().err
    registry = ModelRegistry(models_dir, RunOptions(offload="sequential", attention_slicing=1), default="tiny")
    with TestClient(create_app(registry, outputs=None)) as client:
        body = {"prompt": "a cat", "steps": 2, "width": 128, "height": 128, "seed": 5}
        whole = client.post("/sdapi/v1/txt2img", json=body)
        tiled = client.post("/sdapi/v1/txt2img", json={**body, "tiled_vae": True, "vae_tile_size": 64})
        assert whole.status_code == tiled.status_code == 200
        assert psnr(*(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) for r in (whole, tiled))) >= 30
        bad = client.post("/sdapi/v1/txt2img", json={**body, "vae_tile_size": 60})
        assert bad.status_code == 422 and "vae_tile_size" in bad.text


def test_the_server_reloads_a_model_file_rewritten_under_it(tmp_path):
    """Weights are views of the file, so a model file replaced since it was loaded is loaded again."""
    (tmp_path / "Stable-diffusion").mkdir()
    path = tmp_path / "Stable-diffusion" / "m.safetensors"
    load_pipeline("tiny-sd1").save(path)
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 5}
    with TestClient(create_app(ModelRegistry(tmp_path, default="m"), outputs=None)) as client:
        first = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
        other = Pipeline.from_config(preset("tiny-sd1"), seed=1)
        other.save(path)
        second = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
    expected = other.txt2img("a cat", steps=2, width=64, height=64, seed=5, sampler="Euler")[0]
    assert first != second
    assert psnr(Image.open(io.BytesIO(base64.b64decode(second))), expected) >= 60
