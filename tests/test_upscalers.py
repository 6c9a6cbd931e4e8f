"""The upscaler nets against spandrel's (ESRGAN / RRDBNet in both key layouts, Real-ESRGAN's compact net) on
random weights, scale read from the weights, tiling, weights-only loading, and A1111's upscale loop. spandrel is
installed off the import path (.venv/oracles, see the Makefile) without torchvision: its package __init__ needs
it, so only its architecture modules are loaded, under a bare package object."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stable_diffusion.upscalers import find_upscalers, get_upscaler, resize_image, upscale
from stable_diffusion.upscalers.compact import SRVGGNetCompact
from stable_diffusion.upscalers.nets import load_upscaler_net, net_from_state_dict
from stable_diffusion.upscalers.rrdbnet import RRDBNet
from stable_diffusion.upscalers.run import run_tiled


def spandrel(arch: str):
    if "spandrel" not in sys.modules:
        package = types.ModuleType("spandrel")
        package.__path__ = [str(Path(sys.prefix) / "oracles" / "spandrel")]
        sys.modules["spandrel"] = package
    return importlib.import_module(f"spandrel.architectures.{arch}")


def _random(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    for p in net.parameters():
        p.data = torch.randn_like(p) * 0.05
    return net.state_dict()


def _image(seed: int, size: tuple[int, int] = (20, 28)) -> torch.Tensor:
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_esrgan_layout_files_match_spandrel(scale):
    theirs = spandrel("ESRGAN").ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=2, scale=scale).eval()
    state = _random(theirs, scale)
    ours = net_from_state_dict(state)
    assert isinstance(ours, RRDBNet) and ours.scale == scale
    x = _image(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("unshuffle", [1, 2, 4])  # Real-ESRGAN x4plus, x2plus, and a 1x model
def test_real_esrgan_layout_files_match_spandrel(unshuffle):
    ours = RRDBNet(features=16, blocks=2, growth=32, upsamples=2, unshuffle=unshuffle).eval()  # spandrel: growth 32
    state = _random(ours, unshuffle)
    theirs = spandrel("ESRGAN").ESRGANArch().load({"params_ema": dict(state)}).model.eval()
    assert net_from_state_dict(state).scale == 4 / unshuffle
    x = _image(2, (24, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [2, 4])
def test_compact_net_matches_spandrel(scale):
    theirs = spandrel("Compact").Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=scale).eval()
    state = _random(theirs, 10 + scale)
    ours = net_from_state_dict(state)
    assert isinstance(ours, SRVGGNetCompact) and ours.scale == scale
    x = _image(3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_tiles_with_overlap_match_the_whole_image():
    net = RRDBNet(features=16, blocks=2, growth=8, upsamples=1, unshuffle=2).eval()
    _random(net, 5)
    x = _image(4, (70, 90))
    whole, tiled = run_tiled(net, x, tile=0), run_tiled(net, x, tile=32, overlap=16)
    assert tiled.shape == whole.shape == (1, 3, 70, 90)
    mse = (tiled.clamp(0, 1) - whole.clamp(0, 1)).pow(2).mean().item()
    assert 10 * np.log10(1 / mse) > 45


def test_files_load_weights_only(tmp_path):
    net = SRVGGNetCompact(features=8, convs=2, scale=2)
    state = _random(net, 6)
    torch.save({"params": state}, tmp_path / "compact.pth")  # Real-ESRGAN's wrapper
    assert load_upscaler_net(tmp_path / "compact.pth").scale == 2

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"params": state, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth: not a readable upscaler model"):
        load_upscaler_net(tmp_path / "evil.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth"):
        load_upscaler_net(tmp_path / "junk.pth")


def test_folders_are_listed_with_a1111_names_and_scales(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "ESRGAN").mkdir()
    (tmp_path / "RealESRGAN").mkdir()
    save_file(_random(RRDBNet(features=8, blocks=1, growth=8, upsamples=2), 7), tmp_path / "ESRGAN" / "4x-Tiny.safetensors")
    torch.save({"params_ema": _random(RRDBNet(features=8, blocks=1, growth=8, unshuffle=2), 8)},
               tmp_path / "RealESRGAN" / "RealESRGAN_x2plus.pth")
    (tmp_path / "ESRGAN" / "broken.pth").write_bytes(b"no")
    listed = {u.name: u.listing() for u in find_upscalers(tmp_path)}
    assert list(listed) == ["None", "Lanczos", "Nearest", "4x-Tiny", "R-ESRGAN 2x+"]
    assert listed["4x-Tiny"]["scale"] == 4.0 and listed["R-ESRGAN 2x+"]["scale"] == 2.0
    assert listed["R-ESRGAN 2x+"]["model_name"] == "RealESRGAN"
    with pytest.raises(ValueError, match="unknown upscaler 'ESRGAN_4x'.*4x-Tiny"):
        get_upscaler("ESRGAN_4x", tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    assert upscale(image, 2, get_upscaler("4x-Tiny", tmp_path)).size == (48, 40)  # one 4x pass, Lanczos down
    assert upscale(image, 3, get_upscaler("R-ESRGAN 2x+", tmp_path)).size == (72, 56)  # two 2x passes, //8*8


def test_a1111_filters_and_just_resize():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    nearest = upscale(image, 2, get_upscaler("Nearest", None))
    assert np.array_equal(np.asarray(nearest), np.asarray(image).repeat(2, 0).repeat(2, 1))
    assert upscale(image, 2.5, get_upscaler("Lanczos", None)).size == (40, 40)
    assert resize_image(image, 50, 30, get_upscaler("Nearest", None)).size == (50, 30)
    assert resize_image(image, 32, 32, get_upscaler("None", None)) .size == (32, 32)


def test_a_model_file_is_read_once_until_it_is_rewritten(tmp_path):
    import os

    (tmp_path / "ESRGAN").mkdir()
    path = tmp_path / "ESRGAN" / "2x.pth"
    torch.save(_random(SRVGGNetCompact(features=8, convs=1, scale=2), 1), path)
    first = get_upscaler("2x", tmp_path).net()
    assert get_upscaler("2x", tmp_path).net() is first  # hires batches and Extras requests reuse it
    torch.save(_random(SRVGGNetCompact(features=8, convs=1, scale=2), 2), path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    again = get_upscaler("2x", tmp_path).net()
    assert again is not first and not torch.equal(again.body[0].weight, first.body[0].weight)
