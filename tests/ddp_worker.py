"""Run under torchrun by test_training: train the smoke config, then write a digest of this rank's weights."""

import hashlib
import sys
from pathlib import Path

import torch

from stable_diffusion.training.config import load_config
from stable_diffusion.training.train import Trainer

config, out = load_config(sys.argv[1]), Path(sys.argv[2])
trainer = Trainer(config, progress=False)
trainer.run()
digest = hashlib.sha256()
for name, tensor in sorted(trainer.pipe.unet.state_dict().items()) + sorted(trainer.pipe.text_encoder.state_dict().items()):
    digest.update(name.encode() + tensor.detach().float().numpy().tobytes())
(out / f"rank{trainer.dist.rank}.txt").write_text(digest.hexdigest())
torch.distributed.destroy_process_group()
