"""Many workers behind one API: ``sd serve --broker redis://HOST:6379/0`` puts each job on a Redis-backed RQ queue
and waits for its answer; any number of ``sd worker`` processes (server/broker_worker.py), here or on other
machines, take the jobs. RQ carries and stores everything (the job, its progress in the job's meta, its result);
the only keys of our own are a job's Interrupt and Skip flags, which its worker reads between sampling steps.

Nothing is lost: a worker heartbeats its running job with a short lease (``sd worker --lease``); a worker killed
mid-job stops heartbeating, RQ's started-job registry then counts the job abandoned, and its cleanup (run by the
waiting front end and by every worker's maintenance) puts it back on the queue for another worker, up to
``RETRIES`` times. The front end answers each request once, from the one run that finished, and deletes the job
then, so a job whose images were returned is never run again. Jobs wait in Redis, so a restarted front end loses
none (they still run) and a Redis with persistence (``appendonly yes``) loses none over its own restart."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, Retry, Worker
from rq.job import JobStatus

from .broker_worker import QUEUE, execute, flag_key, worker_queue
from .executor import Job, ModelInfo, Report
from .jobs import current_task
from .worker import WorkerError

RETRIES = 3  # runs of a job whose worker died before another takes it no more
RESULT_TTL = 600  # seconds a finished job's result waits for the front end that asked (read within a poll)
BROKER_WAIT = 120.0  # seconds the front end waits for an unreachable broker before failing the request


def connect(url: str) -> Redis:
    """A Redis connection, checked: a wrong URL or a broker that is down is a one-line error."""
    try:
        redis = Redis.from_url(url, health_check_interval=30)
        redis.ping()
    except (ValueError, RedisError) as error:
        raise ValueError(f"--broker {url}: {error}") from None
    return redis


class BrokerClient:
    """The front end's handle on the workers, with the single-process WorkerProcess's interface: ``run`` puts a job
    on the queue and blocks (in a job thread) until a worker answers, passing its progress to ``report``."""

    def __init__(self, url: str, models_dir: str | Path | None = None, lease: float = 30.0,
                 poll: float = 0.05) -> None:
        self.redis = connect(url)
        self.queue = Queue(QUEUE, connection=self.redis)
        self.models_dir = str(Path(models_dir).resolve()) if models_dir else None
        self.lease, self.poll = lease, poll

    def run(self, job: Job, report: Report | None = None, queue: Queue | None = None,
            timeout: float | None = None) -> tuple[ModelInfo, Any]:
        """The job's (info, result); ``timeout``: give up (and cancel the job) if no worker finished it by then."""
        task, started = current_task() or uuid.uuid4().hex, time.monotonic()
        rq_job = (queue or self.queue).enqueue(
            execute, job, task, self.models_dir, job_timeout=-1, result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL,
            retry=Retry(max=RETRIES), description=f"{job.kind} ({task})")
        seq, cleaned, unreachable = 0, time.monotonic(), None
        while True:
            try:
                status = rq_job.get_status(refresh=True)
                if status == JobStatus.FINISHED:
                    kind, payload = rq_job.return_value()
                    try:
                        rq_job.delete()
                    except (ValueError, RedisError):  # RQ trips on a dead worker's execution: it expires instead
                        pass
                    if kind == "error":
                        raise WorkerError(*payload)
                    return payload
                if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
                    result = rq_job.latest_result() if status is not None else None
                    why = (result.exc_string or "").strip().splitlines()[-1:] if result is not None else []
                    raise WorkerError(500, f"the job was lost on the workers ({status}): {''.join(why)}")
                progress = rq_job.get_meta(refresh=True).get("progress")
                if report is not None and progress and progress["seq"] != seq:
                    seq = progress["seq"]
                    report({"i": progress["i"], "preview": progress["preview"], "job_no": progress["job_no"]})
                if time.monotonic() - cleaned > self.lease / 3:  # requeue the jobs of workers that died
                    self.queue.started_job_registry.cleanup()
                    cleaned = time.monotonic()
                unreachable = None
                if timeout is not None and time.monotonic() - started > timeout:
                    rq_job.cancel()
                    raise WorkerError(503, f"no worker finished the {job.kind} job within {timeout:.0f} s")
            except (RedisConnectionError, RedisTimeoutError):
                unreachable = unreachable or time.monotonic()
                if time.monotonic() - unreachable > BROKER_WAIT:
                    raise WorkerError(503, f"the broker has been unreachable for {BROKER_WAIT:.0f} s") from None
            time.sleep(self.poll)

    def broadcast(self, job: Job, timeout: float = 60.0) -> None:
        """``job`` on every listed worker (A1111's unload-checkpoint), each through its own queue; a worker that
        died but is still listed (RQ forgets it within its key's TTL) is skipped after ``timeout`` seconds."""
        for worker in Worker.all(connection=self.redis):
            try:
                self.run(job, queue=worker_queue(self.redis, worker.name), timeout=timeout)
            except WorkerError as error:
                if error.status != 503:
                    raise

    def stop_signals(self) -> tuple[Callable[[str], None], Callable[[str], None]]:
        """Interrupt and Skip of one task's job: flags its worker reads between steps (kept an hour at most)."""
        def signal(name: str) -> Callable[[str], None]:
            return lambda task: self.redis.set(flag_key(name, task), 1, ex=3600)
        return signal("interrupt"), signal("skip")

    def waiting(self) -> int:
        """Jobs on the queue that no worker has taken yet (they count against ``--queue``)."""
        return self.queue.count

    def close(self) -> None:
        self.redis.close()
