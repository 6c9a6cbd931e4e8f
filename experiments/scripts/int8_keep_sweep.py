"""Which UNet layers hurt the built-in model most in int8 (issue 34: "keeping the layers that hurt quality most in
higher precision (measure which)"): the built-in model's adherence (`sd eval`'s held-out prompts, Euler a, 20 steps)
with the UNet quantized by the product's recipe (backends/int8.py) but a different set of layers kept in fp32
(OpenVINO node-name patterns). Each variant gets its own cache folder, so each is quantized afresh (2026-12-06;
experiments/README.md).

    python experiments/scripts/int8_keep_sweep.py --n 200 base none attention emb+attention-no-ff ...
"""

import argparse
import os
import tempfile

import torch

from stable_diffusion import load_pipeline
from stable_diffusion.backends import int8
from stable_diffusion.shapes.evaluate import evaluate

BASE = (r".*time_embed.*", r".*input_blocks\.0\.0.*", r".*owner\.out\..*")  # the recipe until 2026-12-06
VARIANTS = {
    "none": (),
    "base": BASE,
    "shipped": int8.KEEP_FP32,  # since 2026-12-06: emb+cross-attention's layers
    "attention": (*BASE, r".*transformer_blocks.*"),
    "cross-attention": (*BASE, r".*attn2.*"),
    "self-attention": (*BASE, r".*attn1.*"),
    "attention-projections": (*BASE, r".*proj_in.*", r".*proj_out.*"),
    "resblock-emb": (*BASE, r".*emb_layers.*"),
    "skip-connections": (*BASE, r".*skip_connection.*"),
    "middle": (*BASE, r".*middle_block.*"),
    "output-blocks": (*BASE, r".*output_blocks.*"),
    "input-blocks": (*BASE, r".*input_blocks.*"),
    "emb+context-kv": (*BASE, r".*emb_layers.*", r".*attn2\.to_k.*", r".*attn2\.to_v.*"),
    "emb+cross-attention": (*BASE, r".*emb_layers.*", r".*attn2.*"),
    "emb+attention-no-ff": (*BASE, r".*emb_layers.*", r".*attn1.*", r".*attn2.*"),
    "emb+attention": (*BASE, r".*emb_layers.*", r".*transformer_blocks.*"),
    "emb+queries-keys": (*BASE, r".*emb_layers.*", r".*attn1\.to_q.*", r".*attn1\.to_k.*", r".*attn2\.to_q.*"),
    "attention-no-ff": (*BASE, r".*attn1.*", r".*attn2.*"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.variants:
        with tempfile.TemporaryDirectory(prefix="int8-sweep-") as cache:
            os.environ["SD_CACHE_DIR"] = cache
            int8.KEEP_FP32 = VARIANTS[name]
            pipe = load_pipeline("builtin", int8=True)
            result = evaluate(pipe, ["Euler a"], [20], n=args.n, chance=False)
            row = result["rows"][0]
            print(f"{name}: one-object {row['one_object']:.1%}, two-object {row['two_object']:.1%}", flush=True)


if __name__ == "__main__":
    main()
