"""hf_obliviate.parallel: workers set their torch threads and do not outlive a parent stopped without clean-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from hf_obliviate.parallel import spawn_pool

    def work(path):
        with open(path, "w") as f:
            f.write(f"{os.getpid()} {torch.get_num_threads()}")
        time.sleep(120)

    if __name__ == "__main__":
        pool = spawn_pool(2)
        pool.submit(work, sys.argv[1])
        time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its new parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_workers_end_with_their_parent(tmp_path, sig):
    script, marker = tmp_path / "parent.py", tmp_path / "worker.txt"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(marker)])
    worker = None
    try:
        deadline = time.time() + 60
        while not (marker.is_file() and marker.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        worker, threads = map(int, marker.read_text().split())
        assert threads == max(1, (os.cpu_count() or 1) // 2)
        assert _alive(worker)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        deadline = time.time() + 15
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived its parent"
    finally:
        parent.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)  # leave no orphan behind when the test fails
