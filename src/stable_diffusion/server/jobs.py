"""One generation at a time per device, first come first served: a bounded queue in front of a single thread
that hands each job to the worker process (server/worker.py) and waits for it, the progress A1111 clients poll,
and Interrupt / Skip, passed on to the worker, which stops at the next sampling step and returns what exists
(the step's x0 prediction, decoded)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


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
    future: Future = field(default_factory=Future)


class JobQueue:
    def __init__(self, max_queue: int = 16, on_interrupt: Callable[[], None] | None = None,
                 on_skip: Callable[[], None] | None = None) -> None:
        self.tasks: queue.Queue[_Task] = queue.Queue(maxsize=max_queue)
        self.progress = Progress()
        self.lock = threading.Lock()
        self.on_interrupt, self.on_skip = on_interrupt, on_skip
        self.pending = 0
        self.thread = threading.Thread(target=self._work, name="sd-worker", daemon=True)
        self.thread.start()

    def submit(self, run: Callable[[Callable[[dict], None]], Any], steps: int, batches: int, name: str) -> Future:
        task = _Task(run, steps, batches, name)
        with self.lock:
            try:
                self.tasks.put_nowait(task)
            except queue.Full:
                raise QueueFull(f"the queue is full ({self.tasks.maxsize} jobs waiting); retry later") from None
            self.pending += 1
            self.progress.job_count = self.pending
        return task.future

    def interrupt(self) -> None:
        with self.lock:
            if self.progress.job:
                self.progress.interrupted = True
                if self.on_interrupt is not None:
                    self.on_interrupt()

    def skip(self) -> None:
        with self.lock:
            if self.progress.job:
                self.progress.skipped = True
                if self.on_skip is not None:
                    self.on_skip()

    def _callback(self, info: dict) -> None:
        """A step of the running job: {"i": step index in its batch, "preview": base64 PNG or None}."""
        p = self.progress
        if info["i"] == 0 and p.sampling_step > 0:  # a new batch of this job began
            p.job_no += 1
            p.skipped = False
        p.sampling_step = info["i"] + 1
        if info.get("preview"):
            p.preview = info["preview"]

    def _work(self) -> None:
        while True:
            task = self.tasks.get()
            with self.lock:
                self.progress = Progress(job=task.name, job_count=self.pending, sampling_steps=task.steps,
                                         job_batches=task.batches, started=time.time(),
                                         job_timestamp=time.strftime("%Y%m%d%H%M%S"))
            result, error = None, None
            try:
                result = task.run(self._callback)
            except BaseException as failure:  # the worker never dies; the client gets the error
                error = failure
            with self.lock:  # idle before the client hears back, so its next /progress shows the job gone
                self.pending -= 1
                self.progress = Progress(job_count=self.pending)
            if error is None:
                task.future.set_result(result)
            else:
                task.future.set_exception(error)

    def state(self, skip_current_image: bool = False) -> dict:
        """GET /sdapi/v1/progress."""
        p = self.progress
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
