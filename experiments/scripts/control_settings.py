"""Placement of free-layout scenes with the built-in ControlNet under sampling or unit settings (2026-12-06;
experiments/README.md). Each SETTING is JSON: txt2img fields (cfg_scale, sampler, steps, s_min_uncond,
s_min_uncond_all, ...), and "unit" for the ControlUnit's (weight, control_mode, ...). The held-out scenes are
`sd eval --control`'s free ones (same seeds); misses are listed with the IoU of the VAE's reconstruction of the
true scene (below 0.7: even the decoder cannot place it).

    python experiments/scripts/control_settings.py builtin 100 '{}' '{"s_min_uncond": 5, "s_min_uncond_all": true}'
    python experiments/scripts/control_settings.py builtin 40 '{"unit": {"control_mode": 2}}' --two
"""

import argparse
import json

import numpy as np
import torch

from stable_diffusion.control import ControlUnit
from stable_diffusion.pipeline import load_pipeline
from stable_diffusion.shapes.adherence import judge, read_image
from stable_diffusion.shapes.control_eval import KINDS, iou, object_mask
from stable_diffusion.shapes.evaluate import vae_reconstruct
from stable_diffusion.shapes.scenes import BACKGROUNDS, heldout_scenes, render


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("control")
    parser.add_argument("n", type=int)
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--two", action="store_true", help="two-object free layouts instead of single objects")
    parser.add_argument("--seed", type=int, default=0, help="the prompt set, as `sd eval --control --seed`")
    parser.add_argument("--model", default="builtin", help="the base model (a fine-tuned decoder, say)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    kind = "two objects, free layout" if args.two else "one object, free layout"
    pipe = load_pipeline(args.model)
    scenes = heldout_scenes(args.n, seed=args.seed + 1 + list(KINDS).index(kind), two_object=args.two, free=True)
    drawn = [np.asarray(render(s, 64, layout=True).convert("L")) > 127 for s in scenes]
    rebuilt = vae_reconstruct(pipe, [render(s, 64) for s in scenes])[2]
    ceiling = [iou(object_mask(im, BACKGROUNDS[s.background]), d) for im, s, d in zip(rebuilt, scenes, drawn)]
    for setting in args.settings:
        fields = {"steps": 20, "sampler": "Euler a", "cfg_scale": 7.0, **json.loads(setting)}
        unit = fields.pop("unit", {})
        ious, verdicts = [], []
        for i, scene in enumerate(scenes):
            layout = render(scene, 64, layout=True)
            image = pipe.txt2img(scene.caption, seed=args.seed + i, width=64, height=64,
                                 controls=[ControlUnit(layout, args.control, resize_mode=0, **unit)], **fields)[0]
            ious.append(iou(object_mask(image, BACKGROUNDS[scene.background]), drawn[i]))
            verdicts.append(judge(read_image(image), scene)["all"])
        misses = [f"{i}:{ious[i]:.2f}/{ceiling[i]:.2f}" for i in range(len(scenes)) if ious[i] < 0.7]
        print(f"{setting}: placed {np.mean([v >= 0.7 for v in ious]):.0%}, mean IoU {np.mean(ious):.3f}, "
              f"adherence {np.mean(verdicts):.0%}; VAE ceiling {np.mean([c >= 0.7 for c in ceiling]):.0%}; "
              f"misses (scene: IoU / VAE's IoU) {' '.join(misses)}")


if __name__ == "__main__":
    main()
