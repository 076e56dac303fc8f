"""Worker processes for CPU-bound runs (fine-tunes): several at a time, the cores split between them."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import torch

__all__ = ["spawn_pool", "threads_per_worker"]


def threads_per_worker(workers: int) -> int:
    """``cpu_count // workers`` torch threads, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, each on [`threads_per_worker`] torch threads.

    Matrix products on small CPU batches do not use two threads fully, so on 2 cores two one-thread fine-tunes side
    by side get through more work than one two-thread fine-tune after another (1.48× for MiniLM cells of the defense
    benchmark, about 1.8× for SmolLM2 fine-tunes of the free-lunch run). Each worker is a fresh interpreter
    (``spawn``), so it inherits none of the parent's torch state; its arguments and results must pickle."""
    import multiprocessing

    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads_per_worker(workers), os.getpid()),
    )


def _start_worker(threads: int, parent: int, poll_seconds: float = 1.0) -> None:
    """Set the worker's torch threads, and end the worker once its parent is gone: a parent stopped by SIGTERM or
    SIGKILL runs no clean-up, and its workers would otherwise go on with their fine-tunes as orphans."""
    import threading
    import time

    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
