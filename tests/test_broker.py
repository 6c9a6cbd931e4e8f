"""Many workers behind one API (``sd serve --broker`` + ``sd worker``) on a real redis-server: 64 concurrent
requests over three workers, each image its seed's image from the single-process server; a worker killed with
``kill -9`` mid-job gives the job to another and the client gets its images once; a broker restarted (append-only
file) or a front end gone loses no accepted job; unloading reaches every worker. (The A1111 API tests of
test_server_live.py run against such a cluster too.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from redis import Redis
from rq import Worker

from .live_server import broker_cluster, free_port, live_server, start_redis, start_worker, stop, tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def cluster(models, tmp_path_factory):
    with broker_cluster(models, tmp_path_factory.mktemp("redis")) as (url, workers), \
            live_server(models, tmp_path_factory.mktemp("out"), "--broker", url) as (port, _):
        yield url, workers, port


@pytest.fixture(scope="module")
def single(models, tmp_path_factory):
    with live_server(models, tmp_path_factory.mktemp("single")) as (port, _):
        yield port


def _txt2img(port: int, seed: int, **extra) -> dict:
    body = {"prompt": "a green star", "seed": seed, "steps": 4, "width": 64, "height": 64, **extra}
    response = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def _jobs_done(url: str) -> dict[str, int]:
    return {w.name: w.successful_job_count for w in Worker.all(connection=Redis.from_url(url))}


def test_64_concurrent_requests_over_three_workers_are_the_single_server_images(cluster, single):
    url, _, port = cluster
    before = _jobs_done(url)
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda seed: _txt2img(port, seed), range(500, 564)))
    assert [json.loads(a["info"])["seed"] for a in answers] == list(range(500, 564))
    after = _jobs_done(url)
    assert sum(after.values()) - sum(before.values()) == 64  # each ran once: the workers beat their jobs' leases
    assert all(after[name] > before.get(name, 0) for name in after)  # every worker took some
    for seed in (500, 531, 563):
        alone = _txt2img(single, seed)
        assert answers[seed - 500]["images"] == alone["images"]
        assert json.loads(answers[seed - 500]["info"])["infotexts"] == json.loads(alone["info"])["infotexts"]
    state = httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/progress").json()["state"]
    assert state["job_count"] == 0


def test_a_job_longer_than_its_lease_runs_once(cluster):
    """The worker heartbeats its running job (every lease / 3), so a job that outlasts several leases is never
    counted abandoned and given to a second worker (RQ 3 changed the heartbeat's signature under us once)."""
    url, _, port = cluster
    before = _jobs_done(url)
    started = time.monotonic()
    assert _txt2img(port, 9, steps=60, width=256, height=256)["images"]
    assert time.monotonic() - started > 2 * 3  # the workers' --lease is 3 s
    assert sum(_jobs_done(url).values()) - sum(before.values()) == 1


def test_a_worker_killed_mid_job_gives_it_to_another(cluster, models, single):
    url, workers, port = cluster
    connection = Redis.from_url(url)
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(_txt2img(port, 77, steps=60, width=192, height=192)))
    thread.start()
    deadline = time.time() + 120
    while not (busy := [w for w in Worker.all(connection=connection) if w.get_current_job_id()]):
        assert time.time() < deadline, "no worker took the job"
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the job
    victim = busy[0]
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive() and answer["images"], "the job was not finished by another worker"
    assert answer["images"] == _txt2img(single, 77, steps=60, width=192, height=192)["images"]
    for i, proc in enumerate(workers):  # replace the dead worker for the tests after this one
        if proc.poll() is not None:
            workers[i] = start_worker(url, models, f"w{i}-again")
    deadline = time.time() + 60  # RQ forgets the dead worker once its key's TTL (30 s here) runs out
    while victim.name in [w.name for w in Worker.all(connection=connection)]:
        assert time.time() < deadline
        time.sleep(0.5)
    from rq import Queue

    queue = Queue("sd", connection=connection)
    assert queue.count == 0 and queue.started_job_registry.count == 0


def test_unload_reaches_every_worker(cluster):
    url, _, port = cluster
    before = _jobs_done(url)
    assert httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/unload-checkpoint", timeout=120).status_code == 200
    after = _jobs_done(url)
    assert all(after[name] == before.get(name, 0) + 1 for name in after)
    assert _txt2img(port, 5)["images"]  # the next job loads the model again


def test_a_restarted_broker_or_a_gone_front_end_loses_no_job(models, tmp_path):
    """Two jobs accepted while no worker runs: one whose front end waits through a broker restart, one whose front
    end is gone (enqueued, never awaited). The broker restarts from its append-only file, a worker starts, and
    both jobs run; the waiting front end gets its answer."""
    from rq import Queue

    from stable_diffusion.server.broker import BrokerClient
    from stable_diffusion.server.broker_worker import execute
    from stable_diffusion.server.executor import Job
    from stable_diffusion.server.registry import ModelRegistry

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = start_redis(tmp_path, port)
    ref = ModelRegistry(models).current_entry.ref()
    answer: dict = {}
    client = BrokerClient(url, models)
    waiting = threading.Thread(target=lambda: answer.update(info=client.run(Job("load", ref))[0]))
    waiting.start()
    orphan = Queue("sd", connection=Redis.from_url(url)).enqueue(execute, Job("load", ref), "orphan", str(models))
    deadline = time.time() + 30
    while Redis(port=port).llen("rq:queue:sd") < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    Redis(port=port).shutdown()  # saves nothing more: the append-only file has every write
    redis_proc.wait(30)
    redis_proc = start_redis(tmp_path, port)
    worker = start_worker(url, models, "late")
    try:
        waiting.join(120)
        assert answer["info"].name == "builtin"
        deadline = time.time() + 60
        while orphan.get_status(refresh=True) != "finished":
            assert time.time() < deadline, orphan.get_status()
            time.sleep(0.1)
        assert orphan.return_value()[0] == "done"
    finally:
        stop(worker)
        stop(redis_proc)


def test_deployment_examples_parse():
    """deploy/compose.yaml and the systemd unit run commands the CLI accepts, on the broker they name."""
    import configparser
    import shlex

    import yaml

    from stable_diffusion.cli.main import build_parser

    root = Path(__file__).resolve().parents[1] / "deploy"
    compose = yaml.safe_load((root / "compose.yaml").read_text())
    assert set(compose["services"]) == {"redis", "worker", "web"}
    assert "--appendonly" in compose["services"]["redis"]["command"]
    for name in ("worker", "web"):
        command = compose["services"][name]["command"]
        args = build_parser().parse_args(command[1:])
        assert command[0] == "sd" and args.command == {"worker": "worker", "web": "serve"}[name]
        assert args.broker == "redis://redis:6379/0" and args.models_dir == "/models"
    unit = configparser.ConfigParser(interpolation=None)
    unit.read_string((root / "sd-worker@.service").read_text())
    command = shlex.split(unit["Service"]["ExecStart"].replace("%i", "0").replace("%H", "host"))
    args = build_parser().parse_args(command[1:])
    assert command[0].endswith("/sd") and args.command == "worker" and args.device == "cuda:0"
