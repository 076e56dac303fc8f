"""`benchmarks/compression.py --quick` runs every code path (fine-tune, distillation, throughput, the streaming
command's peak RSS, Markdown and plot) on tiny sizes, and the committed results follow the same schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = [
    "case",
    "bits_per_weight",
    "compress_gbps",
    "decompress_gbps",
    "copy_gbps",
    "logit_mse_initial",
    "logit_mse_distilled",
    "peak_mem_ratio",
]


def _check_schema(data: dict) -> None:
    assert set(data) == {"rows", "meta"}
    assert [list(r) for r in data["rows"]] == [ROW_KEYS, ROW_KEYS]
    lm, llama = data["rows"]
    for row in (lm, llama):
        assert 1.0 <= row["bits_per_weight"] <= 1.02  # METHOD §4: within 2% of 1 bit per compressed weight
        assert row["compress_gbps"] > 0 and row["decompress_gbps"] > 0 and row["copy_gbps"] > 0
        assert row["peak_mem_ratio"] > 0
    assert lm["logit_mse_initial"] > 0 and lm["logit_mse_distilled"] > 0
    assert llama["logit_mse_initial"] is None and llama["logit_mse_distilled"] is None
    for key in ("lm", "llama7b_shaped"):
        stream = data["meta"][key]["streaming_compress"]
        assert stream["command"].startswith("hf-obliviate compress --base")
        assert stream["linear_detection"].endswith("no torch)")  # both rows stream without importing torch
        assert stream["peak_mem_ratio"] == stream["peak_rss_bytes"] / stream["finetuned_checkpoint_bytes"]
        assert stream["checkpoint_bytes_read"] > stream["finetuned_checkpoint_bytes"]
        assert 0 < stream["setup_rss_bytes"] <= stream["peak_rss_bytes"]
        assert stream["working_mem_bytes"] == stream["peak_rss_bytes"] - stream["setup_rss_bytes"]
        assert stream["working_mem_vs_largest_tensor"] == stream["working_mem_bytes"] / stream["largest_tensor_bytes"]
    assert {"device", "command", "definitions", "torch"} <= set(data["meta"])


def test_compression_benchmark_quick(tmp_path):
    out = tmp_path / "compression.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compression.py"), "--quick", "--out", str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    _check_schema(data)
    assert data["meta"]["quick"] is True
    assert out.with_suffix(".md").read_text().count("\n| ") == 3  # header + two rows
    assert out.with_suffix(".png").stat().st_size > 1000


def test_committed_results_follow_the_schema():
    data = json.loads((ROOT / "benchmarks" / "results" / "compression.json").read_text())
    _check_schema(data)
    assert data["meta"]["quick"] is False
    assert data["rows"][0]["case"] == "smollm2-135m" and data["rows"][1]["case"] == "llama7b-shaped"
    assert (ROOT / "benchmarks" / "results" / "compression.md").is_file()
    assert (ROOT / "benchmarks" / "results" / "compression.png").is_file()
