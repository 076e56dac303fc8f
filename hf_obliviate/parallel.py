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
        initializer=torch.set_num_threads,
        initargs=(threads_per_worker(workers),),
    )
