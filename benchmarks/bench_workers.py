"""Throughput of ``sd serve --broker`` with 1, 2 and 3 ``sd worker`` processes on the built-in model.

For each worker count: a fresh redis-server on a free loopback port, N workers (each with ``--threads`` torch
threads), the front end's BrokerClient sending JOBS txt2img jobs at once (64 px, 20 Euler a steps, CFG 7, one
image each); after one warm-up job per worker, the wall time from the first job sent to the last answer gives
jobs per minute. Needs redis-server (Debian's package) and the broker extra (``pip install ".[broker]"``).

    python benchmarks/bench_workers.py [--workers 1,2,3] [--jobs 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live_server import free_port, start_redis, start_worker, stop  # noqa: E402


def measure(workers: int, jobs: int, threads: int, folder: Path) -> float:
    """Jobs per minute with ``workers`` workers."""
    from stable_diffusion.request import GenerationRequest
    from stable_diffusion.server.broker import BrokerClient
    from stable_diffusion.server.executor import Job
    from stable_diffusion.server.registry import ModelRegistry

    port = free_port()
    redis_dir = folder / f"redis-{workers}"
    redis_dir.mkdir()
    redis = start_redis(redis_dir, port)
    url = f"redis://127.0.0.1:{port}/0"
    models = folder / "models"
    procs = []
    try:
        procs = [start_worker(url, models, f"bench{i}", "--threads", str(threads)) for i in range(workers)]
        client = BrokerClient(url, models)
        ref = ModelRegistry(models).current_entry.ref()

        def one(seed: int) -> None:
            request = GenerationRequest(prompt="a red circle on the left on a white background", steps=20, seed=seed,
                                        width=64, height=64, sampler="Euler a", cfg_scale=7.0)
            client.run(Job("generate", ref, request))

        with ThreadPoolExecutor(workers) as pool:  # warm-up: each worker loads the model once
            list(pool.map(one, range(workers)))
        start = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, range(100, 100 + jobs)))
        return jobs / (time.perf_counter() - start) * 60
    finally:
        for proc in procs:
            stop(proc)
        stop(redis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("bench_workers: redis-server is not installed; skipped")
        return
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "models").mkdir()
        rates = {n: measure(n, args.jobs, args.threads, folder) for n in counts}
    print(f"\nsd serve --broker throughput, built-in model, {args.jobs} jobs of 20 steps at 64 px, {args.threads} "
          f"torch thread(s) per worker; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| workers | jobs / min | vs 1 worker |\n|---|---|---|")
    for n, rate in rates.items():
        print(f"| {n} | {rate:.1f} | {rate / rates[counts[0]]:.2f}x |")


if __name__ == "__main__":
    main()
