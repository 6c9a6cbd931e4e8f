"""Our UNet step, VAE decode, text encoder and whole txt2img against diffusers / transformers and OpenVINO, same
weights and inputs, one run.

SD1.5 sizes, fp32, CPU by default: UNet at 512px (latent 64x64), batch 2 (CFG's cond + uncond) with a 77x768
context; VAE decode of one 64x64 latent to 512x512; text encoder on 2 prompts; txt2img: a 512x512 image in
``--steps`` (20) Euler steps with CFG 7 and a negative prompt, ours (``Pipeline.txt2img``) against diffusers'
``StableDiffusionPipeline`` (PIL images out of both); builtin: one image from the built-in model at its native
64x64 in 20 Euler a steps with CFG 7, against diffusers' pipeline reading the same weights from a diffusers folder
we write; sdxl: SDXL's UNet (2.6 B parameters) at 1024px (latent 128x128), batch 2, 77x2048 context, against
diffusers' UNet holding the same tensors (no OpenVINO column: converting it traces a second copy of the weights,
~20 GB beside the 10 GB ones, more than this machine's 24 GB). Contenders: ours (torch), ours on ``--backend
openvino`` (exact mode: fp32), diffusers, and, for the UNet and the VAE, "OpenVINO": diffusers' module converted by
``openvino.convert_model`` and compiled at fp32 as FastSD CPU / optimum-intel do (the two OpenVINO columns appear
when openvino is installed). Prints the best-of-N time of each, the ratio of our best to the best peer (< 1 means
we are faster), achieved GFLOP/s of ours (torch), and the peak extra RSS during the call.

    python benchmarks/bench_components.py [--repeats 3] [--txt2img-repeats 1] [--steps 20] [--device cpu]
        [--components unet,vae,text,txt2img,builtin,sdxl]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from stable_diffusion.checkpoints.keymap import rename, unet_module_map, vae_to_diffusers
from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline, load_pipeline


class PeakRSS:
    """Samples this process's RSS in a thread; ``extra`` is the peak above the level at start (bytes)."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process(os.getpid())
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start


