"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors used in a prompt by their file name.

Formats: AUTOMATIC1111 ``.pt`` (``string_to_param["*"]``, read weights-only), ``.safetensors`` with
``emb_params`` (SD1/SD2) or ``clip_l`` + ``clip_g`` (SDXL), and diffusers' ``{"<token>": vector}`` files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoints.errors import CheckpointError, first_line
from .checkpoints.io import read_state_dict

SUFFIXES = (".safetensors", ".pt", ".bin")
logger = logging.getLogger(__name__)


def _vectors(tensors: list[torch.Tensor], path: Path) -> list[torch.Tensor]:
    """Each tensor as (n_vectors, width); a tensor without vectors makes the file unusable."""
    out = []
    for tensor in tensors:
        if tensor.dim() == 0 or tensor.numel() == 0 or not tensor.is_floating_point():
            raise CheckpointError(f"{path.name}: an embedding tensor of shape {tuple(tensor.shape)} "
                                  f"({tensor.dtype}) holds no token vectors")
        out.append(tensor.detach().reshape(-1, tensor.shape[-1]).float())
    if not out:
        raise CheckpointError(f"{path.name}: not a textual-inversion embedding (no tensors)")
    return out


def _read_pt(path: Path) -> list[torch.Tensor]:
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: not a textual-inversion embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        tensors = list(params.values())[:1] if isinstance(params, dict) else []
        return _vectors([t for t in tensors if isinstance(t, torch.Tensor)], path)
    return _vectors([v for v in data.values() if isinstance(v, torch.Tensor)], path)


def load_embedding(path: str | Path) -> list[torch.Tensor]:
    """The vectors of an embedding file, one (n_vectors, width) tensor per text encoder it covers; a
    CheckpointError naming the file for anything else."""
    path = Path(path)
    if path.suffix == ".pt":
        try:
            return _read_pt(path)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable pickle is one clear error
            raise CheckpointError(f"{path.name}: unreadable embedding ({first_line(e)})") from None
    sd, _ = read_state_dict(path)
    if "clip_l" in sd or "clip_g" in sd:
        return _vectors([sd[k] for k in ("clip_l", "clip_g") if k in sd], path)
    if "emb_params" in sd:
        return _vectors([sd["emb_params"]], path)
    return _vectors(list(sd.values()), path)


def embedding_info(path: str | Path) -> dict:
    """What A1111's /embeddings lists for a file: vector count and width ("shape"), and the training step and
    checkpoint an A1111 .pt records; ``widths`` for checking it against a model."""
    path = Path(path)
    tensors = load_embedding(path)
    info = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
            "shape": tensors[0].shape[-1], "vectors": tensors[0].shape[0], "widths": [t.shape[-1] for t in tensors]}
    if path.suffix == ".pt":
        data = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
            value = data.get(key) if isinstance(data, dict) else None
            info[key] = value if isinstance(value, int | str) else None
    return info


class EmbeddingLibrary:
    """Embeddings found in a folder, by file name. One that cannot be read, or has no vectors of a text
    encoder's width, is skipped with a warning, as A1111 does: its name then stays plain text."""

    def __init__(self, folder: str | Path | None, widths: list[int] | None = None) -> None:
        self.paths: dict[str, Path] = {}
        if folder is not None and Path(folder).is_dir():
            for path in sorted(Path(folder).iterdir()):
                if path.suffix in SUFFIXES:
                    self.paths.setdefault(path.stem, path)
        self.widths = widths
        self._cache: dict[str, list[torch.Tensor]] = {}
        self.skipped: dict[str, str] = {}  # name -> why

    @property
    def names(self) -> list[str]:
        return sorted(self.paths)

    def _load(self, name: str) -> list[torch.Tensor]:
        if name not in self._cache:
            self._cache[name] = load_embedding(self.paths[name])
        return self._cache[name]

    def usable(self, name: str) -> bool:
        """Whether ``name`` loads and has vectors for every text encoder width of the model."""
        if name in self.skipped:
            return False
        try:
            widths = {t.shape[-1] for t in self._load(name)}
            missing = [w for w in (self.widths or []) if w not in widths]
            if missing:
                raise CheckpointError(f"it has vectors of width {sorted(widths)}, the model's text encoders take "
                                      f"{self.widths}")
        except CheckpointError as error:
            self.skipped[name] = str(error)
            logger.warning("embedding %s skipped: %s", name, error)
            return False
        return True

    def count(self, name: str) -> int:
        """Number of token vectors the embedding stands for."""
        return self._load(name)[0].shape[0]

    def vectors(self, name: str, width: int) -> torch.Tensor:
        for tensor in self._load(name):
            if tensor.shape[-1] == width:
                return tensor
        raise CheckpointError(f"embedding {name!r} has no vectors of width {width} for this model's text encoder")
