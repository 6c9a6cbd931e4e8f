"""The optimisation loop every stage shares: AdamW with linear warm-up then cosine decay, gradient
accumulation and clipping, mixed precision, an EMA of the weights, data parallelism under torchrun
(DistributedDataParallel, or FSDP with ``strategy = "fsdp"``; gloo on CPU, nccl on GPU), atomic checkpoints and
an exact ``--resume``.

Batches, timesteps and noise are pure functions of (seed, rank, step), so the state to restore is only the
weights, EMA, optimiser, LR schedule, torch RNG and the step."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoints.errors import first_line
from ..checkpoints.io import atomic_write

Batch = Callable[[int, int], tuple]  # (step, micro-step) -> arguments of the loss module


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group if there is one (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class EMA:
    """Exponential moving average of parameters (Polyak averaging), kept in fp32 beside the model."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages follow the weights closely
        params = dict(module.named_parameters())
        names = list(self.shadow)
        # one multi-tensor call instead of one lerp per parameter (hundreds of small kernels per step on CPU)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1 - decay)

    @contextmanager
    def applied(self, module: nn.Module):
        """Temporarily put the averaged weights into ``module``."""
        params = dict(module.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for n, v in self.shadow.items():
            params[n].copy_(v.to(params[n].dtype))


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@dataclass
class StageSpec:
    name: str
    module: nn.Module  # forward(*batch) -> scalar loss
    steps: int
    learning_rate: float
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    save_every: int = 500
    log_every: int = 10
    strategy: str = "ddp"  # or "fsdp" (training/sharding.py) under torchrun


class StageRunner:
    """Runs one stage to ``spec.steps``, resuming from ``<out>/<name>-state.pt`` when asked."""

    def __init__(self, spec: StageSpec, out: Path, device: torch.device, world: Dist,
                 on_sample: Callable[[int], None] | None = None, sample_every: int = 0) -> None:
        self.spec, self.out, self.device, self.world = spec, out, device, world
        self.on_sample, self.sample_every = on_sample, sample_every
        self.sharded = world.world > 1 and spec.strategy == "fsdp"
        if self.sharded:  # before the optimiser and the EMA: they hold the shards
            from .sharding import shard

            shard(spec.module, device, world.world)
        trainable = [p for p in spec.module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"stage {spec.name}: nothing to train")
        # the fused kernel updates every tensor in one pass: ~85 -> ~10 ms a step for the built-in UNet on 2 cores
        fused = (device.type in ("cpu", "cuda") and not self.sharded) or None
        self.optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                           betas=spec.adam_betas, fused=fused)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(spec.warmup_steps, spec.steps))
        self.ema = EMA(spec.module, spec.ema_decay)
        self.step = 0
        self.model: nn.Module = spec.module
        if world.world > 1 and not self.sharded:
            ids = [world.local_rank] if device.type == "cuda" else None
            # static graph: the same parameters take part every step, and some never do (an SDXL text encoder's
            # layers after the penultimate one, whose output the UNet does not read)
            self.model = nn.parallel.DistributedDataParallel(spec.module, device_ids=ids, static_graph=True)
        self.scaler = torch.amp.GradScaler("cuda") if spec.mixed_precision == "fp16" else None

    @property
    def state_path(self) -> Path:
        return self.out / f"{self.spec.name}-state.pt"

    def state(self) -> dict:
        """The stage's state; sharded, as full tensors (a collective: every rank calls it)."""
        model, optimizer, ema = self.spec.module.state_dict(), self.optimizer.state_dict(), self.ema.shadow
        if self.sharded:
            from .sharding import full_state, full_tensors

            (model, optimizer), ema = full_state(self.spec.module, self.optimizer), full_tensors(ema)
        return {"step": self.step, "model": model, "ema": ema, "optimizer": optimizer,
                "schedule": self.schedule.state_dict(), "torch_rng": torch.get_rng_state(),
                "python_rng": list(random.getstate()[1])}

    def save(self) -> None:
        state = self.state() if self.world.main or self.sharded else None
        if self.world.main:
            atomic_write(self.state_path, lambda tmp: torch.save(state, tmp))
        if self.world.world > 1:
            dist.barrier()

    def load(self) -> bool:
        if not self.state_path.exists():
            return False
        if self.state_path.stat().st_size == 0:
            raise ValueError(f"cannot resume from {self.state_path}: the file is empty (it was never written "
                             f"whole); delete it to start the {self.spec.name} stage over")
        try:
            state = torch.load(self.state_path, map_location=self.device, weights_only=True)
            keys = {"step", "model", "ema", "optimizer", "schedule", "torch_rng", "python_rng"}
            if not isinstance(state, dict) or not keys <= set(state):
                raise ValueError(f"not a stage checkpoint (it lacks {sorted(keys - set(state or {}))})")
        except Exception as error:  # a truncated or foreign file: say so, never unpickle code
            raise ValueError(f"cannot resume from {self.state_path}: {first_line(error)}") from None
        if self.sharded:
            from .sharding import load_full_state, sharded_like

            load_full_state(self.spec.module, self.optimizer, state["model"], state["optimizer"])
            self.ema.shadow = sharded_like({k: v.float() for k, v in state["ema"].items()}, self.ema.shadow)
        else:
            self.spec.module.load_state_dict(state["model"])
            self.ema.shadow = {k: v.float() for k, v in state["ema"].items()}
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"].cpu())
        random.setstate((3, tuple(int(v) for v in state["python_rng"]), None))
        self.step = int(state["step"])
        return True

    def _autocast(self):
        if self.spec.mixed_precision == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.spec.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def run(self, batch: Batch, log: Callable[[dict], None], progress: bool = True) -> EMA:
        from tqdm import tqdm

        spec = self.spec
        bar = tqdm(total=spec.steps, initial=self.step, desc=spec.name, unit="step",
                   disable=not (progress and self.world.main))
        self.model.train()
        started = time.perf_counter()
        while self.step < spec.steps:
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(spec.grad_accum):
                with self._autocast():
                    loss = self.model(*batch(self.step, micro)) / spec.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                total += loss.item()
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            grad_norm = None
            if spec.grad_clip > 0:  # the norm before clipping is logged: a spike in it shows an instability
                grad_norm = torch.nn.utils.clip_grad_norm_(spec.module.parameters(), spec.grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # sharded: gathered on every rank (a collective)
                    grad_norm = grad_norm.full_tensor()
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.schedule.step()
            self.ema.update(spec.module, self.step)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            if self.world.main and (self.step % spec.log_every == 0 or self.step == spec.steps):
                record = {"stage": spec.name, "step": self.step, "loss": total, "lr": self.schedule.get_last_lr()[0],
                          "seconds": round(time.perf_counter() - started, 2)}
                if grad_norm is not None:
                    record["grad_norm"] = round(float(grad_norm), 5)  # read only here: no device sync per step
                log(record)
            if self.step % spec.save_every == 0 or self.step == spec.steps:
                self.save()
            if self.on_sample and self.sample_every and self.step % self.sample_every == 0 and self.world.main:
                self.model.eval()
                with self.ema.applied(spec.module):
                    self.on_sample(self.step)
                self.model.train()
        bar.close()
        self.model.eval()
        if self.sharded:  # whole, for the plain modules the trainer rebuilds after a sharded stage
            from .sharding import full_tensors

            self.ema.shadow = full_tensors(self.ema.shadow)
        return self.ema


class LossLog:
    """Appends JSON lines to ``loss.jsonl``; on resume, drops the lines of a stage past the resumed step. A line
    cut short by a crash is dropped too (the log is a record of the run, not its state)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and {"stage", "step"} <= set(record):
                records.append(record)
        return records

    def truncate(self, stage: str, step: int) -> None:
        """Keep the records of other stages and of ``stage`` up to ``step`` (0: none of it)."""
        if self.path.exists():
            kept = [r for r in self.records() if not (r["stage"] == stage and r["step"] > step)]
            atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
