"""docs/controlnet-layouts.png: held-out free layouts (top) and what the built-in model draws for their captions
with the built-in ControlNet (second row), with it and CFG only above sigma 5 (NGMS 5 on every step, third row)
and without it (bottom); 20 Euler a steps, CFG 7, seeds 0..7.

    python experiments/scripts/controlnet_figure.py [--out docs/controlnet-layouts.png]
"""

from __future__ import annotations

import argparse

from PIL import Image

from stable_diffusion import load_pipeline
from stable_diffusion.control import ControlUnit
from stable_diffusion.images import grid
from stable_diffusion.shapes.scenes import heldout_scenes, render


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/controlnet-layouts.png")
    args = parser.parse_args()
    pipe = load_pipeline()
    scenes = heldout_scenes(4, seed=11, free=True) + heldout_scenes(4, seed=12, two_object=True, free=True)
    layouts, controlled, ngms, plain = [], [], [], []
    for i, scene in enumerate(scenes):
        layout = render(scene, 64, layout=True)
        layouts.append(layout)
        for row, weight, skip in ((controlled, 1.0, 0.0), (ngms, 1.0, 5.0), (plain, 0.0, 0.0)):
            row.append(pipe.txt2img(scene.caption, steps=20, sampler="Euler a", cfg_scale=7.0, seed=i,
                                    s_min_uncond=skip, s_min_uncond_all=True,
                                    controls=[ControlUnit(layout, "builtin", weight=weight)])[0])
    tiles = [image.resize((128, 128), Image.Resampling.NEAREST) for image in layouts + controlled + ngms + plain]
    grid(tiles, len(scenes)).save(args.out, optimize=True)
    for i, scene in enumerate(scenes):
        print(i, scene.caption)


if __name__ == "__main__":
    main()
