"""LoRA (Hu et al. 2021), for generation and for training, with the kohya file rule written once.

Generation merges files into the weights for one request: W += strength * (alpha / rank) * up @ down. It reads
the kohya / A1111 format (``lora_unet_*``, ``lora_te_*``, SDXL ``lora_te1_*`` / ``lora_te2_*``; UNet modules named
the diffusers way or the LDM way; 1x1 and 3x3 convolutions too, i.e. LoCon) and the diffusers / PEFT format
(``unet.<module>.lora_A.weight`` / ``lora_B``); ``applied_loras`` undoes the merge on exit. Training wraps Linear
layers in ``LoRALinear`` adapters (``add_lora``) and saves them in the kohya layout (``lora_state_dict``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoints.errors import CheckpointError
from .checkpoints.io import read_state_dict
from .checkpoints.keymap import unet_module_map

if TYPE_CHECKING:
    from .pipeline import Pipeline

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([+-]?[\d.]+))?>")


def kohya_key(prefix: str, module_name: str) -> str:
    """The kohya / A1111 name of a module's LoRA: ``lora_unet_`` + the module path with dots as underscores."""
    return f"{prefix}_{module_name.replace('.', '_')}"


# ---- generation: merge LoRA files into the weights -------------------------------------------------------------

def _targets(pipe: Pipeline) -> dict[str, nn.Module]:
    """Every name a LoRA file may use for one of our Linear/Conv2d modules -> that module."""
    out: dict[str, nn.Module] = {}
    to_diffusers = unet_module_map(pipe.config.unet) if not pipe.config.unet.resblock_updown else {}
    prefixes = sorted(to_diffusers, key=len, reverse=True)
    for name, module in pipe.unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        out[kohya_key("lora_unet", name)] = module  # LDM names (kohya SDXL)
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                diffusers = to_diffusers[p] + name[len(p):]
                out[kohya_key("lora_unet", diffusers)] = module  # diffusers names (kohya SD1/SD2)
                out["unet." + diffusers] = module  # PEFT
                break
    several = len(pipe.text_encoders) > 1
    for i, encoder in enumerate(pipe.text_encoders):
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("text_model."):
                out[kohya_key(f"lora_te{i + 1 if several else ''}", name)] = module
                out[("text_encoder_2." if i else "text_encoder.") + name] = module
    return out


