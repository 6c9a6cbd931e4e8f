"""The models a server offers, found in an A1111-style models folder (``Stable-diffusion/``, ``VAE/``,
``Lora/``, ``embeddings/``) plus the built-in model. Clients name models only by the titles listed here, so a
request can never make the server open an arbitrary path. The models themselves load in the worker process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.hashes import model_hash
from ..pipeline import BUILTIN_MODEL, RunOptions
from ..styles import Style, read_styles
from .executor import ModelRef

CHECKPOINT_SUFFIXES = {".safetensors", ".ckpt", ".pt"}
BUILTIN_NAME = "builtin"


@dataclass
class ModelEntry:
    path: Path
    name: str  # model_name: the file stem, or "builtin"
    sha: str

    @property
    def title(self) -> str:
        return f"{self.path.name if self.name != BUILTIN_NAME else BUILTIN_NAME} [{self.sha}]"

    def ref(self) -> ModelRef:
        return ModelRef(self.path, self.name)

    def listing(self) -> dict:
        return {"title": self.title, "model_name": self.name, "hash": self.sha, "sha256": None,
                "filename": str(self.path), "config": None}


class ModelRegistry:
    def __init__(self, models_dir: str | Path | None, options: RunOptions | None = None,
                 default: str | None = None, styles_file: str | Path | None = None,
                 clip: str | Path | None = None) -> None:
        self.models_dir = Path(models_dir) if models_dir else None
        self.styles_file = Path(styles_file) if styles_file else None  # A1111's styles.csv
        self.clip = Path(clip) if clip else None  # a CLIP model folder for /interrogate
        self.options = options or RunOptions()  # how the worker loads and runs every model
        self.entries: list[ModelEntry] = []
        self.refresh()
        if not self.entries:
            raise ValueError("no models: the built-in model is missing and the models folder has no checkpoints")
        self.current_entry = self.find(default) if default else self.entries[0]

    def folder(self, kind: str) -> Path | None:
        """``Stable-diffusion``, ``VAE``, ``Lora``, ``embeddings`` or ``interrogate`` under the models folder."""
        return self.models_dir / kind if self.models_dir else None

    def refresh(self) -> None:
        entries = []
        if BUILTIN_MODEL.exists():
            entries.append(ModelEntry(BUILTIN_MODEL, BUILTIN_NAME, model_hash(BUILTIN_MODEL)))
        folder = self.folder("Stable-diffusion")
        if folder is not None and folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file():
                    entries.append(ModelEntry(path, path.stem, model_hash(path)))
        self.entries = entries

    def find(self, name: str) -> ModelEntry:
        """A listed model by title, file name or model name; anything else is refused."""
        for entry in self.entries:
            if name in (entry.title, entry.name, entry.path.name):
                return entry
        raise KeyError(f"model {name!r} not found; GET /sdapi/v1/sd-models lists the available ones")

    def vae(self, name: str | None) -> Path | None:
        """The VAE file an ``sd_vae`` setting names (None for "Automatic" / "None": the model's own); a KeyError
        listing the VAEs otherwise."""
        if name in (None, "", "Automatic", "None"):
            return None
        files = self.files("VAE", {".safetensors", ".pt", ".ckpt"})
        for path in files:
            if name in (path.name, path.stem):
                return path
        names = ", ".join(p.name for p in files) or "none"
        raise KeyError(f"sd_vae: no VAE named {name!r} (VAE files: {names}; or Automatic, None)")

    def shown(self, path: Path) -> str:
        """A file's path as answers show it: relative to the models folder, never the server's own layout."""
        root = self.models_dir
        if root is not None and path.is_relative_to(root):
            return str(path.relative_to(root))
        return path.name

    def styles(self) -> dict[str, Style]:
        """The prompt styles, read afresh (the file is small and may be edited while the server runs)."""
        return read_styles(self.styles_file) if self.styles_file else {}

    def files(self, kind: str, suffixes: set[str]) -> list[Path]:
        folder = self.folder(kind)
        if folder is None or not folder.is_dir():
            return []
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
