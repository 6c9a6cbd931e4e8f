"""First come first served: a bounded queue in front of worker threads that hand each job to the generation
worker and wait for it (one thread for the single-process server's worker process, server/worker.py; one per
queue slot with a broker, server/broker.py, where many workers run jobs at once), the progress A1111 clients
poll, and Interrupt / Skip, passed on to the worker running the job, which stops at the next sampling step and
returns what exists (the step's x0 prediction, decoded)."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

StopSignal = Callable[[str], None]  # gets the task id of the job to stop


class QueueFull(Exception):  # noqa: N818 - named for what the client is told
    pass


@dataclass
class Progress:
    job: str = ""
    job_count: int = 0  # jobs queued or running
    job_no: int = 0  # batch (n_iter) index inside the running job
    job_batches: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    job_timestamp: str = "0"
    interrupted: bool = False
    skipped: bool = False
    preview: str | None = None  # base64 PNG of the latest x0 prediction
    textinfo: str | None = None


@dataclass
class _Task:
    run: Callable[[Callable[[dict], None]], Any]  # gets the step callback
    steps: int
    batches: int
    name: str
    owner: str = ""  # who asked (user and address): their progress, interrupt and skip
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    progress: Progress = field(default_factory=Progress)
    future: Future = field(default_factory=Future)


_current = threading.local()  # the task a worker thread runs


def current_task() -> str:
    """The id of the task the calling worker thread runs ("" outside one)."""
    task = getattr(_current, "task", None)
    return task.id if task is not None else ""


class JobQueue:
    """``concurrency`` tasks run at once (each in its thread); ``max_queue`` more may wait (counting ``backlog()``,
    the jobs a broker holds that no worker took yet). Interrupt and Skip reach the caller's running task (with one
    slot, whichever runs, as A1111); ``on_interrupt`` / ``on_skip`` get its task id."""

    def __init__(self, max_queue: int = 16, on_interrupt: StopSignal | None = None,
                 on_skip: StopSignal | None = None, concurrency: int = 1,
                 backlog: Callable[[], int] | None = None) -> None:
        self.tasks: queue.Queue[_Task] = queue.Queue()
        self.max_queue, self.backlog = max_queue, backlog or (lambda: 0)  # backlog: jobs waiting elsewhere
        self.running: list[_Task] = []
        self.lock = threading.Lock()
        self.on_interrupt, self.on_skip = on_interrupt, on_skip
        self.pending = 0
        self.threads = [threading.Thread(target=self._work, name=f"sd-jobs-{i}", daemon=True)
                        for i in range(concurrency)]
        for thread in self.threads:
            thread.start()

    def submit(self, run: Callable[[Callable[[dict], None]], Any], steps: int, batches: int, name: str,
               owner: str = "") -> Future:
        task = _Task(run, steps, batches, name, owner)
        with self.lock:
            waiting = self.pending - len(self.running) + self.backlog()
            if waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); retry later")
            self.pending += 1
            self.tasks.put_nowait(task)
        return task.future

    def _targets(self, owner: str) -> list[_Task]:
        mine = [t for t in self.running if t.owner == owner]
        return mine if mine or len(self.threads) > 1 else list(self.running)

    def interrupt(self, owner: str = "") -> None:
        with self.lock:
            for task in self._targets(owner):
                task.progress.interrupted = True
                if self.on_interrupt is not None:
                    self.on_interrupt(task.id)

    def skip(self, owner: str = "") -> None:
        with self.lock:
            for task in self._targets(owner):
                task.progress.skipped = True
                if self.on_skip is not None:
                    self.on_skip(task.id)

    def interrupted(self) -> bool:
        """Whether the calling worker thread's task was interrupted (between the cells of an X/Y/Z plot)."""
        task = getattr(_current, "task", None)
        return task is not None and task.progress.interrupted

    def _callback(self, info: dict) -> None:
        """A step of the calling thread's task: {"i": step index in its batch, "preview": base64 PNG or None,
        and from a broker "job_no": the batch}."""
        p = _current.task.progress
        job_no = info.get("job_no", p.job_no + 1 if info["i"] == 0 and p.sampling_step > 0 else p.job_no)
        if job_no != p.job_no:  # a new batch of this job began
            p.job_no, p.skipped = job_no, False
        p.sampling_step = info["i"] + 1
        if info.get("preview"):
            p.preview = info["preview"]

    def _work(self) -> None:
        while True:
            task = self.tasks.get()
            with self.lock:
                task.progress = Progress(job=task.name, sampling_steps=task.steps, job_batches=task.batches,
                                         started=time.time(), job_timestamp=time.strftime("%Y%m%d%H%M%S"))
                self.running.append(task)
            _current.task = task
            result, error = None, None
            try:
                result = task.run(self._callback)
            except BaseException as failure:  # the worker never dies; the client gets the error
                error = failure
            _current.task = None
            with self.lock:  # idle before the client hears back, so its next /progress shows the job gone
                self.pending -= 1
                self.running.remove(task)
            if error is None:
                task.future.set_result(result)
            else:
                task.future.set_exception(error)

    def state(self, skip_current_image: bool = False, owner: str = "") -> dict:
        """GET /sdapi/v1/progress: the caller's running job, else the longest-running one, else idle."""
        with self.lock:
            mine = [t for t in self.running if t.owner == owner]
            task = (mine or self.running or [None])[0]
            p = task.progress if task is not None else Progress()
            p.job_count = self.pending
        if not p.job:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                              "job_count": p.job_count, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                              "sampling_steps": 0}}
        done = (p.job_no + p.sampling_step / max(1, p.sampling_steps)) / max(1, p.job_batches)
        elapsed = time.time() - p.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        return {
            "progress": min(done, 1.0), "eta_relative": max(eta, 0.0),
            "current_image": None if skip_current_image else p.preview, "textinfo": p.textinfo,
            "state": {"skipped": p.skipped, "interrupted": p.interrupted, "stopping_generation": p.interrupted,
                      "job": p.job, "job_count": p.job_count, "job_timestamp": p.job_timestamp,
                      "job_no": p.job_no, "sampling_step": p.sampling_step, "sampling_steps": p.sampling_steps},
        }
