"""AdaptationWorker: run one adaptation job at a time off the serving thread.

The serving thread ``submit``s a job and keeps serving; it ``poll``s once per batch and gets the
finished :class:`JobResult` exactly once. A job is a callable taking a ``threading.Event`` that is
set when the job should stop (timeout or :meth:`AdaptationWorker.cancel`); long loops such as
``train_adaptor(..., cancel=event)`` check it. An exception inside the job is captured with its
traceback and reported as ``failed`` -- it never reaches the serving thread. A job past its
``timeout_s`` is reported as ``timeout`` at the next poll and its late result, if any, dropped
(Python threads cannot be killed; the job sees the cancel event).

The worker thread runs torch with one intra-op thread (OpenMP thread counts are per thread), so a
training job leaves the other cores to the serving thread's encoder.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from edge_runtime.errors import EdgeRuntimeError

IDLE, RUNNING, DONE, FAILED, TIMEOUT, CANCELLED = (
    "idle",
    "running",
    "done",
    "failed",
    "timeout",
    "cancelled",
)


class WorkerBusyError(EdgeRuntimeError):
    """A job was submitted while another one is still running."""


@dataclass
class JobResult:
    name: str
    status: str  # "done" | "failed" | "timeout" | "cancelled"
    value: Any = None
    error: str | None = None  # "ExcType: message"
    traceback: str | None = None
    started: float = 0.0
    finished: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == DONE

    @property
    def seconds(self) -> float:
        return self.finished - self.started


class AdaptationWorker:
    def __init__(
        self, torch_threads: int | None = 1, default_timeout_s: float | None = None
    ) -> None:
        self.torch_threads = torch_threads
        self.default_timeout_s = default_timeout_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._result: JobResult | None = None
        self._status = IDLE
        self._name = ""
        self._meta: dict[str, Any] = {}
        self._started = 0.0
        self._deadline: float | None = None
        self._gen = 0  # job generation: a timed-out job's late result is ignored

    @property
    def status(self) -> str:
        """idle | running | done | failed | timeout | cancelled (the last four until polled)."""
        with self._lock:
            self._check_deadline()
            return self._status

    @property
    def busy(self) -> bool:
        return self.status == RUNNING

    @property
    def job_name(self) -> str:
        return self._name

    def submit(
        self,
        job: Callable[[threading.Event], Any],
        *,
        name: str = "adaptation",
        timeout_s: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Start ``job(cancel_event)`` in a background thread. Raises WorkerBusyError if one runs
        or a finished result has not been polled yet."""
        with self._lock:
            self._check_deadline()
            if self._status == RUNNING:
                raise WorkerBusyError(f"adaptation job {self._name!r} is still running")
            if self._result is not None:
                raise WorkerBusyError(f"the result of job {self._name!r} has not been polled yet")
            self._gen += 1
            gen = self._gen
            self._cancel = threading.Event()
            self._status = RUNNING
            self._name = name
            self._meta = dict(meta or {})
            self._started = time.time()
            timeout = self.default_timeout_s if timeout_s is None else timeout_s
            self._deadline = None if timeout is None else time.monotonic() + float(timeout)
            cancel = self._cancel
            self._thread = threading.Thread(
                target=self._run, args=(job, cancel, gen), name=f"edge-adapt-{name}", daemon=True
            )
            self._thread.start()

    def _run(
        self, job: Callable[[threading.Event], Any], cancel: threading.Event, gen: int
    ) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)  # this thread only
        status, value, err, tb = DONE, None, None, None
        try:
            value = job(cancel)
            if cancel.is_set():
                status = CANCELLED
        except BaseException as exc:
            status, err, tb = FAILED, f"{type(exc).__name__}: {exc}", traceback.format_exc()
        with self._lock:
            if gen != self._gen or self._status != RUNNING:
                return  # timed out or cancelled and already reported
            self._result = JobResult(
                self._name, status, value, err, tb, self._started, time.time(), self._meta
            )
            self._status = status

    def _check_deadline(self) -> None:
        # Called with the lock held.
        if (
            self._status == RUNNING
            and self._deadline is not None
            and time.monotonic() > self._deadline
        ):
            self._cancel.set()
            self._result = JobResult(
                self._name,
                TIMEOUT,
                None,
                "TimeoutError: job exceeded its time limit",
                None,
                self._started,
                time.time(),
                self._meta,
            )
            self._status = TIMEOUT

    def poll(self) -> JobResult | None:
        """The finished job's result, once; None while running or idle. Resets to idle."""
        with self._lock:
            self._check_deadline()
            if self._result is None:
                return None
            result, self._result = self._result, None
            self._status = IDLE
            return result

    def cancel(self) -> None:
        """Ask the running job to stop; it is reported as ``cancelled`` at the next poll."""
        with self._lock:
            if self._status != RUNNING:
                return
            self._cancel.set()
            self._result = JobResult(
                self._name,
                CANCELLED,
                None,
                "cancelled",
                None,
                self._started,
                time.time(),
                self._meta,
            )
            self._status = CANCELLED

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the current job's thread ends (tests, shutdown). True if it ended."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()