def measure(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
            ) -> tuple[dict[str, float], dict[str, int]]:
    """Best-of-``repeats`` seconds of each contender, timed alternately after a warm-up of each (so drift in the
    machine's speed hits all alike), and the peak extra RSS of each from the warm-up run (the RSS sampling
    thread competes for the GIL and a core, so it stays out of the timed runs)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks = {}
    for name, fn in fns.items():
        with PeakRSS() as rss:
            fn()
        peaks[name] = rss.extra
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}, peaks


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build(device: torch.device):
    """Our SD1.5-size pipeline with random weights, and diffusers/transformers models holding the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ours = Pipeline.from_config(preset("sd1"), seed=0)
    theirs_unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    theirs_unet.load_state_dict(rename(ours.unet.state_dict(), unet_module_map(ours.config.unet)), strict=True)
    theirs_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    theirs_vae.load_state_dict(vae_to_diffusers(ours.vae.state_dict(), ours.config.vae), strict=True)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768))
    text_sd = ours.text_encoder.state_dict()
    if not hasattr(text, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    text.load_state_dict(text_sd, strict=True)
    for m in (theirs_unet, theirs_vae, text):
        m.eval().to(device)
    ours.to(device)
    return ours, theirs_unet, theirs_vae, text


def diffusers_txt2img(ours: Pipeline, unet, vae, text):
    """diffusers' StableDiffusionPipeline over the same modules, Euler (the scheduler SD1.5 ships is PNDM; Euler
    makes the two pipelines do the same work per step), no safety checker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=ours.tokenizer.vocab, merges=ours.tokenizer.merges, pad_token="<|endoftext|>",
                              model_max_length=77)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_backend(pipe: Pipeline, backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``pipe`` on ``backend`` (switching keeps each backend's compiled models)."""
    def run() -> object:
        pipe.set_backend(backend)
        return fn()
    return run


def openvino_installed() -> bool:
    from stable_diffusion.backends.openvino import openvino_version

    return openvino_version() is not None


def openvino_peer(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    """A diffusers module as FastSD CPU / optimum-intel run it: ``openvino.convert_model`` with example inputs,
    compiled for the CPU at fp32 (dynamic shapes, the plugin's defaults otherwise)."""
    import openvino as ov

    with torch.no_grad():
        model = ov.convert_model(module, example_input=example)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feeds = [t.numpy() for t in example]
    return lambda: compiled(feeds)[0]


def builtin_cases(device: torch.device, folder: Path) -> dict[str, Callable[[], object]]:
    """One 64x64 image from the built-in model, 20 Euler a steps, CFG 7: ours (each backend) and diffusers'
    over the same weights (written to ``folder`` as a diffusers folder and read back by ``from_pretrained``)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    ours = load_pipeline(device=device)
    ours.save(folder, format="diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True).to(device)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a small red circle at the top left on a white background"
    image = lambda: ours.txt2img(prompt, steps=20, cfg_scale=7.0, sampler="Euler a", seed=1)  # noqa: E731
    cases = {"ours": with_backend(ours, "torch", image)}
    if openvino_installed() and device.type == "cpu":
        cases["ours openvino"] = with_backend(ours, "openvino", image)
    cases["diffusers"] = lambda: pipe(prompt, num_inference_steps=20, guidance_scale=7.0, height=64, width=64,
                                      generator=torch.Generator().manual_seed(1)).images
    return cases


def sd15_cases(device: torch.device, steps: int) -> dict[str, dict[str, Callable[[], object]]]:
    """The SD1.5-size components and txt2img: each contender over the same random weights."""
    ours, unet, vae, text = build(device)
    x = torch.randn(2, 4, 64, 64, device=device)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 77, 768, device=device)
    z = torch.randn(1, 4, 64, 64, device=device)
    prompt, negative = "a photo of an astronaut riding a horse on mars", "blurry, low quality"
    ids = ours.tokenizer([prompt, ""]).to(device)
    pipe = diffusers_txt2img(ours, unet, vae, text)
    generate = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.0,
                    height=512, width=512)
    openvino = openvino_installed() and device.type == "cpu"
    cases: dict[str, dict[str, Callable[[], object]]] = {
        "unet": {"ours": lambda: ours.unet(x, t, context), "diffusers": lambda: unet(x, t, context).sample},
        "vae": {"ours": lambda: ours.vae.decode(z), "diffusers": lambda: vae.decode(z).sample},
        "text": {"ours": lambda: ours.text_encoder(ids), "diffusers": lambda: text(ids).last_hidden_state},
        "txt2img": {"ours": lambda: ours.txt2img(prompt, negative_prompt=negative, steps=steps, cfg_scale=7.0,
                                                 sampler="Euler", seed=1, width=512, height=512),
                    "diffusers": lambda: pipe(**generate, generator=torch.Generator().manual_seed(1)).images},
    }
    for name in ("unet", "vae", "txt2img"):
        cases[name] = {"ours": with_backend(ours, "torch", cases[name]["ours"]),
                       **({"ours openvino": with_backend(ours, "openvino", cases[name]["ours"])} if openvino else {}),
                       "diffusers": cases[name]["diffusers"]}
    if openvino:
        cases["unet"]["OpenVINO"] = openvino_peer(unet, (x, t, context))
        cases["vae"]["OpenVINO"] = openvino_peer(_Decoder(vae), (z,))
    return cases


def sdxl_cases(device: torch.device) -> dict[str, Callable[[], object]]:
    """SDXL's UNet step at 1024 px, ours and diffusers'. diffusers' module is built on the meta device and given our
    tensors (``assign=True``): two fp32 copies of 10 GB would not leave room for the activations."""
    from diffusers import UNet2DConditionModel

    from stable_diffusion.checkpoints.diffusers_format import unet_to_diffusers
    from stable_diffusion.models.unet import UNetModel

    config = preset("sdxl")
    ours = UNetModel(config.unet).eval().to(device)
    kwargs = unet_to_diffusers(config.unet, 128, config.size_embed_dim)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{k: v for k, v in kwargs.items() if not k.startswith("_")})
    theirs.load_state_dict(rename(ours.state_dict(), unet_module_map(config.unet)), strict=True, assign=True)
    theirs.eval()
    x = torch.randn(2, 4, 128, 128, device=device)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 77, 2048, device=device)
    pooled = torch.randn(2, 1280, device=device)
    size = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2, device=device)  # original, crop, target
    y = torch.randn(2, config.unet.adm_in_channels, device=device)  # ours takes pooled + size embedding as one
    added = {"text_embeds": pooled, "time_ids": size}
    return {"ours": lambda: ours(x, t, context, y),
            "diffusers": lambda: theirs(x, t, context, added_cond_kwargs=added).sample}


class _Decoder(torch.nn.Module):
    """diffusers' VAE decode as a module of its own (what the converter traces)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


COLUMNS = ("ours", "ours openvino", "diffusers", "OpenVINO")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--txt2img-repeats", type=int, default=1, help="timed runs of the whole image (minutes each)")
    parser.add_argument("--steps", type=int, default=20, help="the txt2img row's Euler steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--components", default="unet,vae,text,txt2img,builtin,sdxl")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = args.components.split(",")
    unknown = sorted(set(names) - {"unet", "vae", "text", "txt2img", "builtin", "sdxl"})
    if unknown:
        parser.error(f"unknown components {unknown}")
    torch.manual_seed(0)
    if "sdxl" in names:  # first and alone: its 10 GB of weights are freed before the SD1.5 models are built
        names = ["sdxl"] + [n for n in names if n != "sdxl"]
    cases: dict[str, dict[str, Callable[[], object]]] = {}
    workdir = tempfile.TemporaryDirectory()  # the built-in model as a diffusers folder, kept while timing

    def contenders(name: str) -> dict[str, Callable[[], object]]:
        if name == "sdxl":
            return sdxl_cases(device)
        if name == "builtin":
            return builtin_cases(device, Path(workdir.name) / "builtin")
        if not cases:
            cases.update(sd15_cases(device, args.steps))
        return cases[name]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, fp32, best of "
          f"{args.repeats} ({args.txt2img_repeats} for txt2img) alternating runs after 1 warm-up; ratio = our best / "
          "the best peer")
    print(f"{'component':<10}" + "".join(f"{c + ' s':>17}" for c in COLUMNS)
          + f"{'ratio':>8}{'ours GFLOP/s':>14}" + "".join(f"{c + ' +MB':>18}" for c in COLUMNS))
    with torch.inference_mode():
        for name in names:
            fns = contenders(name)
            ours = fns["ours"]
            gflop = flops(ours) / 1e9
            repeats = args.txt2img_repeats if name == "txt2img" else args.repeats
            times, peaks = measure(fns, repeats, device)
            best_ours = min(v for k, v in times.items() if k.startswith("ours"))
            best_peer = min(v for k, v in times.items() if not k.startswith("ours"))
            cell = lambda table, c, f: f"{table[c]:{f}}" if c in table else "-"  # noqa: E731
            print(f"{name:<10}" + "".join(f"{cell(times, c, '.3f'):>17}" for c in COLUMNS)
                  + f"{best_ours / best_peer:>8.3f}{gflop / times['ours']:>14.1f}"
                  + "".join(f"{cell({k: v / 2**20 for k, v in peaks.items()}, c, '.0f'):>18}" for c in COLUMNS),
                  flush=True)
            del fns, ours
            gc.collect()


if __name__ == "__main__":
    main()
