"""Regression tests for the CLI and `sd train` defects: every bad value is one line on stderr and exit code 1,
before any work; resume keeps loss.jsonl exact in every case and names the file when it cannot resume."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from stable_diffusion.cli import main
from stable_diffusion.training.train import train

from .helpers import smoke_config

BAD_RUNS = [
    (["txt2img", "x", "--cfg", "nan"], "cfg_scale must be a finite number"),
    (["txt2img", "x", "--cfg", "inf"], "cfg_scale must be a finite number"),
    (["txt2img", "x", "--width", "0"], "positive multiples of 8"),
    (["txt2img", "x", "--width", "-64"], "positive multiples of 8"),
    (["txt2img", "x", "--steps", "0"], "at least 1"),
    (["txt2img", "x", "--device", "tpu9"], "unknown device 'tpu9'"),
    (["txt2img", "x", "--sampler", "Magic"], "unknown sampler"),
    (["txt2img", "x", "--lora", "nowhere:1"], "LoRA 'nowhere' not found"),
    (["txt2img", "x", "--tiled-vae", "60"], "vae_tile_size must be a multiple of 8 from 64 to 4096"),
    (["txt2img", "x", "--tiled-vae", "100000"], "vae_tile_size must be a multiple of 8 from 64 to 4096"),
    (["img2img", "x", "--init", "missing.png"], "not a readable image"),
    (["img2img", "x", "--init", "{init}", "--strength", "1.5"], "denoising strength must be in [0, 1]"),
    (["txt2img", "x", "--control", "{init}", "--control-model", "{tmp}/cn.safetensors", "--control-module",
      "openpose", "--models-dir", "{tmp}"], "needs body_pose_model.pth"),
    (["serve", "--model", "nonexistent", "--models-dir", "{tmp}"], "model 'nonexistent' not found"),
    (["serve", "--tome", "1.5", "--models-dir", "{tmp}"], "token merging ratio must be in [0, 1)"),
    (["serve", "--deepcache", "0", "--models-dir", "{tmp}"], "deepcache takes a whole number of steps >= 1"),
    (["serve", "--deepcache-branch", "9", "--models-dir", "{tmp}"], "deepcache branch must be a whole number in [0, 5]"),
    (["serve", "--deepcache-branch", "-1", "--models-dir", "{tmp}"], "for this model or 'level', not"),
    (["info", "{tmp}/empty.ckpt"], "truncated or corrupt checkpoint"),
    (["info", "{tmp}/notes.txt"], "unknown checkpoint type"),
]


@pytest.mark.parametrize("args,words", BAD_RUNS)
def test_bad_cli_values_are_one_line_and_exit_1(tmp_path, capsys, args, words):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    Image.new("RGB", (60, 60), "red").save(tmp_path / "init.png")
    args = [a.format(tmp=tmp_path, init=tmp_path / "init.png") for a in args]
    if args[0] in ("txt2img", "img2img"):
        args += ["--model", "tiny-sd1", "--out", str(tmp_path / "out")]
    assert main(args) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"sd {args[0]}: error:") and words in lines[0], err
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `--device cuda` is valid here")
    assert main(["txt2img", "x", "--model", "tiny-sd1", "--device", "cuda", "--out", str(tmp_path)]) == 1
    assert "this machine has no CUDA GPU" in capsys.readouterr().err


def test_odd_sizes_and_small_init_images_generate(tmp_path):
    Image.new("RGB", (60, 60), "red").save(tmp_path / "init.png")
    assert main(["img2img", "x", "--init", str(tmp_path / "init.png"), "--model", "tiny-sd1", "--steps", "2",
                 "--seed", "1", "--out", str(tmp_path / "a")]) == 0
    assert Image.open(tmp_path / "a" / "00000-1.png").size == (56, 56)  # rounded down to a multiple of 8
    assert main(["txt2img", "x", "--model", "tiny-sd1", "--width", "8", "--height", "72", "--steps", "1", "--seed",
                 "1", "--out", str(tmp_path / "b")]) == 0
    from stable_diffusion.models.configs import UNetConfig
    from stable_diffusion.models.unet import UNetModel

    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), attention_resolutions=(1,),
                                num_head_channels=16, context_dim=16))  # SD1.5's four levels
    for h, w in ((1, 9), (5, 7), (65, 3)):  # latent sides not divisible by 8: the upsampled path meets its skip
        out = unet(torch.randn(1, 4, h, w), torch.tensor([10]), torch.randn(1, 3, 16))
        assert out.shape == (1, 4, h, w)


def test_raw_pickle_checkpoints_load_without_torch_warnings(tmp_path):
    from stable_diffusion.checkpoints.io import read_state_dict

    torch.save({"state_dict": {"a": torch.zeros(2)}}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd, _ = read_state_dict(tmp_path / "old.ckpt")
    assert list(sd) == ["a"]


def test_resume_before_the_first_checkpoint_leaves_no_duplicate_log_lines(tmp_path):
    config = smoke_config(tmp_path, stages=["vae", "unet"])
    run = tmp_path / "run"
    run.mkdir()
    # a run killed in its unet stage before that stage's first checkpoint: its vae state, and unet log lines
    train(config, progress=False)
    log = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    (run / "unet-state.pt").unlink()
    with (run / "loss.jsonl").open("a") as f:
        f.write('{"stage": "unet", "step": 1, "lo')  # the line a kill -9 cut short
    train(config, resume=True, progress=False)
    again = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"]) for r in again]
    assert steps == [(r["stage"], r["step"]) for r in log] and len(set(steps)) == len(steps)


def test_an_unusable_state_file_names_the_file_and_the_reason(tmp_path):
    config = smoke_config(tmp_path, stages=["vae"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "vae-state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"vae-state.pt: the file is empty .*delete it to start the vae stage over"):
        train(config, resume=True, progress=False)
    (tmp_path / "run" / "vae-state.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match=r"cannot resume from .*vae-state.pt: \S"):
        train(config, resume=True, progress=False)
    torch.save({"step": 1}, tmp_path / "run" / "vae-state.pt")
    with pytest.raises(ValueError, match=r"vae-state.pt: not a stage checkpoint"):
        train(config, resume=True, progress=False)
