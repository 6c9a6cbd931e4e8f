"""The file hashes AUTOMATIC1111 writes into infotexts and lists in its API: a model's "Model hash" is the first 10
hex digits of the file's sha256; a LoRA's hash in "Lora hashes" the first 12 of the sha256 of its tensor data
(for .safetensors, the bytes after the header, which kohya's tools call the addnet hash; other files whole).
Hashes are cached per (path, size, modification time), since models are gigabytes."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_CACHE: dict[tuple[str, int, int, bool], str] = {}


def file_sha256(path: str | Path, tensors_only: bool = False) -> str:
    """The sha256 hex digest of a file, or with ``tensors_only`` of a .safetensors file's data after its header."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, tensors_only)
    if key not in _CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            if tensors_only:
                header = f.read(8)
                f.seek(8 + (struct.unpack("<Q", header)[0] if len(header) == 8 else 0))
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _CACHE[key] = digest.hexdigest()
    return _CACHE[key]


def model_hash(path: str | Path) -> str:
    """A1111's short model hash: 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA short hash: 12 hex digits (the addnet hash for .safetensors files)."""
    return file_sha256(path, tensors_only=Path(path).suffix == ".safetensors")[:12]
