"""Flags shared by several ``sd`` commands: where and how a model runs (device, precision, offload, attention
slicing) and A1111's guidance skipping."""

from __future__ import annotations

import argparse

# --fast: every lever (README, Speed: their measured cost); DeepCache on the branch after the first level
FAST = {"int8": True, "int8_vae": True, "deepcache": 3, "deepcache_branch": "level", "tome": 0.5}


def device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="the networks' precision (latents and sampling stay fp32); default fp32 on the CPU, fp16 on "
                        "a GPU")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default=None,
                   help="low memory: weights on the device only while their component (model) or layer "
                        "(sequential) runs; on a CPU, only the running part of a .safetensors model stays resident")
    p.add_argument("--attention-slicing", type=_slicing_arg, default=None, metavar="MIB|auto",
                   help="low memory: attention in query slices of at most MIB of scores (auto: a quarter of the "
                        "free memory)")
    p.add_argument("--backend", choices=["torch", "openvino"], default=None,
                   help="what runs the UNet and VAE decoder: torch (default) or openvino (CPU, fp32, exact; pip "
                        "install \".[openvino]\"; converted once per model and cached in ~/.cache/stable_diffusion)")
    p.add_argument("--int8", action="store_true",
                   help="fast, approximate: the UNet in int8 (NNCF post-training quantization, calibrated once per "
                        "model on a few generations; implies --backend openvino)")
    p.add_argument("--int8-vae", action="store_true",
                   help="fast, approximate: the VAE decoder in int8 (as --int8, calibrated on the latents it "
                        "decodes; about 5x faster; implies --backend openvino)")
    p.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="fast, approximate: the whole UNet every N steps, its deep features reused between "
                        "(DeepCache, Ma et al. 2023); 3 is about 2x faster")
    p.add_argument("--deepcache-branch", type=_branch_arg, default=None, metavar="B|level",
                   help="with --deepcache: the skip branch whose feature is reused (0, the default without --fast: "
                        "only the first input and last output block run between whole passes; deeper branches run "
                        "more, cost less quality; level, --fast's: the whole highest-resolution level)")
    p.add_argument("--tome", type=float, default=None, metavar="RATIO",
                   help="fast, approximate: merge this share of the tokens (0-0.9) in the full-resolution "
                        "self-attention (ToMe for SD, Bolya & Hoffman 2023)")
    p.add_argument("--fast", action="store_true",
                   help=f"every fast lever: --int8 --int8-vae --deepcache {FAST['deepcache']} --deepcache-branch "
                        f"{FAST['deepcache_branch']} --tome {FAST['tome']} (each flag given explicitly wins); quality "
                        "cost in README's Speed section")


def _branch_arg(text: str) -> int | str:
    """A whole number, or the text as given (load_pipeline accepts "level" and names any other value's fault)."""
    try:
        return int(text)
    except ValueError:
        return text


def _slicing_arg(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"takes 'auto' or a size in MiB (a whole number >= 1), not {text!r}")
    return int(text)


def run_options(args: argparse.Namespace):
    """The RunOptions (device, dtype, offload, attention slicing, backend, fast levers) that the flags ask for."""
    from ..pipeline import RunOptions

    fast = FAST if args.fast else {"int8": False, "int8_vae": False, "deepcache": None, "deepcache_branch": 0,
                                   "tome": None}

    def chosen(name: str):
        value = getattr(args, name)
        return value if value is not None else fast[name]
    return RunOptions(args.device, args.dtype, args.offload, args.attention_slicing, args.backend,
                      args.int8 or fast["int8"], chosen("deepcache"), chosen("tome"), chosen("deepcache_branch"),
                      args.int8_vae or fast["int8_vae"])


def guidance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ngms", type=float, default=0.0, metavar="SIGMA",
                   help="A1111's NGMS: no CFG below this sigma (the last, low-noise steps), on every other step")
    p.add_argument("--ngms-all-steps", action="store_true", help="with --ngms: on every step")
    p.add_argument("--skip-early-cfg", type=float, default=0.0, metavar="FRACTION",
                   help="A1111's Skip Early CFG: no CFG on this fraction of the first steps")


def guidance_skip(args: argparse.Namespace) -> dict:
    return {"s_min_uncond": args.ngms, "s_min_uncond_all": args.ngms_all_steps,
            "skip_early_cond": args.skip_early_cfg}


def size_arg(text: str, flag: str) -> tuple[int, int]:
    """A ``WIDTHxHEIGHT`` flag value; a ValueError naming the flag otherwise."""
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise ValueError(f"{flag} takes WIDTHxHEIGHT, e.g. 512x512, not {text!r}")
    return int(w), int(h)
