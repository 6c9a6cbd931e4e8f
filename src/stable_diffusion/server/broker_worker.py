"""``sd worker --broker redis://HOST:6379/0``: a generation worker behind ``sd serve --broker`` (server/broker.py).

An RQ ``SimpleWorker`` (jobs run in this process, so the loaded model stays for the next job and CUDA is never
forked) with one Executor, as the single-process server's worker has. It takes jobs from the shared queue and
from its own (``sd-worker:<name>``, for what every worker must do, such as unloading), writes each step's progress
and preview to the job's meta, reads the job's Interrupt and Skip flags between steps, and heartbeats the job
with a short lease from a thread (RQ's heartbeat, whose default lease is the job's timeout + 60 s), so that if
this process dies the job goes back to the queue within ``lease`` seconds.

Paths in a job are the front end's; a job under the front end's models folder is moved under this worker's
``--models-dir`` (the folder may sit at another path on another machine)."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job as RQJob
from rq.worker import WorkerStatus

from .executor import Controls, Executor, Job
from .worker import run_job

QUEUE = "sd"
STATE: dict[str, Any] = {}  # this worker process's Executor and models folder, set by serve_worker


def flag_key(name: str, task: str) -> str:
    """The Redis key of a task's "interrupt" or "skip" flag."""
    return f"sd:{name}:{task}"


def worker_queue(redis: Redis, name: str) -> Queue:
    """A worker's own queue: jobs for that worker alone."""
    return Queue(f"sd-worker:{name}", connection=redis)


class _Flag:
    """A Redis flag read at most every ``every`` seconds (the stop checks run between every block of the text
    encoder and the VAE)."""

    def __init__(self, redis: Redis, key: str, every: float = 0.05) -> None:
        self.redis, self.key, self.every = redis, key, every
        self.value, self.read_at = False, 0.0

    def __call__(self) -> bool:
        if time.monotonic() - self.read_at >= self.every:
            self.value, self.read_at = bool(self.redis.exists(self.key)), time.monotonic()
        return self.value

    def clear(self) -> None:
        self.redis.delete(self.key)
        self.value = False


def _moved(path: Any, source: str, target: str) -> Any:
    """``path`` (a str or Path) under ``source`` as the same path under ``target``; anything else as it is."""
    if isinstance(path, str | Path) and Path(path).is_relative_to(source):
        moved = Path(target) / Path(path).relative_to(source)
        return moved if isinstance(path, Path) else str(moved)
    return path


def relocate(job: Job, source: str | None, target: str | None) -> Job:
    """The job with its model files, VAE, refiner, LoRA / embeddings / upscaler folders and ControlNet files moved
    from the front end's models folder to this worker's."""
    if not source or not target or Path(source) == Path(target):
        return job

    def ref(model: Any) -> Any:
        return model and dataclasses.replace(model, path=_moved(model.path, source, target),
                                             vae=_moved(model.vae, source, target))

    def unit(u: Any) -> Any:  # a ControlUnit: its ControlNet file and its annotators folder
        return dataclasses.replace(u, model=_moved(u.model, source, target),
                                   annotators=_moved(u.annotators, source, target))

    request = job.request
    if request is not None:
        request = dataclasses.replace(
            request, **{k: _moved(getattr(request, k), source, target)
                        for k in ("lora_dir", "embeddings_dir", "upscalers_dir")},
            controls=[unit(u) for u in request.controls])
    extra = {k: [unit(u) for u in v] if k == "units" else _moved(v, source, target) for k, v in job.extra.items()}
    return dataclasses.replace(job, model=ref(job.model), refiner=ref(job.refiner), request=request, extra=extra)


def execute(job: Job, task: str, models_dir: str | None) -> tuple[str, Any]:
    """An RQ job: run ``job`` with this worker's Executor; ("done", (info, result)) or ("error", (status, detail))."""
    rq_job = get_current_job()
    assert rq_job is not None, "execute runs inside an RQ worker"
    redis, executor = rq_job.connection, STATE["executor"]
    skip = _Flag(redis, flag_key("skip", task))
    executor.controls = Controls(_Flag(redis, flag_key("interrupt", task)), skip, skip.clear)
    progress = {"seq": 0, "i": -1, "job_no": 0, "preview": None}

    def report(message: dict) -> None:
        if message["i"] == 0 and progress["i"] > 0:  # the next batch began
            progress["job_no"] += 1
        progress.update(seq=progress["seq"] + 1, i=message["i"], preview=message.get("preview"))
        rq_job.meta["progress"] = dict(progress)
        rq_job.save_meta()

    return run_job(executor, relocate(job, models_dir, STATE.get("models_dir")), report)


class GenerationWorker(SimpleWorker):
    """RQ's in-process worker, its running job heartbeated every ``lease / 3`` seconds with a ``lease`` TTL (RQ's
    forking workers beat from the parent while a child works; an in-process worker beats from a thread)."""

    lease = 30

    def get_heartbeat_ttl(self, job: RQJob, working_time: float = 0.0) -> int:
        return int(self.lease)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """The worker's own key lives at least ``worker_ttl`` (RQ also gives it the job's short lease), so a live
        worker stays listed between its beats."""
        super().heartbeat(max(timeout or 0, self.worker_ttl), pipeline)

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        """SimpleWorker's ``execute_job`` with the beating thread around the run."""
        execution = self.prepare_execution(job)
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.lease / 3):
                try:
                    self.maintain_heartbeats(job, execution)
                except RedisError:  # a broker hiccup: the next beat tries again
                    pass

        beat = threading.Thread(target=heartbeat, name="sd-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)


def serve_worker(redis: Redis, executor: Executor, models_dir: str | Path | None = None, name: str | None = None,
                 lease: int = 30, burst: bool = False) -> None:
    """Take jobs until stopped (SIGINT / SIGTERM finish the running job first, as RQ's workers do)."""
    STATE.update(executor=executor, models_dir=str(Path(models_dir).resolve()) if models_dir else None)
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    worker = GenerationWorker([worker_queue(redis, name), Queue(QUEUE, connection=redis)],  # its own jobs first
                              connection=redis, name=name, maintenance_interval=max(lease, 1),
                              worker_ttl=max(3 * lease, 30))  # an idle worker beats every worker_ttl - 15 s
    worker.lease = lease
    worker.work(burst=burst, logging_level="WARNING")
