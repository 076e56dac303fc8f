"""The overhead benchmarks run end to end (one tiny row each) and write rows with the documented fields."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"plain_step_s", "defended_step_s", "time_ratio", "plain_peak_mb", "defended_peak_mb", "mem_ratio", "steps"}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["overhead.py", "overhead_sft.py"])
def test_one_row_end_to_end(tmp_path, script):
    out = tmp_path / "result"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--rows", "0", "--steps", "1", "--warmup", "0"]
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env, cwd=ROOT, timeout=600)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 1 and FIELDS <= set(rows[0])
    row = rows[0]
    assert row["plain_step_s"] > 0 and row["defended_step_s"] > 0 and row["plain_peak_mb"] > 0
    assert row["time_ratio"] == pytest.approx(row["defended_step_s"] / row["plain_step_s"], rel=1e-2)
    assert out.with_suffix(".md").is_file()
