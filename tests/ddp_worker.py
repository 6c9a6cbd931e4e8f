"""Run under torchrun by test_training: train a config, then write a digest of this rank's weights.
SD_CRASH_AT=N: die right after the checkpoint of step N (a crash); SD_RESUME=1: resume from the checkpoints."""

import hashlib
import os
import sys
from pathlib import Path

import torch

from stable_diffusion.training.config import load_config
from stable_diffusion.training.loop import StageRunner
from stable_diffusion.training.train import Trainer

crash_at = int(os.environ.get("SD_CRASH_AT", "0"))
if crash_at:
    save = StageRunner.save

    def save_then_crash(self: StageRunner) -> None:
        save(self)
        if self.step == crash_at:
            os._exit(3)

    StageRunner.save = save_then_crash

config, out = load_config(sys.argv[1]), Path(sys.argv[2])
trainer = Trainer(config, resume=os.environ.get("SD_RESUME") == "1", progress=False)
trainer.run()
digest = hashlib.sha256()
for name, tensor in sorted(trainer.pipe.unet.state_dict().items()) + sorted(trainer.pipe.text_encoder.state_dict().items()):
    digest.update(name.encode() + tensor.detach().float().numpy().tobytes())
(out / f"rank{trainer.dist.rank}.txt").write_text(digest.hexdigest())
torch.distributed.destroy_process_group()
