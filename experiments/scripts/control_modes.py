"""Placement of free-layout scenes under each ControlNet control mode (2026-12-06; experiments/README.md):
    python experiments/scripts/control_modes.py builtin 40 0,2,1 [two]"""

import sys

import numpy as np
import torch

from stable_diffusion.control import ControlUnit
from stable_diffusion.pipeline import load_pipeline
from stable_diffusion.shapes.adherence import judge, read_image
from stable_diffusion.shapes.control_eval import iou, object_mask
from stable_diffusion.shapes.scenes import BACKGROUNDS, heldout_scenes, render


def main() -> None:
    torch.set_num_threads(2)
    control, n, modes = sys.argv[1], int(sys.argv[2]), [int(m) for m in sys.argv[3].split(",")]
    two = len(sys.argv) > 4 and sys.argv[4] == "two"
    pipe = load_pipeline("builtin")
    scenes = heldout_scenes(n, seed=3 + two, two_object=two, free=True)
    for mode in modes:
        ious, verdicts = [], []
        for i, scene in enumerate(scenes):
            drawn = render(scene, 64, layout=True)
            image = pipe.txt2img(scene.caption, steps=20, sampler="Euler a", cfg_scale=7, seed=i, width=64, height=64,
                                 controls=[ControlUnit(drawn, control, resize_mode=0, control_mode=mode)])[0]
            ious.append(iou(object_mask(image, BACKGROUNDS[scene.background]), np.asarray(drawn.convert("L")) > 127))
            verdicts.append(judge(read_image(image), scene)["all"])
        print(f"mode {mode} two={two}: placed {np.mean([v >= 0.7 for v in ious]):.0%} mean IoU {np.mean(ious):.3f} "
              f"adherence {np.mean(verdicts):.0%}", flush=True)


if __name__ == "__main__":
    main()
