"""Reading and writing state-dict files safely.

``.safetensors`` is memory-mapped (mapped.py); ``.ckpt``/``.pt``/``.pth``/``.bin`` only through
``torch.load(weights_only=True)``, so a pickle that would run code is refused and never runs. Writes go to a
temporary file renamed into place, so an interrupted save never leaves a half-written checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from .errors import CheckpointError, first_line
from .mapped import map_safetensors

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class _Ignored:
    """Stands in for the harmless non-tensor objects Lightning stores beside the weights."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


# Lightning's callback object sits in the "callbacks" entry of official SD1/SD2 .ckpt files; it is mapped
# onto a class that keeps nothing. Everything else outside torch's weights-only allow-list is refused.
_TOLERATED = [(_Ignored, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a checkpoint file; a clear CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":  # memory-mapped: no second copy of the weights (see mapped.py)
        try:
            return map_safetensors(path)
        except CheckpointError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt .safetensors file ({e})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, .ckpt, .pt, .pth or .bin)")
    try:
        with torch.serialization.safe_globals(_TOLERATED), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on old pickle protocols say nothing to a user
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unpickling failed"
        raise CheckpointError(f"{path}: refused to load: the file holds pickled objects other than weights, which "
                              f"could run code ({first[:200]}); convert it to .safetensors from a trusted source") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first_line(e)})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors, {}


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask alone must set it to read it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then rename it onto ``path`` (same folder, so the rename is atomic). The file
    gets the permissions an ordinary ``open`` would give it (0666 less the umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
