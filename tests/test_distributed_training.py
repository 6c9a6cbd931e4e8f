"""Training across processes: data parallel on one node and on two (torchrun, gloo), FSDP against DDP on a tiny
SDXL-layout model with exact resume in both, and gradient checkpointing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline
from stable_diffusion.training.train import train

from .helpers import SMOKE, smoke_config
from .test_training import _weights


def _torchrun(config: Path, out: Path, *launcher: str, **env: str) -> subprocess.Popen:
    worker = Path(__file__).with_name("ddp_worker.py")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, str(worker), str(config),
                             str(out)], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_data_parallel_on_one_node_and_on_two_nodes_trains_the_same_weights(tmp_path):
    """torchrun with 2 processes on one node, and as 2 "nodes" of 1 process each (multi-node rendezvous on
    127.0.0.1, gloo): every rank ends with the same weights, and both layouts with the same as each other."""
    from .live_server import free_port

    digests = {}
    for layout in ("one node", "two nodes"):
        out = tmp_path / layout.replace(" ", "_")
        out.mkdir()
        config = out / "ddp.toml"
        config.write_text(SMOKE.read_text().replace('save_path = "runs/smoke"', f'save_path = "{out / "run"}"'))
        port = str(free_port())
        if layout == "one node":
            launchers = [_torchrun(config, out, "--nproc_per_node", "2", "--master_port", port)]
        else:
            launchers = [_torchrun(config, out, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                                   "--master_addr", "127.0.0.1", "--master_port", port) for node in (0, 1)]
        for launcher in launchers:
            assert launcher.wait(300) == 0, launcher.stderr.read().decode()[-2000:]
        digests[layout] = [(out / f"rank{r}.txt").read_text() for r in range(2)]
    assert digests["one node"][0] == digests["one node"][1] and len(digests["one node"][0]) > 10
    assert digests["two nodes"] == digests["one node"]


def test_fsdp_trains_an_sdxl_layout_model_as_ddp_does_and_resumes_exactly(tmp_path):
    """[train] strategy = "fsdp" (2 processes, gloo): the tiny SDXL-layout model's loss curve and weights are
    DDP's within float tolerance; a run killed after a checkpoint and resumed ends exactly as one that was not,
    sharded or not."""
    from .live_server import free_port

    def run(name: str, strategy: str, **env: str) -> Path:
        out = tmp_path / name
        out.mkdir(exist_ok=True)
        config = out / "run.toml"
        config.write_text(f"""[train]\nstages = ["unet"]\nbase_model = "tiny-sdxl"\nsteps = 4\nbatch_size = 2
save_every = 2\nlog_every = 1\nwarmup_steps = 1\nstrategy = "{strategy}"\nthreads = 1
save_path = "{out / 'run'}"\nexport_dtype = "fp32"\n[data]\nsize = 64\n""")
        launcher = _torchrun(config, out, "--nproc_per_node", "2", "--master_port", str(free_port()), **env)
        code = launcher.wait(300)
        assert code == (1 if env.get("SD_CRASH_AT") else 0), launcher.stderr.read().decode()[-2000:]
        return out

    ddp, fsdp = run("ddp", "ddp"), run("fsdp", "fsdp")
    curves = [[json.loads(line) for line in (out / "run" / "loss.jsonl").read_text().splitlines()]
              for out in (ddp, fsdp)]
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]] == [1, 2, 3, 4]
    for a, b in zip(*curves, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4) and math.isclose(a["grad_norm"], b["grad_norm"],
                                                                               rel_tol=1e-3)
    theirs, ours = _weights(ddp / "run" / "model.safetensors"), _weights(fsdp / "run" / "model.safetensors")
    # AdamW normalises each gradient, so a weight whose gradient is near zero may move by up to the learning rate
    # on a float-rounding difference: no weight differs by more than the sum of the steps' learning rates, and
    # nearly all agree to 1e-5
    steps = sum(r["lr"] for r in curves[0])
    assert max(float((theirs[k] - ours[k]).abs().max()) for k in theirs) <= steps
    assert sum(torch.allclose(theirs[k], ours[k], atol=1e-5) for k in theirs) >= 0.9 * len(theirs)
    assert (fsdp / "rank0.txt").read_text() == (fsdp / "rank1.txt").read_text()
    for strategy, straight in (("fsdp", fsdp), ("ddp", ddp)):  # resume, in each strategy
        run(f"{strategy}-resumed", strategy, SD_CRASH_AT="2")  # dies after its step-2 checkpoint
        resumed = run(f"{strategy}-resumed", strategy, SD_RESUME="1")
        assert (resumed / "rank0.txt").read_text() == (straight / "rank0.txt").read_text()
        assert (resumed / "run" / "loss.jsonl").read_text().count("\n") == 4


def test_gradient_checkpointing_gives_the_same_gradients_and_weights(tmp_path):
    """[train] gradient_checkpointing recomputes each UNet block in backward: the same gradients, the same run."""
    from stable_diffusion.models.unet import set_gradient_checkpointing

    pipe = Pipeline.from_config(preset("tiny-sd1"), seed=0)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
    context = torch.randn(2, 77, pipe.config.unet.context_dim, generator=torch.Generator().manual_seed(2))
    grads = []
    for enabled in (False, True):
        set_gradient_checkpointing(pipe.unet, enabled)
        pipe.unet.zero_grad()
        pipe.unet(x, t, context).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in pipe.unet.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
    plain = _weights(train(smoke_config(tmp_path / "plain"), progress=False))
    config = smoke_config(tmp_path / "ckpt", gradient_checkpointing=True)
    checkpointed = _weights(train(config, progress=False))
    assert all(torch.allclose(plain[k].float(), checkpointed[k].float(), atol=2e-3) for k in plain)
