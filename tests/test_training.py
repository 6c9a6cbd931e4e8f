"""Training: config validation, the procedural and folder datasets, a whole tiny run that the pipeline loads,
exact resume, crash-safe checkpoints, LoRA fine-tuning in the kohya format, and 2-process data parallelism."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image

from stable_diffusion.checkpoints.io import read_state_dict
from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline, load_pipeline
from stable_diffusion.shapes.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    ShapesDataset,
    heldout_scenes,
    is_held_out,
    render,
)
from stable_diffusion.training import data as data_module
from stable_diffusion.training.config import DataSection, load_config, parse_config
from stable_diffusion.training.data import FolderDataset, make_batch
from stable_diffusion.training.train import train

from .helpers import ROOT, SMOKE, smoke_config


def test_config_rejects_unknown_keys_and_sections(tmp_path):
    with pytest.raises(ValueError, match=r"^\[train\] stepz: unknown key$"):
        parse_config({"train": {"stepz": 3}})
    with pytest.raises(ValueError, match=r"^\[unet\] channels: unknown key$"):
        parse_config({"unet": {"channels": 3}})
    with pytest.raises(ValueError, match=r"^\[optimiser\]: unknown section$"):
        parse_config({"optimiser": {}})
    with pytest.raises(ValueError, match=r"^\[data\] small_fraction: Input should be less than or equal to 1 \(got 1.5\)$"):
        parse_config({"data": {"small_fraction": 1.5}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)
    builtin = load_config(ROOT / "configs" / "builtin.toml").new_model_config()
    assert builtin.unet.context_dim == builtin.text_encoders[0].width and builtin.image_size == 64


def test_shapes_dataset_is_rich_seeded_and_keeps_its_held_out_split():
    assert len(COLOURS) >= 8 and len(SHAPES) >= 5 and len(BACKGROUNDS) >= 4
    scenes = list(zip(range(400), ShapesDataset(seed=3).scenes(random.Random(3))))
    assert not any(is_held_out(s) for _, s in scenes)
    captions = [s.caption for _, s in scenes]
    assert any(" on the left and " in c for c in captions) and any(" above " in c for c in captions)
    assert any(c.startswith("a small ") and " at the top left " in c for c in captions)
    held = heldout_scenes(50)
    assert all(is_held_out(s) for s in held) and all(s.relation is None for s in held)
    images, texts = make_batch(DataSection(), None, step=7, batch_size=3)
    again, texts_again = make_batch(DataSection(), None, step=7, batch_size=3)
    assert images.shape == (3, 3, 64, 64) and torch.equal(images, again) and texts == texts_again
    assert images.min() >= -1 and images.max() <= 1
    assert render(held[0]).size == (64, 64)


def _single_object_sizes(small_fraction: float) -> list[str]:
    stream = ShapesDataset(two_object_fraction=0.0, small_fraction=small_fraction).scenes(random.Random(8))
    return [next(stream).objects[0].size for _ in range(2000)]


def test_small_fraction_rebalances_object_sizes_and_keeps_the_default_stream():
    assert _single_object_sizes(0.0) == ["large"] * 2000 and _single_object_sizes(1.0) == ["small"] * 2000
    assert 0.66 < _single_object_sizes(0.7).count("small") / 2000 < 0.74
    assert 0.46 < _single_object_sizes(0.5).count("small") / 2000 < 0.54
    # 0.5 (the default) draws no extra numbers: pinned, the held-out prompts every eval so far has used
    assert [s.caption for s in heldout_scenes(2)] == [
        "a large cyan ring at the top right on a gray background",
        "a large green triangle on the right on a navy background"]
    config = parse_config({"data": {"small_fraction": 1.0, "two_object_fraction": 0.0, "caption_dropout": 0.0}})
    _, captions = make_batch(config.data, None, step=0, batch_size=8)
    assert all("small" in c for c in captions), captions


def test_folder_dataset_crops_flips_and_reports_bad_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (80, 40), (255, 0, 0)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red thing\n")
    Image.new("RGB", (40, 60), (0, 0, 255)).save(folder / "b.jpg")
    dataset = FolderDataset(folder, 32, random_crop=True, flip=True)
    assert len(dataset) == 2 and dataset.caption(0) == "a red thing" and dataset.caption(1) == ""
    config = parse_config({"data": {"kind": "folder", "path": str(folder), "size": 32, "caption_dropout": 0.0}})
    images, captions = make_batch(config.data, dataset, step=0, batch_size=4)
    assert images.shape == (4, 3, 32, 32) and sorted(captions) == ["", "", "a red thing", "a red thing"]
    (folder / "c.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        [FolderDataset(folder, 32).image(i, random.Random(0)) for i in range(3)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderDataset(tmp_path / "empty", 32)


def test_a_tiny_run_writes_a_model_the_pipeline_loads(tmp_path):
    path = train(smoke_config(tmp_path), progress=False)
    out = path.parent
    expected = {"model.safetensors", "loss.jsonl", "loss.png", "vae-state.pt", "unet-state.pt"}
    assert expected <= {p.name for p in out.iterdir()}
    pipe = load_pipeline(path)
    assert pipe.config.image_size == 32 and pipe.config.beta_schedule == "linear"
    assert pipe.config.vae.scaling_factor != 1.0  # measured from the trained VAE's latents
    image = pipe.txt2img("a red circle", steps=2, seed=1)[0]
    assert image.size == (32, 32)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(path)[0]


def test_adam_betas_reach_the_optimiser_and_the_log_has_the_gradient_norm(tmp_path):
    from stable_diffusion.training.loop import StageRunner
    from stable_diffusion.training.train import Trainer

    config = smoke_config(tmp_path, adam_betas=[0.9, 0.95])
    trainer = Trainer(config, progress=False)
    spec = trainer._spec("unet", torch.nn.Linear(2, 2), steps=4, lr=1e-3)
    runner = StageRunner(spec, tmp_path, torch.device("cpu"), trainer.dist)
    assert runner.optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert records and all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in records)
    for bad in ([0.9], [0.9, 1.0], [0.9, "x"], 0.9):
        with pytest.raises(ValueError, match=r"^\[train\] adam_betas(\.1)?: "):
            parse_config({"train": {"adam_betas": bad}})


def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = train(smoke_config(tmp_path / "a"), progress=False)
    real = data_module.make_batch

    def crash_at_unet_step_3(data, folder, step, batch_size, rank=0, world=1, caption_dropout=None, **options):
        if step == 3 and caption_dropout is None:
            raise KeyboardInterrupt
        return real(data, folder, step, batch_size, rank, world, caption_dropout, **options)

    config = smoke_config(tmp_path / "b")
    monkeypatch.setattr("stable_diffusion.training.train.make_batch", crash_at_unet_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    monkeypatch.setattr("stable_diffusion.training.train.make_batch", real)
    resumed = train(config, resume=True, progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in map(json.loads, (resumed.parent / "loss.jsonl").read_text().splitlines())
             if r["stage"] == "unet"]
    assert steps == [1, 2, 3, 4]


def test_refine_stage_trains_on_at_its_own_rate_and_latent_scale_and_resumes_exactly(tmp_path, monkeypatch):
    def refine_config(folder: str):
        config = smoke_config(tmp_path / folder, stages=["vae", "unet", "refine"])
        config.refine.steps, config.refine.learning_rate, config.refine.latent_std = 4, 1e-4, 3.0
        config.refine.warmup_steps, config.refine.batch_size = 1, 3  # the unet stage's is 4
        return config

    unet_only = load_pipeline(train(smoke_config(tmp_path / "plain"), progress=False))
    straight = train(refine_config("a"), progress=False)
    refined = load_pipeline(straight)
    assert refined.config.vae.scaling_factor == pytest.approx(3 * unet_only.config.vae.scaling_factor, rel=1e-3)
    before, after = unet_only.unet.state_dict(), refined.unet.state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)  # refine trained the UNet on
    records = [json.loads(line) for line in (straight.parent / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "refine"] == [1, 2, 3, 4]
    assert max(r["lr"] for r in records if r["stage"] == "refine") == pytest.approx(1e-4)
    assert (straight.parent / "refine-state.pt").exists()

    real, calls = data_module.make_batch, []

    def crash_at_refine_step_3(data, folder, step, batch_size, rank=0, world=1, caption_dropout=None, **options):
        if caption_dropout is None and len(calls.append(batch_size) or calls) == 4 + 3:
            raise KeyboardInterrupt  # the unet stage's 4 batches, then the refine stage's third
        return real(data, folder, step, batch_size, rank, world, caption_dropout, **options)

    config = refine_config("b")
    monkeypatch.setattr("stable_diffusion.training.train.make_batch", crash_at_refine_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    assert (tmp_path / "b" / "run" / "refine-state.pt").exists()  # the crash came inside the refine stage
    assert calls == [4] * 4 + [3] * 3  # [refine] batch_size
    monkeypatch.setattr("stable_diffusion.training.train.make_batch", real)
    resumed = train(config, resume=True, progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed.parent / "loss.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == "refine"]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"^\[refine\] latent_std: Input should be greater than or equal to 0"):
        parse_config({"refine": {"latent_std": -1.0}})
    with pytest.raises(ValueError, match=r"\[refine\] batch_size"):
        parse_config({"refine": {"batch_size": -2}})


def test_kill_9_never_leaves_a_corrupt_checkpoint(tmp_path):
    config = tmp_path / "long.toml"
    text = SMOKE.read_text().replace("steps = 4", "steps = 400").replace("save_every = 2", "save_every = 1")
    config.write_text(text.replace('save_path = "runs/smoke"', f'save_path = "{tmp_path / "run"}"'))
    proc = subprocess.Popen([sys.executable, "-m", "stable_diffusion.cli", "train", str(config), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "unet-state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.3)  # somewhere inside later saves
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    loaded = torch.load(state, weights_only=True)
    assert loaded["step"] >= 1 and "model" in loaded


def test_lora_fine_tune_saves_a_kohya_file_that_generation_applies(tmp_path):
    base = train(smoke_config(tmp_path / "base"), progress=False)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
        Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("sks colour")
    data = tomllib.loads(SMOKE.read_text())
    data["train"].update(stages=["lora"], base_model=str(base), save_path=str(tmp_path / "lora"), steps=3,
                         learning_rate=1e-2)
    data["data"] = {"kind": "folder", "path": str(folder), "size": 32}
    data["lora"] = {"rank": 2, "alpha": 2.0, "output": "sks.safetensors"}
    train(parse_config(data), progress=False)
    lora_file = tmp_path / "lora" / "sks.safetensors"
    sd = read_state_dict(lora_file)[0]
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    assert any(k.endswith(".lora_down.weight") for k in sd) and any(k.endswith(".alpha") for k in sd)
    pipe = load_pipeline(base)
    plain = pipe.txt2img("sks colour", steps=2, seed=3)[0]
    with_lora = pipe.txt2img("sks colour", steps=2, seed=3, loras=[(str(lora_file), 1.0)])[0]
    assert plain.tobytes() != with_lora.tobytes()
    assert pipe.txt2img("sks colour", steps=2, seed=3)[0].tobytes() == plain.tobytes()  # unmerged afterwards
    data["train"].update(stages=["unet"], save_path=str(tmp_path / "full"), steps=2)  # full fine-tune
    tuned = train(parse_config(data), progress=False)
    before, after = _weights(base), _weights(tuned)
    changed = [k for k in before if k.startswith("model.diffusion_model.") and not torch.equal(before[k], after[k])]
    assert changed and all(torch.equal(before[k], after[k]) for k in before if k.startswith("first_stage_model."))


def test_bf16_autocast_and_gradient_accumulation_train(tmp_path):
    config = smoke_config(tmp_path, mixed_precision="bf16", grad_accum=2, stages=["vae", "unet"])
    path = train(config, progress=False)
    losses = [json.loads(line)["loss"] for line in (path.parent / "loss.jsonl").read_text().splitlines()]
    assert losses and all(loss == loss and loss < 100 for loss in losses)  # finite


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(tmp_path):
    """grad_accum micro-batches of B/k make the same gradient as one batch of B (each micro-loss divided by k)."""
    from stable_diffusion.training.loop import Dist, StageRunner, StageSpec

    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 5, generator=generator), torch.randn(8, 3, generator=generator)

    class Regression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.layer = torch.nn.Linear(5, 3)

        def forward(self, x, y):
            return (self.layer(x) - y).pow(2).mean()

    gradients = []
    for accum in (1, 2, 4):
        module = Regression()
        spec = StageSpec("test", module, steps=1, learning_rate=1e-3, grad_accum=accum, grad_clip=0.0,
                         save_every=10, log_every=1)
        share = len(inputs) // accum
        runner = StageRunner(spec, tmp_path / str(accum), torch.device("cpu"), Dist())
        runner.out.mkdir()

        def batch(step: int, micro: int, share: int = share) -> tuple[torch.Tensor, torch.Tensor]:
            return inputs[micro * share:(micro + 1) * share], targets[micro * share:(micro + 1) * share]

        runner.run(batch, lambda record: None, False)
        gradients.append([p.grad.clone() for p in module.parameters()])
    for accumulated in gradients[1:]:
        for whole, part in zip(gradients[0], accumulated):
            torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-7)
    assert gradients[0][0].abs().sum() > 0


def test_vae_patch_gan_each_player_learns_only_from_its_own_term():
    from stable_diffusion.models.configs import VAEConfig
    from stable_diffusion.models.vae import AutoencoderKL
    from stable_diffusion.training.objectives import VAELoss

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    loss = VAELoss(vae, 1e-6, disc_weight=0.5, disc_channels=8, disc_layers=2)
    images = torch.rand(2, 3, 16, 16) * 2 - 1

    def grads(adversarial: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        loss.zero_grad()
        loss(images, torch.Generator().manual_seed(3), adversarial).backward()
        return ([p.grad.clone() for p in vae.parameters()],
                [p.grad.clone() for p in loss.discriminator.parameters()])

    vae_plain, disc_plain = grads(False)
    vae_adv, disc_adv = grads(True)
    # the discriminator learns from the start and the generator term never reaches it
    # (every weight; the last bias's hinge gradients cancel, -1 for real + 1 for fake, while all are in margin)
    assert all(g.abs().sum() > 0 for g in disc_plain[:-1])
    assert all(torch.equal(a, b) for a, b in zip(disc_plain, disc_adv))
    # from disc_start the VAE gets the generator's gradient as well
    assert any(not torch.allclose(a, b) for a, b in zip(vae_plain, vae_adv))


def test_vae_object_weight_counts_only_pixels_unlike_the_background():
    from stable_diffusion.models.configs import VAEConfig
    from stable_diffusion.models.vae import AutoencoderKL
    from stable_diffusion.training.objectives import VAELoss, object_weights

    images = torch.full((2, 3, 8, 8), -0.5)
    images[0, :, 2:4, 5:7] = 0.8  # a 2x2 object in image 0; image 1 is all background
    weights = object_weights(images, 10.0)
    assert weights.shape == (2, 1, 8, 8)
    assert weights[0].sum() == 60 + 4 * 10 and torch.equal(weights[1], torch.ones(1, 8, 8))

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    plain, weighted = VAELoss(vae, 0.0), VAELoss(vae, 0.0, object_weight=10.0)
    gen = torch.Generator().manual_seed(1)
    background_only = images[1:]  # no object pixel: the weighting changes nothing
    assert torch.equal(plain(background_only, gen.manual_seed(1)), weighted(background_only, gen.manual_seed(1)))
    assert weighted(images, gen.manual_seed(1)) > plain(images, gen.manual_seed(1))
    with pytest.raises(ValueError, match="object_weight"):
        parse_config({"vae": {"object_weight": 0.5}})


def test_a_vae_stage_with_a_discriminator_trains(tmp_path):
    config = smoke_config(tmp_path)
    config.vae.disc_weight, config.vae.disc_start, config.vae.disc_channels = 0.1, 1, 8
    config.train.stages = ["vae"]
    train(config, progress=False)
    losses = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert losses and all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
    assert load_pipeline(tmp_path / "run" / "model.safetensors").config.image_size == 32


def test_ema_averages_only_trainable_parameters_with_its_warm_up_decay():
    from stable_diffusion.training.loop import EMA

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    module[1].requires_grad_(False)
    ema = EMA(module, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    before = {n: v.clone() for n, v in ema.shadow.items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    ema.update(module, step=100)  # past the warm-up: decay 0.9
    for name, p in module.named_parameters():
        if name in before:
            torch.testing.assert_close(ema.shadow[name], 0.9 * before[name] + 0.1 * p.detach())
    ema.update(module, step=0)  # warm-up: decay (1 + 0) / (10 + 0) = 0.1, the average follows the weights
    weight = module[0].weight.detach()
    torch.testing.assert_close(ema.shadow["0.weight"], 0.1 * (0.9 * before["0.weight"] + 0.1 * weight) + 0.9 * weight)


def test_vae_object_contrast_weights_faint_objects_more_up_to_4x():
    from stable_diffusion.training.objectives import object_weights

    images = torch.full((3, 3, 4, 4), -1.0)  # black backgrounds
    images[0, :, 1, 1] = 1.0  # a white pixel: distance sqrt(12) = 3.46 >= 2, no boost
    images[1, 0, 1, 1] = 0.0  # a dark red pixel: distance 1.0, boost 2 / 1 = 2
    images[2, 0, 1, 1] = -0.8  # a faint pixel: distance 0.2, boost 10, clamped to 4
    plain, boosted = object_weights(images, 10.0), object_weights(images, 10.0, contrast=2.0)
    assert torch.equal(plain[:, 0, 1, 1], torch.full((3,), 10.0))
    torch.testing.assert_close(boosted[:, 0, 1, 1], torch.tensor([10.0, 20.0, 40.0]))
    background = torch.ones(3, 4, 4, dtype=torch.bool)
    background[:, 1, 1] = False
    assert torch.equal(boosted[:, 0][background], torch.ones(45))  # background pixels keep weight 1
    with pytest.raises(ValueError, match="object_contrast"):
        parse_config({"vae": {"object_contrast": -1.0}})


def test_vae_object_margin_weights_the_background_next_to_an_object():
    from stable_diffusion.training.objectives import object_weights

    images = torch.full((1, 3, 7, 7), -1.0)
    images[0, :, 3, 3] = 1.0  # one object pixel in the middle
    weights = object_weights(images, 10.0, margin=1)[0, 0]
    near = torch.zeros(7, 7, dtype=torch.bool)
    near[2:5, 2:5] = True  # the object and its 8 neighbours
    assert torch.equal(weights[near], torch.full((9,), 10.0)) and torch.equal(weights[~near], torch.ones(40))
    assert torch.equal(object_weights(images, 10.0, margin=0), object_weights(images, 10.0))
    with pytest.raises(ValueError, match="object_margin"):
        parse_config({"vae": {"object_margin": -1}})


def test_latent_std_sets_the_scaled_latents_spread_and_refits_a_base_model(tmp_path):
    from stable_diffusion.training.train import Trainer

    def scaled_std(trainer: Trainer) -> float:
        with torch.no_grad():
            images = trainer._images(10**6, 0, 32, 0.0)[0]
            return float(trainer.pipe.vae.encode(images).mean.std() * trainer.pipe.config.vae.scaling_factor)

    config = smoke_config(tmp_path)
    config.train.stages = ["vae"]
    plain = Trainer(config, progress=False)
    plain.train_vae()
    assert scaled_std(plain) == pytest.approx(1.0, rel=0.05)  # LDM's unit variance by default
    config.vae.latent_std = 2.0
    wide = Trainer(config, progress=False)
    wide.train_vae()
    assert scaled_std(wide) == pytest.approx(2.0, rel=0.05)
    assert wide.pipe.config.vae.scaling_factor == pytest.approx(2 * plain.pipe.config.vae.scaling_factor)
    base = tmp_path / "base.safetensors"
    plain.pipe.config.vae.scaling_factor *= 0.5  # a factor no refit would give, so keeping it is visible
    plain.pipe.save(base)
    kept = smoke_config(tmp_path, base_model=str(base), stages=["unet"])
    assert Trainer(kept, progress=False).pipe.config.vae.scaling_factor == pytest.approx(
        plain.pipe.config.vae.scaling_factor)  # a base model keeps its own scale unless latent_std is given
    kept.vae.latent_std = 3.0
    assert scaled_std(Trainer(kept, progress=False)) == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ValueError, match=r"^\[vae\] latent_std: Input should be greater than or equal to 0"):
        parse_config({"vae": {"latent_std": -1.0}})


def test_the_decoder_stage_trains_the_decoder_alone_so_the_latents_stay(tmp_path):
    """``stages = ["decoder"]`` on a base model: the decoder and post_quant_conv learn (on free layouts too), the
    encoder, the UNet, the text encoder and the scaling factor stay bit for bit, so the UNet still fits."""
    base = train(smoke_config(tmp_path / "base"), progress=False)
    config = smoke_config(tmp_path / "tuned", base_model=str(base), stages=["decoder"])
    config.decoder.steps, config.decoder.batch_size, config.decoder.free_fraction = 3, 4, 0.5
    config.vae.object_weight, config.vae.object_margin = 10.0, 1
    tuned = train(config, progress=False)
    before, after = _weights(base), _weights(tuned)
    assert set(before) == set(after)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    decoder = {k for k in before if k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))}
    assert moved and moved <= decoder and len(moved) > len(decoder) // 2
    assert load_pipeline(tuned).config.vae.scaling_factor == load_pipeline(base).config.vae.scaling_factor
    records = [json.loads(line) for line in (tuned.parent / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "decoder"] == [1, 2, 3]
    for bad, words in [({"train": {"stages": ["decoder"]}}, '"decoder" needs a VAE'),
                       ({"data": {"kind": "folder", "path": "x"}, "decoder": {"free_fraction": 0.5}},
                        "[decoder] free_fraction: only for shapes data")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_config(bad)


def test_a_config_names_its_base_and_states_only_what_it_changes(tmp_path):
    (tmp_path / "base.toml").write_text('[train]\nsteps = 5\nbatch_size = 2\n[data]\nsize = 32\nflip = true\n')
    (tmp_path / "child.toml").write_text('base = "base.toml"\n[train]\nsteps = 7\n[data]\nsize = 64\n')
    child = load_config(tmp_path / "child.toml")
    assert (child.train.steps, child.train.batch_size, child.data.size, child.data.flip) == (7, 2, 64, True)
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ValueError, match="comes back to itself"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "typo.toml").write_text('base = "base.toml"\n[train]\nstepz = 7\n')
    with pytest.raises(ValueError, match=r"typo.toml: \[train\] stepz: unknown key"):
        load_config(tmp_path / "typo.toml")
    shipped = sorted([*ROOT.glob("configs/*.toml"), *ROOT.glob("experiments/configs/*.toml")])
    assert len(shipped) > 20 and all(load_config(path) for path in shipped)
    assert load_config(ROOT / "experiments" / "configs" / "builtin_margin.toml").train.stages == ["vae", "unet"]


def test_bad_configs_are_one_line_errors_before_anything_runs(tmp_path):
    for bad, words in [({"train": {"steps": "abc"}}, "[train] steps: Input should be a valid integer"),
                       ({"train": {"learning_rate": "fast"}}, "[train] learning_rate: Input should be a valid number"),
                       ({"train": {"batch_size": 0}}, "[train] batch_size: Input should be greater than or equal to 1"),
                       ({"train": {"save_every": 0}}, "[train] save_every"),
                       ({"data": {"size": 7}}, "[data] size"),
                       ({"vae": {"ch_mult": 3}}, "[vae] ch_mult: Input should be a valid list"),
                       ({"train": {"steps": 0}}, "steps must be at least 1"),
                       ({"train": {"steps": -5}}, "[train] steps"),
                       ({"train": {"stages": []}}, "[train] stages"),
                       ({"train": {"learning_rate": math.nan}}, "[train] learning_rate: Input should be a finite number"),
                       ({"train": {"stages": ["refine", "unet"]}}, "refine"),
                       ({"data": {"kind": "folder"}}, "needs [data] path"),
                       ({}, "the config is empty")]:
        with pytest.raises(ValueError) as error:
            parse_config(bad)
        assert words in str(error.value) and "\n" not in str(error.value), (bad, str(error.value))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_config(empty)


@pytest.mark.parametrize("family", ["tiny-sdxl", "tiny-sd2"])
def test_fine_tuning_and_lora_training_work_for_sd2_and_sdxl(tmp_path, family):
    """SDXL's UNet needs y (pooled text + size ids) and two text encoders: both stages build them as generation
    does, and what they save loads and changes generation."""

    base = tmp_path / "base.safetensors"
    Pipeline.from_config(preset(family), seed=0).save(base)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("sks colour")
    data = {"train": {"stages": ["lora"], "base_model": str(base), "save_path": str(tmp_path / "lora"), "steps": 2,
                      "batch_size": 2, "learning_rate": 1e-2, "warmup_steps": 1, "log_every": 1, "save_every": 2},
            "data": {"kind": "folder", "path": str(folder), "size": 64},
            "lora": {"rank": 2, "alpha": 2.0, "output": "sks.safetensors"}}
    train(parse_config(data), progress=False)
    pipe = load_pipeline(base)
    lora = tmp_path / "lora" / "sks.safetensors"
    plain = pipe.txt2img("sks colour", steps=2, seed=3)[0]
    assert plain.tobytes() != pipe.txt2img("sks colour", steps=2, seed=3, loras=[(str(lora), 1.0)])[0].tobytes()
    data["train"].update(stages=["unet"], save_path=str(tmp_path / "full"))
    tuned = load_pipeline(train(parse_config(data), progress=False))
    assert len(tuned.text_encoders) == len(pipe.text_encoders)
    assert tuned.txt2img("sks colour", steps=2, seed=3)[0].tobytes() != plain.tobytes()
