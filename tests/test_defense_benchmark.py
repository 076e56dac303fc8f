"""`benchmarks/defense.py --quick` runs every code path (planting, search, cells, tables, plot) on tiny sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_defense_benchmark_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_OBLIVIATE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "defense"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "defense.py"), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    attacks = {c["attack"] for c in data["cells"]}
    assert {"por", "neuba", "badpre", "uor", "task-specific", "adaptive-por"} <= attacks
    assert "lora" in data["control"]
    for cell in data["cells"]:
        assert 0.0 <= cell["cacc_plain"] <= 1.0 and 0.0 <= cell["cacc_defended"] <= 1.0
        low = -1.0 if cell["metric"] == "accuracy_drop" else 0.0  # triggered copies may be classified better
        for key in ("asr_plain", "asr_defended"):
            if math.isnan(cell[key]):  # no clean copy was classified right (tiny run): the cell must say so
                assert cell["near_chance"] and cell["metric"] != "accuracy_drop", cell
            else:
                assert low <= cell[key] <= 1.0, cell
    assert {c["metric"] for c in data["cells"]} == {"asr", "accuracy_drop", "targeted_asr"}
    assert data["tuning"] and all(c["split"] == "validation" for c in data["tuning"])
    table = out.with_suffix(".md").read_text()
    assert "| por | lora |" in table and "Coefficient search" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    # Resume: a second run reuses every finished cell.
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "defense.py"), "--quick", "--resume", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0 and " und λ" not in again.stdout
