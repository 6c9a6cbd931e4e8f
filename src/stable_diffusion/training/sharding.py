"""``[train] strategy = "fsdp"``: fully sharded data parallelism (Zhao et al. 2023, PyTorch FSDP; the per-module
``fully_shard`` API) for the denoiser stages. Each UNet block and then the whole loss module are sharded across
the ranks, so each rank keeps 1/world of the trainable weights' gradients, AdamW moments and EMA; a forward
gathers a block's weights just before it runs. Checkpoints hold full tensors (written by rank 0, read back into
the shards by every rank), so a sharded run resumes exactly; after the stage the weights are gathered into plain
modules again for export and for the stages after it."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..models.unet import TimestepEmbedSequential


def shard(module: nn.Module, device: torch.device, world: int) -> None:
    """Shard every UNet / ControlNet block of ``module``, then the rest of it, over ``world`` ranks (in place)."""
    mesh = init_device_mesh(device.type, (world,))
    for parameter in module.parameters():  # FSDP shards contiguous tensors (a loaded UNet may be channels-last)
        parameter.data = parameter.data.contiguous()
    for block in [m for m in module.modules() if isinstance(m, TimestepEmbedSequential)]:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimiser state) as full tensors on the CPU of every rank (a collective: every rank calls it)."""
    return get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """A checkpoint's full tensors into this rank's shards (not strict: a parameter that never had a gradient, such
    as an SDXL text encoder's last layer, has no optimiser state)."""
    set_state_dict(module, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded tensors (the EMA's) gathered whole (a collective)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def sharded_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors cut into the shards of ``like``'s sharded tensors."""
    return {k: distribute_tensor(full[k].to(v.dtype), v.device_mesh, v.placements) if isinstance(v, DTensor)
            else full[k].to(v) for k, v in like.items()}


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded module's weights, whole, on every rank (a collective)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
