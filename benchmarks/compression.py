"""Compression benchmark: size and fidelity of BitDelta (k = 1, 2) and the baselines on the bundled MiniLM-L6.

The "fine-tune" is synthetic (a seeded low-rank + dense perturbation of every Linear weight, about the relative size of
a real fine-tuning delta), so the numbers measure the codecs, not the security effect (see METHOD §7 for that).

    python benchmarks/compression.py [--out benchmarks/results/compression.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertModel

from hf_obliviate.bundled import minilm_path
from hf_obliviate.delta import CompressedDelta, compress_checkpoints

CONFIGS = [
    ("bitdelta", {"k": 1}),
    ("bitdelta", {"k": 2}),
    ("svd", {"rank": 16}),
    ("dare", {"p": 0.9}),
    ("magnitude", {"density": 0.1}),
]


def synthetic_finetune(base_dir: Path, out_dir: Path, seed: int = 0) -> BertModel:
    gen = torch.Generator().manual_seed(seed)
    ft = BertModel.from_pretrained(base_dir).eval()
    with torch.no_grad():
        for module in ft.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                scale = 0.01 * w.abs().mean()
                low = torch.randn(w.shape[0], 8, generator=gen) @ torch.randn(8, w.shape[1], generator=gen) / 8**0.5
                w.add_(scale * (low + torch.randn(w.shape, generator=gen)))
    ft.save_pretrained(out_dir)
    return ft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    base_dir = minilm_path()
    ids = torch.randint(1000, 20000, (8, 64), generator=torch.Generator().manual_seed(1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ft = synthetic_finetune(base_dir, tmp / "ft")
        base = BertModel.from_pretrained(base_dir).eval()
        with torch.no_grad():
            want = ft(input_ids=ids).last_hidden_state
            base_mse = float(((base(input_ids=ids).last_hidden_state - want) ** 2).mean())
        for method, kw in CONFIGS:
            t0 = time.perf_counter()
            out = compress_checkpoints(base_dir, tmp / "ft", tmp / f"{method}{kw}", method, progress=False, **kw)
            seconds = time.perf_counter() - t0
            delta = CompressedDelta.load(out)
            rebuilt = delta.apply(BertModel.from_pretrained(base_dir).eval())
            with torch.no_grad():
                mse = float(((rebuilt(input_ids=ids).last_hidden_state - want) ** 2).mean())
            size = delta.size_report()
            files = sum(p.stat().st_size for p in out.glob("delta-*.safetensors"))
            rows.append(
                {
                    "method": method,
                    **kw,
                    "file_bytes": files,
                    "ratio_vs_dense_fp16": size["ratio_vs_dense_fp16"],
                    "bits_per_linear_weight": size["bits_per_linear_weight"],
                    "rel_error_mean": delta.stats["rel_error"]["mean"],
                    "hidden_mse": mse,
                    "hidden_mse_base": base_mse,
                    "compress_seconds": round(seconds, 2),
                }
            )
    print(f"{'method':<27}{'bytes':>12}{'ratio':>8}{'bits/w':>8}{'rel err':>9}{'hidden MSE':>12}")
    for r in rows:
        name = r["method"] + str({k: r[k] for k in ("k", "rank", "p", "density") if k in r})
        print(
            f"{name:<27}{r['file_bytes']:>12}{r['ratio_vs_dense_fp16']:>8.2f}"
            f"{(r['bits_per_linear_weight'] or 0):>8.2f}{r['rel_error_mean']:>9.3f}{r['hidden_mse']:>12.3g}"
        )
    print(f"(base model hidden MSE to the fine-tune: {rows[0]['hidden_mse_base']:.3g})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": "bundled MiniLM-L6", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
