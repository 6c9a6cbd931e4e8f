"""DeepCache's skip branch (Ma et al. 2023): which branch keeps the built-in model's adherence, and what each costs.

For each branch, ``sd eval``'s held-out prompts (one and two objects) on the built-in model with ``--deepcache
INTERVAL`` cached at that branch, and the share of an SD1.5-size UNet's FLOPs that a cached step still runs
(512 px, batch 2). The product uses branch 0; the sweep patches the module that generate.py calls (note: ``import
stable_diffusion.generate as g`` binds the function the package exports, not the module, so the patch goes through
``sys.modules``).

    python experiments/scripts/deepcache_branch_sweep.py [--branches 0,1,2] [--interval 3] [--n 100]
        [--samplers "Euler a,Euler"] [--flops]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import stable_diffusion.generate  # noqa: F401 - the module, reached through sys.modules below
from stable_diffusion.models.configs import preset
from stable_diffusion.models.unet import UNetModel
from stable_diffusion.pipeline import load_pipeline
from stable_diffusion.shapes.evaluate import evaluate

GENERATE = sys.modules["stable_diffusion.generate"]


def flop_share(branch: int) -> float:
    """A cached step's FLOPs over a whole step's, SD1.5-size UNet at 512 px, batch 2."""
    unet = UNetModel(preset("sd1").unet).eval()
    x, t, context = torch.randn(2, 4, 64, 64), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as whole:
            _, feature = unet.forward_deep(x, t, context, branch=branch)
        with FlopCounterMode(display=False) as shallow:
            unet.forward_shallow(x, t, context, feature, branch=branch)
    return shallow.get_total_flops() / whole.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branches", default="0,1,2")
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--samplers", default="Euler a,Euler")
    parser.add_argument("--flops", action="store_true", help="also the SD1.5-size FLOP share of a cached step")
    args = parser.parse_args()
    pipe = load_pipeline()
    samplers = [s.strip() for s in args.samplers.split(",")]
    print(f"built-in model, 20 steps, n = {args.n} per kind, DeepCache interval {args.interval}")
    print("| branch | sampler | one-object | two-object | SD1.5 cached-step FLOPs |")
    print("|---|---|---|---|---|")
    original = GENERATE.deep_cache
    for branch in ["off", *args.branches.split(",")]:
        if branch == "off":
            pipe.deepcache = None
        else:
            pipe.deepcache = args.interval
            GENERATE.deep_cache = lambda unet, interval, b=int(branch): original(unet, interval, branch=b)
        try:
            result = evaluate(pipe, samplers, [20], n=args.n, chance=False)
        finally:
            GENERATE.deep_cache = original
        share = f"{flop_share(int(branch)):.0%}" if args.flops and branch != "off" else ""
        for row in result["rows"]:
            print(f"| {branch} | {row['sampler']} | {row['one_object']:.0%} | {row['two_object']:.0%} | {share} |",
                  flush=True)


if __name__ == "__main__":
    main()
