"""backends/file_pages.py: a read-only shared mapping's pages are handed back, and read again unchanged."""

import mmap
import sys

import pytest

from stable_diffusion.backends.file_pages import release_file_pages, released_while

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise are Linux's")


def _resident_kb(path) -> int:
    """This process's resident kB of mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_pages_of_a_read_only_shared_mapping_are_released_and_read_back(tmp_path):
    path = tmp_path / "model.bin"
    data = bytes(range(256)) * (16 * 4096)  # 16 MiB
    path.write_bytes(data)
    with path.open("rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # PROT_READ, MAP_SHARED: "r--s"
    assert sum(mapping[i] for i in range(0, len(data), 4096)) >= 0  # touch every page
    assert _resident_kb(path.resolve()) >= 15 * 1024
    assert release_file_pages(path) >= len(data)
    assert _resident_kb(path.resolve()) < 1024
    assert mapping[:] == data  # faulted in again, unchanged
    with released_while(path, period=0.01):
        assert mapping[:] == data
    assert _resident_kb(path.resolve()) < 1024
    mapping.close()


def test_writable_and_private_mappings_are_left_alone(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (4 * 4096))
    with path.open("r+b") as f:
        private = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: a write must never be lost
    private[0] = 7
    assert release_file_pages(path) == 0
    assert private[0] == 7
    private.close()
    assert release_file_pages(tmp_path / "absent.bin") == 0
