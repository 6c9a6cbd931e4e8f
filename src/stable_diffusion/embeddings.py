"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors used in a prompt by their file name.

Formats: AUTOMATIC1111 ``.pt`` (``string_to_param["*"]``, read weights-only), ``.safetensors`` with
``emb_params`` (SD1/SD2) or ``clip_l`` + ``clip_g`` (SDXL), and diffusers' ``{"<token>": vector}`` files."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints.errors import CheckpointError
from .checkpoints.io import read_state_dict

SUFFIXES = (".safetensors", ".pt", ".bin")


def _read_pt(path: Path) -> list[torch.Tensor]:
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "string_to_param" in data:
        return [next(iter(data["string_to_param"].values())).detach().float()]
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)] if isinstance(data, dict) else []
    if not tensors:
        raise CheckpointError(f"{path}: not a textual-inversion embedding")
    return [t.reshape(-1, t.shape[-1]).float() for t in tensors]


def load_embedding(path: str | Path) -> list[torch.Tensor]:
    """The vectors of an embedding file, one (n_vectors, width) tensor per text encoder it covers."""
    path = Path(path)
    if path.suffix == ".pt":
        try:
            return _read_pt(path)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable pickle is one clear error
            raise CheckpointError(f"{path}: unreadable embedding ({str(e).splitlines()[0][:200]})") from None
    sd, _ = read_state_dict(path)
    if "clip_l" in sd or "clip_g" in sd:
        return [sd[k].float() for k in ("clip_l", "clip_g") if k in sd]
    if "emb_params" in sd:
        return [sd["emb_params"].float()]
    return [t.reshape(-1, t.shape[-1]).float() for t in sd.values()]


class EmbeddingLibrary:
    """Embeddings found in a folder, by file name; vectors are chosen by the encoder's width."""

    def __init__(self, folder: str | Path | None) -> None:
        self.paths: dict[str, Path] = {}
        if folder is not None and Path(folder).is_dir():
            for path in sorted(Path(folder).iterdir()):
                if path.suffix in SUFFIXES:
                    self.paths.setdefault(path.stem, path)
        self._cache: dict[str, list[torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.paths)

    def _load(self, name: str) -> list[torch.Tensor]:
        if name not in self._cache:
            self._cache[name] = load_embedding(self.paths[name])
        return self._cache[name]

    def count(self, name: str) -> int:
        """Number of token vectors the embedding stands for."""
        return self._load(name)[0].shape[0]

    def vectors(self, name: str, width: int) -> torch.Tensor:
        for tensor in self._load(name):
            if tensor.shape[-1] == width:
                return tensor
        raise CheckpointError(f"embedding {name!r} has no vectors of width {width} for this model's text encoder")
