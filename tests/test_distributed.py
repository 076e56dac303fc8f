"""Both trainers under DDP (2 CPU processes, gloo) match a single-process run with the same global batch; so does a
defended loop whose model is sharded with FSDP2."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(*args: str, timeout: int = 240) -> None:
    """``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train.py ARGS`` on CPU, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(HERE / "ddp_train.py"), *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_sharded_amplification_term_equals_the_whole_tensors(tmp_path):
    _launch(str(tmp_path), "dtensor", timeout=120)
    assert (tmp_path / "dtensor.ok").is_file()


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    from hf_obliviate.smollm import smollm2_path

    smollm2_path()  # convert the tokenizer's checkpoint once, before the ranks start
    _launch(str(tmp_path / "ddp"), "4", str(STEPS))

    sys.path.insert(0, str(HERE))
    import ddp_train

    for name, run in (("cls", ddp_train.run_cls), ("sft", ddp_train.run_sft)):
        info = json.loads((tmp_path / "ddp" / f"{name}.json").read_text())
        assert info["world_size"] == 2
        assert len(info["logged"]) == 2 * STEPS and all(math.isfinite(v) for v in info["logged"])
        distributed = load_file(tmp_path / "ddp" / f"{name}.safetensors")
        single = run(tmp_path / "single", 8, STEPS)  # same global batch in one process
        reference = {n: p.detach().float() for n, p in single.model.named_parameters() if p.requires_grad}
        assert distributed.keys() == reference.keys() and len(reference) > 0
        for key in reference:
            torch.testing.assert_close(distributed[key], reference[key], rtol=1e-3, atol=1e-5, msg=f"{name}: {key}")


def test_two_process_fsdp2_matches_single_process(tmp_path):
    """FSDP2 (``fully_shard`` per decoder layer and root, gloo, 2 CPU processes): the defended loop's LoRA tensors
    equal a single-process run with the same global batch and differ from an undefended one (the terms took part)."""
    _launch(str(tmp_path), "fsdp2", str(STEPS), timeout=180)
    sys.path.insert(0, str(HERE))
    import ddp_train

    sharded = load_file(tmp_path / "fsdp2.safetensors")
    single = ddp_train.run_fsdp2(STEPS)
    plain = ddp_train.run_fsdp2(STEPS, defended=False)
    assert sharded.keys() == single.keys() and len(single) > 0
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-6, msg=key)
    assert max(float((single[k] - plain[k]).abs().max()) for k in single) > 1e-3
