"""Offloading: weights visit the execution device only while they run (diffusers' model and sequential CPU
offload, A1111's --medvram and --lowvram).

Each weight has a home: host memory, which for a model loaded from a ``.safetensors`` file is the memory-mapped
file itself (checkpoints/mapped.py). Forward hooks bring a unit's weights to the device before it runs and send
them home after:

- ``model``: the unit is a whole component (text encoder, UNet, VAE); starting one sends the last one home,
  and the end of a generation sends everything home. Peak device memory: the largest component.
- ``sequential``: the unit is every module that owns weights (one Linear, one Conv2d, ...), home again right
  after it runs. Peak device memory: the largest layer; every step moves the whole UNet, so it is slow.

On a CPU the device is the home itself: nothing is copied, and sending a unit home releases the pages of its
mapped weights, which the kernel reads back from the page cache when they are next used. The resident set then
holds the running unit's weights instead of the whole model. Weights that are not mapped (random presets,
``.ckpt`` files, weights converted to another dtype at load) cannot be released and stay resident.
Offloaded models keep the file's memory layout (no channels-last copy), so their weights stay mapped.

Homes keep the file's dtype when the run computes in a wider one (an fp16 file run in fp32, the CPU's default):
a unit's weights are cast as they reach the device, as ComfyUI's "manual cast" does. The cast is exact (every
fp16 value is an fp32 value), so the numbers are those of a model converted at load, and the homes stay mapped
(half the bytes, and releasable)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from .checkpoints.mapped import is_mapped, release
from .models.attention import GEGLU

MODES = ("none", "model", "sequential")
ATOMIC = (GEGLU,)  # modules that read their children's weights directly: one unit with their children


class Offload:
    """Hooks that load and unload units of a pipeline's modules around their forward calls."""

    def __init__(self, components: dict[str, nn.Module], entries: dict[str, list[nn.Module]], mode: str,
                 device: torch.device) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"offload must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode, self.device = mode, device
        self.dtype: torch.dtype | None = None  # the compute dtype floating weights are cast to on the device
        self.components = components
        self.active: str | None = None  # model mode: the component on the device
        self.homes: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {}  # id(unit) -> its weights' homes
        self.hooks = []
        if mode == "model":
            for name, modules in entries.items():
                for module in modules:
                    self.hooks.append(module.register_forward_pre_hook(
                        lambda _m, _args, name=name: self._activate(name)))
        else:
            for component in components.values():
                for unit, recurse in _units(component):
                    self.hooks.append(unit.register_forward_pre_hook(
                        lambda m, _args, recurse=recurse: self._load(m, recurse)))
                    self.hooks.append(unit.register_forward_hook(
                        lambda m, _args, _out, recurse=recurse: self._unload(m, recurse)))

    def _activate(self, name: str) -> None:
        if self.active != name:
            self.unload_all()
            self._load(self.components[name], recurse=True)
            self.active = name

    def unload_all(self) -> None:
        """Send every unit home (the end of a generation)."""
        if self.active is not None:
            self._unload(self.components[self.active], recurse=True)
            self.active = None

    def _load(self, unit: nn.Module, recurse: bool) -> None:
        if id(unit) in self.homes:
            return
        homes = self.homes[id(unit)] = []
        for owner, name, tensor in _tensors(unit, recurse):
            homes.append((owner, name, tensor))
            dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
            running = tensor.to(self.device, dtype, non_blocking=True)
            _set(owner, name, running)
            if self.device.type == "cpu" and running.data_ptr() != tensor.data_ptr():
                release(tensor)  # cast into a copy: the mapped pages it was read from are not needed while it runs

    def _unload(self, unit: nn.Module, recurse: bool) -> None:
        for owner, name, home in self.homes.pop(id(unit), []):
            _set(owner, name, home)
            if self.device.type == "cpu":  # the device is the home: hand the mapped pages back
                release(home)

    def remove(self) -> None:
        """Take the hooks away, with every weight at home."""
        self.unload_all()
        for hook in self.hooks:
            hook.remove()


def _units(module: nn.Module) -> Iterator[tuple[nn.Module, bool]]:
    """(unit, whether it owns its descendants' weights too) for sequential offload."""
    if isinstance(module, ATOMIC):
        yield module, True
        return
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        yield module, False
    for child in module.children():
        yield from _units(child)


def _tensors(unit: nn.Module, recurse: bool) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(owning module, attribute name, tensor) of a unit's parameters and buffers."""
    for owner in (unit.modules() if recurse else [unit]):
        for name, param in owner._parameters.items():
            if param is not None:
                yield owner, name, param.data
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                yield owner, name, buffer


def _set(owner: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in owner._parameters:
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor


def casts_as_it_runs(module: nn.Module, dtype: torch.dtype) -> bool:
    """Whether an offloaded ``module`` run in ``dtype`` keeps its weights in their own, narrower dtype."""
    home = next((p.dtype for p in module.parameters() if p.is_floating_point()), dtype)
    return torch.finfo(dtype).bits > torch.finfo(home).bits


def replacing(module: nn.Module, change: object) -> None:
    """``change(module)``, then give back the mapped pages of every weight it replaced with a new tensor."""
    before = [t for t in [*module.parameters(), *module.buffers()] if is_mapped(t)]
    old = {t.data_ptr(): t.data for t in before}
    change(module)
    kept = {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}
    for pointer, tensor in old.items():
        if pointer not in kept:
            release(tensor)


def free_memory(device: torch.device) -> int:
    """Bytes free on a device now: CUDA's free memory, or the host's available memory (Linux MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
