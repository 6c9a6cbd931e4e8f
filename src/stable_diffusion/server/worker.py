"""The server's generation process. Models load and jobs run in a child process (multiprocessing, spawn), so the
HTTP process holds no GIL-hungry work and answers ``progress`` and ``interrupt`` at once during any job.

Parent and child talk over one Pipe: the parent sends a Job, the child answers with progress messages and then
one ``done`` or ``error``. Interrupt and Skip are two process Events the child reads between sampling steps and
inside the text encoder and VAE. If the child dies (out of memory, a crash in native code), the job fails with
a clear error and a fresh child is started for the next one."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

from ..checkpoints.errors import first_line
from ..pipeline import RunOptions
from .executor import Controls, Executor, Job, ModelInfo, Report


class WorkerError(Exception):
    """A job failed in the worker: ``status`` is the HTTP status it deserves (4xx: the request's fault)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def run_job(executor: Executor, job: Job, report: Report) -> tuple[str, Any]:
    """("done", (info, result)) or ("error", (HTTP status, detail)): a worker never dies of a job."""
    try:
        return "done", executor.run(job, report)
    except ValueError as error:  # a bad request or model file (CheckpointError is one): the caller's fault
        return "error", (422, first_line(error, 1000))
    except Exception as error:  # noqa: BLE001 - the caller hears why
        return "error", (500, f"{type(error).__name__}: {first_line(error)}")


def _child(conn: Any, options: RunOptions, interrupt: Any, skip: Any) -> None:
    """The worker process's main loop."""
    executor = Executor(options, Controls(interrupt.is_set, skip.is_set, skip.clear))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(run_job(executor, job, lambda message: conn.send(("progress", message))))


class WorkerProcess:
    """The parent's handle on the child: ``run`` sends a job and blocks (in the job queue's thread) until the
    child answers, passing progress messages to ``report`` on the way."""

    def __init__(self, options: RunOptions | None = None) -> None:
        self.options = options or RunOptions()
        self.context = multiprocessing.get_context("spawn")
        self.interrupt, self.skip = self.context.Event(), self.context.Event()
        self.lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self.conn, child_conn = self.context.Pipe()
        self.process = self.context.Process(target=_child, args=(child_conn, self.options, self.interrupt, self.skip),
                                            name="sd-worker", daemon=True)
        self.process.start()
        child_conn.close()

    def run(self, job: Job, report: Report | None = None) -> tuple[ModelInfo, Any]:
        with self.lock:
            self.interrupt.clear()
            self.skip.clear()
            try:
                self.conn.send(job)
                while True:
                    kind, payload = self.conn.recv()
                    if kind == "progress":
                        if report is not None:
                            report(payload)
                    elif kind == "done":
                        return payload
                    else:
                        raise WorkerError(*payload)
            except (EOFError, OSError, BrokenPipeError):
                code = self.process.exitcode
                self.process.join(5)
                self._start()
                raise WorkerError(500, f"the generation worker stopped (exit code {code}); a new one was started, "
                                       f"retry the request") from None

    def broadcast(self, job: Job) -> None:
        """``job`` on every worker: here the one."""
        self.run(job)

    def waiting(self) -> int:
        """Jobs held beyond the server's own queue: none (the broker's count its queue)."""
        return 0

    def stop_signals(self) -> tuple[Callable[[str], None], Callable[[str], None]]:
        """Interrupt and Skip of the running job (one at a time here, whatever its task id)."""
        return (lambda task: self.interrupt.set()), (lambda task: self.skip.set())

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
