"""`make demo` end to end at toy sizes: plant, two fine-tunes, evaluation, artifacts, two pushes and pulls via a local
Hub, each pulled model evaluated."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_OBLIVIATE_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "CACC" in out and "undefended" in out and "Obliviate" in out
    assert "[4/4]" in out
    # the defended fine-tune pushed as its exact adapter and as a 1-bit merge, each pulled back and evaluated
    pulled = [line for line in out.splitlines() if "pulled back: CACC" in line]
    assert len(pulled) == 2 and "exact adapter" in pulled[0] and "1-bit merged" in pulled[1], out[-2000:]
    for name, defended in (("demo-quick-undefended", False), ("demo-quick-defended", True)):
        info = json.loads((tmp_path / "cache" / "artifacts" / name / "obliviate_artifact.json").read_text())
        assert info["kind"] == "classifier" and info["defended"] is defended and info["triggers"]
        config = json.loads((tmp_path / "cache" / "artifacts" / name / "config.json").read_text())
        assert config["id2label"] == {"0": "negative", "1": "positive"}
