"""txt2img on tiny random models: A1111 seeds, determinism, batches, validation, infotext, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stable_diffusion import GenerationRequest, generate, load_pipeline
from stable_diffusion.cli import main
from stable_diffusion.diffusion.samplers import SAMPLERS
from stable_diffusion.generate import initial_noise
from stable_diffusion.images import read_infotext, save_png, to_pil
from stable_diffusion.infotext import format_infotext, parse_infotext

from .helpers import pixels


def test_noise_is_a1111s_cpu_noise():
    noise, _ = initial_noise([42, 43], (4, 8, 8))
    assert torch.equal(noise[1], torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(43)))


def test_same_seed_same_image_and_batches_match_singles(sd1):
    a = sd1.txt2img("a red circle", steps=3, seed=10)[0]
    b = sd1.txt2img("a red circle", steps=3, seed=10)[0]
    c = sd1.txt2img("a red circle", steps=3, seed=11)[0]
    batch = sd1.txt2img("a red circle", steps=3, seed=10, batch_size=2)
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5
    assert np.abs(pixels(batch[1]) - pixels(c)).max() <= 2  # batched maths differ only in float rounding
    assert a.size == (64, 64)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
def test_a_prompt_list_draws_one_image_per_prompt_in_one_batch(name):
    pipe = load_pipeline(name)
    prompts = ["a red circle", "a [blue:green:2] square", "a cat"]
    result = generate(pipe, GenerationRequest(prompt=prompts, steps=3, seed=20, width=64, height=64))
    assert len(result.images) == 3 and result.seeds == [20, 21, 22]
    for i, prompt in enumerate(prompts):
        alone = pipe.txt2img(prompt, steps=3, seed=20 + i, width=64, height=64)[0]
        assert np.abs(pixels(result.images[i]) - pixels(alone)).max() <= 2
        assert parse_infotext(result.infotexts[i])["Prompt"] == prompt
    with pytest.raises(ValueError, match="at least one string"):
        pipe.txt2img([])


def test_the_builtin_model_draws_what_held_out_prompts_ask_for(builtin):
    """Prompt to pixels on the shipped model: images of 8 + 8 held-out prompts (attribute combinations training
    never saw), read back by the adherence checker, are right where the unconditional model's are not."""
    from stable_diffusion.shapes.adherence import judge, read_image
    from stable_diffusion.shapes.scenes import heldout_scenes

    for scenes in (heldout_scenes(8, seed=1), heldout_scenes(8, seed=2, two_object=True)):
        images = builtin.txt2img([s.caption for s in scenes], steps=20, seed=0)
        chance = builtin.txt2img([""] * len(scenes), steps=20, seed=0, cfg_scale=1.0)
        assert sum(judge(read_image(im), s)["all"] for im, s in zip(images, scenes)) >= 7
        assert sum(judge(read_image(im), s)["all"] for im, s in zip(chance, scenes)) <= 1


def test_guidance_is_classifier_free_guidance_against_the_negative_prompt(builtin):
    """CFG 1 is the prompt alone; a negative prompt equal to the prompt gives that same image at any scale (the
    guidance term is zero); the default negative prompt (empty) and another one each move it."""
    prompt, common = "a small red circle at the top left on a white background", {"steps": 8, "seed": 1,
                                                                                   "sampler": "Euler"}
    guided = pixels(builtin.txt2img(prompt, **common)[0])
    alone = pixels(builtin.txt2img(prompt, cfg_scale=1.0, **common)[0])
    same = pixels(builtin.txt2img(prompt, negative_prompt=prompt, cfg_scale=9.0, **common)[0])
    assert np.abs(same - alone).max() <= 1  # the same conditional prediction, batched with its twin
    assert np.abs(guided - alone).mean() > 2
    other = pixels(builtin.txt2img(prompt, negative_prompt="a red circle", **common)[0])
    assert np.abs(guided - other).mean() > 2


