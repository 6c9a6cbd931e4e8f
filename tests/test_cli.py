"""The `sd` command: info, convert, and one-line errors with a non-zero exit."""

from __future__ import annotations

import torch

from stable_diffusion import load_pipeline
from stable_diffusion.cli import main
from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline


def test_info_on_a_preset_and_a_file(tmp_path, capsys):
    assert main(["info", "sdxl"]) == 0
    out = capsys.readouterr().out
    assert "family:      sdxl" in out and "2567.5M" in out
    Pipeline.from_config(preset("tiny-sd2")).save(tmp_path / "m.safetensors", dtype="fp16")
    assert main(["info", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "family:      sd2" in out and "prediction:  eps" in out and "float16 stored, float32 loaded" in out


def test_convert_round_trip_with_dtype(tmp_path, capsys):
    pipe = Pipeline.from_config(preset("tiny-sdxl"), seed=5)
    src = tmp_path / "m.safetensors"
    pipe.save(src)
    assert main(["convert", str(src), str(tmp_path / "folder"), "--format", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--dtype", "fp16"]) == 0
    back = load_pipeline(tmp_path / "back.safetensors")
    w0, w1 = pipe.unet.out[2].weight, back.unet.out[2].weight
    assert torch.allclose(w0, w1, atol=1e-3)
    assert main(["convert", str(src), str(tmp_path / "folder"), "--format", "diffusers"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sd info: error:") and str(bad) in err and "\n" not in err
    assert main(["convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "out.safetensors")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_outputs_follow_the_umask(tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        assert main(["txt2img", "x", "--model", "tiny-sd1", "--steps", "1", "--seed", "1",
                     "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out" / "00000-1.png").stat().st_mode & 0o777 == 0o640
