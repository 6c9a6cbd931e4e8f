""".safetensors files memory-mapped: tensors are views of the file's pages, so loading makes no second copy.

The file is mapped copy-on-write (``MAP_PRIVATE``): the tensors are writable, and a write never reaches the
file. A page is read from disk (or the page cache) the first time a weight is used, and ``release`` hands a
weight's pages back to the kernel; they are read again, unchanged, when next used. That is what lets
``--offload`` keep only the weights of the running module resident on a CPU. Only pages never written are ever
released (the loaders replace converted weights instead of writing into them), so a release never loses data.

Format (huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data."""

from __future__ import annotations

import json
import mmap
import struct
import weakref
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20  # as safetensors: a larger header is a malformed file, not a model
PAGE = mmap.PAGESIZE

# the live mappings ``release`` may act on: start address -> (length, weak reference to the mmap); a mapping
# lives as long as any tensor viewing it
_LIVE: dict[int, tuple[int, weakref.ref]] = {}


def _map(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with path.open("rb") as f:
        if path.stat().st_size < 8:
            raise CheckpointError(f"{path}: truncated or corrupt .safetensors file (shorter than its header)")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    metadata, entries = _header(mapping, path)
    tensors = {name: _tensor(mapping, *entry) for name, entry in entries.items()}
    for address in [a for a, (_, ref) in _LIVE.items() if ref() is None]:
        del _LIVE[address]
    _LIVE[_address(mapping)] = (len(mapping), weakref.ref(mapping))
    return tensors, metadata


def _tensor(mapping: mmap.mmap, dtype: torch.dtype, shape: list[int], begin: int, end: int) -> torch.Tensor:
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=begin)
    if begin % dtype.itemsize:  # an unaligned tensor (not written by safetensors itself) gets its own copy
        return flat.clone().view(dtype).reshape(shape)
    return flat.view(dtype).reshape(shape)


def _mapping_of(tensor: torch.Tensor) -> tuple[int, mmap.mmap] | None:
    if tensor.device.type != "cpu":
        return None
    pointer = tensor.untyped_storage().data_ptr()
    for start, (length, ref) in list(_LIVE.items()):
        mapping = ref()
        if mapping is not None and start <= pointer < start + length:
            return start, mapping
    return None


def _address(mapping: mmap.mmap) -> int:
    """The mapping's start address (a zero-copy view's data pointer)."""
    return torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()


def _header(mapping: mmap.mmap, path: Path) -> tuple[dict[str, str], dict[str, tuple]]:
    """The header's metadata and ``{name: (dtype, shape, begin, end)}`` with absolute byte offsets, checked
    against the file so that a malformed header is a CheckpointError, never a crash or an out-of-range view."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: truncated or corrupt .safetensors file ({why})")

    length = struct.unpack("<Q", mapping[:8])[0]
    if length > min(MAX_HEADER, len(mapping) - 8):
        raise bad(f"header length {length} does not fit the file")
    try:
        header = json.loads(bytes(mapping[8:8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map names to strings")
    data_start, entries = 8 + length, {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} lacks a known dtype, a shape or two data offsets") from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise bad(f"entry {name!r}: offsets {begin}..{end} do not hold a {info['dtype']} tensor of shape {shape}")
        if data_start + end > len(mapping):
            raise bad(f"entry {name!r} ends past the end of the file")
        entries[name] = (dtype, shape, data_start + begin, data_start + end)
    return metadata, entries


def map_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors viewing the mapped file, metadata)."""
    return _map(Path(path))


def is_mapped(tensor: torch.Tensor) -> bool:
    return _mapping_of(tensor) is not None


def release(tensor: torch.Tensor) -> bool:
    """Drop the resident pages lying wholly inside a mapped tensor's storage (they reload from the file when
    next used): True; a tensor that views no mapped file is left alone: False."""
    found = _mapping_of(tensor)
    if found is None:
        return False
    start, mapping = found
    storage = tensor.untyped_storage()
    begin = storage.data_ptr() - start
    first, last = -(-begin // PAGE) * PAGE, (begin + storage.nbytes()) // PAGE * PAGE
    if last > first and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True