@pytest.mark.parametrize("name", ["tiny-sd2-v", "tiny-sdxl"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_on_every_family(name, sampler):
    pipe = load_pipeline(name)
    steps = []
    images = pipe.txt2img("a blue square", sampler=sampler, steps=3, seed=0, width=48, height=64,
                          callback=lambda info: steps.append(info["i"]))
    assert images[0].size == (48, 64)
    # DPM fast spends 3 model calls on its own steps (a 2nd- and a 1st-order one), DPM adaptive as many as it needs
    assert steps == list(range(len(steps))) and (len(steps) == 3 or sampler in ("DPM fast", "DPM adaptive"))


def test_bad_requests_fail_before_work(sd1):
    with pytest.raises(ValueError, match="multiples of 8"):
        sd1.txt2img("x", width=65)
    with pytest.raises(ValueError, match="unknown sampler"):
        sd1.txt2img("x", sampler="Nope")
    with pytest.raises(ValueError, match="unknown scheduler"):
        sd1.txt2img("x", scheduler="nope", steps=1)


def test_infotext_round_trip():
    text = format_infotext("a cat, sitting", "blurry\nugly", {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7.0,
                                                               "Seed": 5, "Model": "a: b", "Clip skip": None})
    assert text.split("\n")[-1].startswith("Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.0, Seed: 5, Model: \"a: b\"")
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat, sitting" and parsed["Negative prompt"] == "blurry\nugly"
    assert parsed["Seed"] == "5" and parsed["Model"] == "a: b" and "Clip skip" not in parsed


def test_cli_txt2img_writes_numbered_pngs_with_parameters(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["txt2img", "a green triangle", "--model", "tiny-sd1", "--steps", "2", "--seed", "7", "--batch", "2",
            "--sampler", "DPM++ 2M Karras", "--out", str(out)]
    assert main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-7.png", "00001-8.png"]
    params = parse_infotext(read_infotext(out / "00001-8.png"))
    assert params["Prompt"] == "a green triangle" and params["Seed"] == "8"
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert main(args) == 0 and len(list(out.iterdir())) == 4
    assert main([*args, "--preview"]) == 0
    from PIL import Image

    strip = Image.open(out / "00004-7-preview.png")
    assert strip.size == (2 * 128, 128)  # one 128-px frame per step
    assert main(["txt2img", "x", "--model", "tiny-sd1", "--width", "100", "--out", str(tmp_path / "bad")]) == 1
    assert "multiples of 8" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_img2img_strength_semantics(sd1):
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    steps = []
    out = sd1.img2img(init, "a cat", denoising_strength=0.5, steps=10, seed=3, sampler="Euler",
                      callback=lambda info: steps.append(float(info["sigma"])))
    assert out[0].size == (80, 64)  # init size by default
    assert len(steps) == 6  # int(10 * 0.5) + 1 sigmas of a 10-step schedule, A1111 semantics
    full = sd1.txt2img("a cat", steps=10, seed=3, sampler="Euler", width=80, height=64,
                       callback=lambda info: steps.append(float(info["sigma"])))
    assert steps[:6] == steps[-6:]  # the last steps of the same schedule
    low = sd1.img2img(init, "a cat", denoising_strength=0.0, steps=10, seed=3)[0]
    high = sd1.img2img(init, "a cat", denoising_strength=1.0, steps=10, seed=3)[0]
    recon = sd1.vae.decode(sd1.vae.encode(torch.from_numpy(np.asarray(init, np.float32) / 127.5 - 1)
                                          .permute(2, 0, 1)[None]).mean)
    near = np.abs(pixels(low) - pixels(to_pil(recon)[0])).mean()
    far = np.abs(pixels(high) - pixels(to_pil(recon)[0])).mean()
    assert near < far and full[0].size == (80, 64)
    with pytest.raises(ValueError, match="strength"):
        sd1.img2img(init, "x", denoising_strength=1.5)


def test_cli_img2img_and_bad_images(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (72, 64), "red").save(tmp_path / "in.png")
    assert main(["img2img", "a blue square", "--init", str(tmp_path / "in.png"), "--model", "tiny-sd1", "--steps",
                 "4", "--seed", "1", "--out", str(tmp_path / "out")]) == 0
    params = parse_infotext(read_infotext(tmp_path / "out" / "00000-1.png"))
    assert params["Denoising strength"] == "0.75" and (params["Size-1"], params["Size-2"]) == ("72", "64")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["img2img", "x", "--init", str(tmp_path / "broken.png"), "--model", "tiny-sd1"]) == 1
    assert "not a readable image" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd1-inpaint"])
@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpaint_keeps_pixels_outside_the_mask(name, fill):
    from PIL import Image

    pipe = load_pipeline(name)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = pixels(pipe.inpaint(init, mask, "a cat", steps=3, seed=2, mask_blur=2, inpainting_fill=fill)[0])
    original = pixels(init)
    assert np.array_equal(out[:8], original[:8]) and np.array_equal(out[:, 56:], original[:, 56:])
    assert np.abs(out[24:40, 24:40] - original[24:40, 24:40]).mean() > 5
    inverted = pixels(pipe.inpaint(init, mask, "a cat", steps=3, seed=2, mask_blur=0, inpainting_mask_invert=True)[0])
    assert np.array_equal(inverted[16:48, 16:48], original[16:48, 16:48])


def test_inpaint_rejects_a_wrong_size_mask(sd1):
    from PIL import Image

    with pytest.raises(ValueError, match="mask is 32x32 but the image is 64x64"):
        sd1.inpaint(Image.new("RGB", (64, 64)), Image.new("L", (32, 32)), "x")


def test_txt2img_on_a_9_channel_model():
    assert load_pipeline("tiny-sd1-inpaint").txt2img("x", steps=2, seed=0)[0].size == (64, 64)


def test_cli_inpaint(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    assert main(["inpaint", "blue", "--init", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--model", "tiny-sd1", "--steps", "3", "--seed", "4", "--mask-blur", "0",
                 "--out", str(tmp_path / "out")]) == 0
    out = pixels(Image.open(tmp_path / "out" / "00000-4.png"))
    assert (out[:, 40:] == [255, 0, 0]).all()
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    assert main(["inpaint", "x", "--init", str(tmp_path / "in.png"), "--mask", str(tmp_path / "small.png"),
                 "--model", "tiny-sd1"]) == 1


def test_the_real_sd_parsers_package_reads_our_pngs(sd1, tmp_path):
    from sd_parsers import ParserManager

    result = generate(sd1, GenerationRequest(prompt="a red circle, (big:1.2)", negative_prompt="blurry", steps=2,
                                            seed=3, sampler="DPM++ 2M Karras"))
    save_png(result.images[0], tmp_path / "x.png", result.infotexts[0])
    info = ParserManager().parse(tmp_path / "x.png")
    assert info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == ["a red circle, (big:1.2)"]
    assert [p.value for p in info.negative_prompts] == ["blurry"]
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters == {"scheduler": "Karras", "cfg_scale": "7.0", "seed": "3", "steps": "2"}


def test_only_masked_inpaint_works_on_a_crop_and_keeps_the_rest(sd1):
    from PIL import Image

    from stable_diffusion.inpaint import crop_box

    mask = Image.new("L", (160, 96), 0)
    mask.paste(255, (100, 40, 120, 56))
    assert crop_box(mask, 8, 64, 64) == (92, 30, 128, 66)  # 20x16 box + 8 padding = 36x32 -> square 36x36
    assert crop_box(mask, 50, 64, 64) == (50, 0, 160, 96)  # past the edges: clipped to the image
    init = Image.fromarray(np.random.default_rng(2).integers(0, 255, (96, 160, 3), dtype=np.uint8))
    out = pixels(sd1.inpaint(init, mask, "a cat", steps=3, seed=1, mask_blur=0, inpaint_full_res=True,
                             inpaint_full_res_padding=8, width=64, height=64)[0])
    original = pixels(init)
    assert out.shape == original.shape
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], original[keep])
    assert np.abs(out[40:56, 100:120] - original[40:56, 100:120]).mean() > 5


def test_eta_reaches_the_sampler(sd1):
    euler = pixels(sd1.txt2img("a cat", steps=3, seed=5, sampler="Euler")[0])
    no_noise = pixels(sd1.txt2img("a cat", steps=3, seed=5, sampler="Euler a", eta=0.0)[0])
    ancestral = pixels(sd1.txt2img("a cat", steps=3, seed=5, sampler="Euler a")[0])
    assert np.array_equal(euler, no_noise) and not np.array_equal(euler, ancestral)