def _pairs(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """{module name: (up, down, alpha)} from either file format."""
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            base = key[: -len(".lora_down.weight")]
            alpha = sd.get(base + ".alpha")
            out[base] = (sd[base + ".lora_up.weight"], sd[key], float(alpha) if alpha is not None else None)
        elif key.endswith(".lora_A.weight"):
            base = key[: -len(".lora_A.weight")]
            out[base] = (sd[base + ".lora_B.weight"], sd[key], None)
    return out


def lora_deltas(pipe: Pipeline, path: str | Path, strength: float) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, weight delta) for every layer the file changes; unknown layers are an error."""
    sd, _ = read_state_dict(path)
    pairs = _pairs(sd)
    if not pairs:
        raise CheckpointError(f"{path}: no LoRA weights (lora_down/lora_up or lora_A/lora_B)")
    targets = _targets(pipe)
    unknown = [k for k in pairs if k not in targets]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} LoRA layers match nothing in this model "
                              f"(e.g. {unknown[0]}); is it for another model family?")
    deltas = []
    for name, (up, down, alpha) in pairs.items():
        module = targets[name]
        try:
            rank = down.shape[0]
            if down.dim() == 4:  # conv LoRA: down (r, in, k, k), up (out, r, 1, 1)
                delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(module.weight.shape)
            else:
                delta = up.float() @ down.float()
            if delta.shape != module.weight.shape or rank < 1:
                raise ValueError
        except (RuntimeError, IndexError, ValueError):
            raise CheckpointError(f"{Path(path).name}: LoRA layer {name} has shapes {tuple(up.shape)} x "
                                  f"{tuple(down.shape)}, which do not fit the model's {tuple(module.weight.shape)}")\
                from None
        deltas.append((module, delta * (strength * (alpha / rank if alpha is not None else 1.0))))
    return deltas


@contextmanager
def applied_loras(pipe: Pipeline, loras: list[tuple[str | Path, float]]) -> Iterator[None]:
    """Merge the LoRAs into the weights for the duration of the block, then put the originals back. Merged
    weights are new tensors (the originals are never written), so weights mapped from a file stay as the file
    has them and offloading may release them at any time (checkpoints/mapped.py)."""
    saved: dict[nn.Module, torch.Tensor] = {}
    try:
        for path, strength in loras:
            for module, delta in lora_deltas(pipe, path, strength):
                saved.setdefault(module, module.weight.data)
                weight = module.weight.data  # merged in the run's dtype when an offloaded fp16 weight is cast as it runs
                dtype = torch.promote_types(weight.dtype, pipe.dtype)
                module.weight.data = weight.to(dtype) + delta.to(weight.device, dtype)
        yield
    finally:
        for module, weight in saved.items():
            module.weight.data = weight


def extract_lora_tags(prompt: str, lora_dir: str | Path | None) -> tuple[str, list[tuple[Path, float]]]:
    """Remove ``<lora:name:weight>`` tags from a prompt and resolve each name to a file in ``lora_dir``."""
    found = []
    for name, weight in LORA_TAG.findall(prompt):
        found.append((resolve_lora(name, lora_dir, allow_path=False), float(weight) if weight else 1.0))
    return LORA_TAG.sub("", prompt), found


def resolve_lora(name: str, lora_dir: str | Path | None, allow_path: bool = True) -> Path:
    """A LoRA by path (when ``allow_path``), or by file name without extension in ``lora_dir``; names in
    prompts never reach outside ``lora_dir``."""
    shown = name if len(name) <= 80 else name[:77] + "..."
    try:
        if allow_path and Path(name).is_file():
            return Path(name)
        if lora_dir is None or "/" in name or "\\" in name or name.startswith(".") or len(name) > 200:
            raise CheckpointError(f"LoRA {shown!r} not found (give a file path, or a name with a LoRA folder)")
        for suffix in (".safetensors", ".pt", ".ckpt"):
            path = Path(lora_dir) / f"{name}{suffix}"
            if path.is_file():
                return path
    except OSError as error:  # a name the file system refuses (too long, invalid)
        raise CheckpointError(f"LoRA {shown!r}: {error.strerror or 'not a usable file name'}") from None
    raise CheckpointError(f"LoRA {shown!r} not found in {lora_dir}")


# ---- training: adapters on Linear layers, saved in the kohya layout ---------------------------------------------

class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * up(down(x))`` with ``base`` frozen and ``up`` starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.alpha = alpha
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.to(base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


def add_lora(unet: nn.Module, rank: int, alpha: float, targets: list[str]) -> dict[str, LoRALinear]:
    """Wrap every Linear of the UNet whose name contains one of ``targets`` (e.g. "attn2"); freeze the rest."""
    unet.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
    for name, module in list(unet.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(t in full for t in targets):
                lora = LoRALinear(child, rank, alpha)
                setattr(module, child_name, lora)
                wrapped[full] = lora
    if not wrapped:
        raise ValueError(f"no UNet Linear layer matches the LoRA targets {targets}")
    return wrapped


def lora_state_dict(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The kohya / A1111 file layout (LDM module names): lora_unet_<name>.lora_down/lora_up/alpha, which
    ``applied_loras`` reads back."""
    out = {}
    for name, lora in wrapped.items():
        key = kohya_key("lora_unet", name)
        out[f"{key}.lora_down.weight"] = lora.lora_down.weight.detach().cpu()
        out[f"{key}.lora_up.weight"] = lora.lora_up.weight.detach().cpu()
        out[f"{key}.alpha"] = torch.tensor(float(lora.alpha))
    return out


def remove_lora(unet: nn.Module, wrapped: dict[str, LoRALinear]) -> None:
    """Put the original Linear layers back (the adapters live on in the saved file)."""
    for name, lora in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, lora.base)
    unet.requires_grad_(True)
