"""Start ``sd serve`` as a real process on a free 127.0.0.1 port: the built-in model by default, beside a models
folder of two tiny random models."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline


def tiny_models(root: Path) -> Path:
    (root / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    for seed, name in ((0, "tiny"), (1, "other")):
        Pipeline.from_config(preset("tiny-sd1"), seed=seed).save(root / "Stable-diffusion" / f"{name}.safetensors")
    return root


@contextmanager
def live_server(models: Path, outputs: Path, *extra: str) -> Iterator[tuple[int, subprocess.Popen]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "stable_diffusion.cli", "serve", "--port", str(port),
                             "--models-dir", str(models), "--queue", "64", "--outputs", str(outputs), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"sd serve did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.3)
    try:
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(30)
