"""The README's quick start runs as written (it is examples/quickstart.py, checked line for line)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _quickstart_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_is_the_example_script():
    script = (ROOT / "examples" / "quickstart.py").read_text()
    body = script.split('"""', 2)[2].lstrip("\n")
    assert _quickstart_block().strip() == body.strip()


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _quickstart_block()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    # the defaults (CLASSIFIER_DEFAULTS): the scan-relative consistency term and the attention term, no amplification
    assert "loss_task" in last and "loss_consistency" in last and "loss_attn" in last and "loss_amp" not in last
    assert (tmp_path / "obliviate-quickstart").is_dir()
