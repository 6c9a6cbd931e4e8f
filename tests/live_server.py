"""Start ``sd serve`` as a real process on a free 127.0.0.1 port: the built-in model by default, beside a models
folder of two tiny random models; and a broker cluster for ``sd serve --broker``: Debian's redis-server and
``sd worker`` processes."""

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
    port = free_port()
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
        stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(folder: Path, port: int) -> subprocess.Popen:
    """Debian's redis-server on ``port``, persisting to ``folder`` (append-only file), answering before return."""
    import shutil

    import redis

    binary = shutil.which("redis-server")
    if binary is None:  # .ci/run installs it; a machine without apt-get cannot
        import pytest

        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.1)


def start_worker(url: str, models: Path, name: str, *extra: str) -> subprocess.Popen:
    """An ``sd worker`` process; returns once RQ lists it."""
    from redis import Redis
    from rq import Worker

    proc = subprocess.Popen([sys.executable, "-m", "stable_diffusion.cli", "worker", "--broker", url, "--models-dir",
                             str(models), "--name", name, "--lease", "3", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    connection, deadline = Redis.from_url(url), time.time() + 120
    while name not in [w.name for w in Worker.all(connection=connection)]:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"sd worker did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def broker_cluster(models: Path, folder: Path, workers: int = 3) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """redis-server and ``workers`` sd worker processes: (the broker URL, the workers)."""
    port = free_port()
    redis_proc = start_redis(folder, port)
    url = f"redis://127.0.0.1:{port}/0"
    procs: list[subprocess.Popen] = []
    try:
        procs.extend(start_worker(url, models, f"w{i}") for i in range(workers))
        yield url, procs
    finally:
        for proc in procs:
            stop(proc)
        stop(redis_proc)
