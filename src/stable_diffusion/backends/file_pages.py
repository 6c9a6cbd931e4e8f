"""Hand the resident pages of a memory-mapped IR weights file back to the kernel (Linux; elsewhere a no-op).

OpenVINO reads an IR's ``model.bin`` through read-only shared mappings (``r--s`` in ``/proc/self/maps``), and a
compiled CPU model keeps those mappings alive although it runs on its own repacked copy of the weights: the file
stays resident beside the copy (1.1 GB for an int8 SD1.5 UNet, 3.3 GB in fp32). ``madvise(MADV_DONTNEED)`` on a
read-only shared file mapping only unmaps the pages from this process; the data stays in the file and any page
still read is faulted in again, unchanged, so dropping them can never change a result. ``released_while(path)``
does so every ``period`` seconds while its block runs (the compile reads the file once, layer by layer, so its
peak is the copy plus a few layers rather than both whole) and once at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

MADV_DONTNEED = 4


def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


def release_file_pages(path: str | Path) -> int:
    """Drop this process's resident pages of every read-only shared mapping of ``path``; the bytes advised."""
    if _MADVISE is None:
        return 0
    target, advised = str(Path(path).resolve()), 0
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return 0
    for line in lines:
        # "start-end perms offset dev inode path": only read-only shared mappings, which no one can have written
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5].rstrip("\n") != target or fields[1][:2] != "r-" or fields[1][3] != "s":
            continue
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if _MADVISE(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
    return advised


@contextlib.contextmanager
def released_while(path: str | Path, period: float = 0.1) -> Iterator[None]:
    """Release ``path``'s mapped pages every ``period`` seconds while the block runs, and once after it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period):
            release_file_pages(path)

    thread = threading.Thread(target=loop, name="release-file-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release_file_pages(path)
