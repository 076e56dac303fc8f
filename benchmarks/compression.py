"""Compression benchmark (METHOD §4): bits per weight, codec throughput next to a plain copy, logit MSE before and
after scale distillation, and the peak memory of the streaming ``hf-obliviate compress`` command.

Rows:

- ``smollm2-135m``: the bundled SmolLM2-135M-Instruct (fp32) after a short full fine-tune on bundled movie-review
  sentences; the logit MSE to the fine-tuned model is measured on held-out sentences before and after scale
  distillation on other sentences.
- ``llama7b-shaped``: random fp16 matrices with the shapes of Llama-7B decoder layers (q/k/v/o 4096×4096, gate/up
  11008×4096, down 4096×11008) as base, plus a small random delta. Enough to measure throughput and memory, not a
  whole 7B model; no logits (``null``).

Throughput is measured in one process, side by side: ``compress`` = ``Δ = W_ft − W_base`` in fp32 + BitDelta k = 1
encoding (α and packed signs) of every Linear weight; ``decompress`` = ``W_base + α·sign`` back in the checkpoint
dtype; ``copy`` = ``torch.clone`` of the same fine-tuned tensors. All three divide the bytes of the fine-tuned Linear
weights (in the checkpoint dtype) by the best of ``--repeats`` wall times. ``peak_mem_ratio`` is the peak resident set
size of ``hf-obliviate compress BASE FT OUT`` (a subprocess; kernel high-water mark via ``getrusage``) divided by the
size of the fine-tuned checkpoint (target ≤ 0.5 for SmolLM2); it reads twice that (base and fine-tune).

    python benchmarks/compression.py                # full run, a few minutes on 2 CPU cores
    python benchmarks/compression.py --quick --out /tmp/c.json   # tiny shapes (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hf_obliviate.delta import (
    BitDeltaPairEncoder,
    CompressedDelta,
    DistillConfig,
    compress_model,
    distill_scales,
    logit_mse,
)
from hf_obliviate.delta.checkpoint import linear_weight_names

RESULTS = Path(__file__).parent / "results" / "compression.json"
LLAMA7B_LAYER = {  # name -> (d_out, d_in) of one Llama-7B decoder layer's Linear weights
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


# ------------------------------------------------------------------------------------------------------ helpers
def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(pairs: list[tuple[torch.Tensor, torch.Tensor]], repeats: int) -> dict[str, float]:
    """GB/s of BitDelta k=1 compress / decompress and of a plain clone, over the same fine-tuned tensors."""
    nbytes = sum(ft.numel() * ft.element_size() for _, ft in pairs)
    encoded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compress() -> None:  # what `hf-obliviate compress` runs per Linear: one fused pass over chunk pairs
        encoded.clear()
        for base, ft in pairs:
            encoder = BitDeltaPairEncoder.from_tensors(base, ft)
            encoded.append(encoder.entry(tuple(ft.shape)))
            encoder.rel_error  # noqa: B018 - the statistic the command records, part of the cost

    targets = [base.clone() for base, _ in pairs]  # the loaded base model's parameters, updated in place

    def decompress() -> None:  # what the loader runs (`CompressedDelta.apply`): base += α·sign, chunk by chunk
        for target, entry in zip(targets, encoded):
            entry.add_to_(target)

    def copy() -> None:
        for _, ft in pairs:
            ft.clone()

    copy_s = _best_seconds(copy, max(repeats, 3))
    compress_s = _best_seconds(compress, repeats)
    decompress_s = _best_seconds(decompress, repeats)
    copy_s = min(copy_s, _best_seconds(copy, max(repeats, 3)))  # before and after: same machine load
    gb = nbytes / 1e9
    return {
        "compress_gbps": gb / compress_s,
        "decompress_gbps": gb / decompress_s,
        "copy_gbps": gb / copy_s,
        "linear_bytes": nbytes,
    }


def file_copy_gbps(folder: Path, repeats: int = 2) -> float:
    """GB/s of copying a checkpoint's safetensors files (page cache warm): a reference for the streaming command."""
    files = sorted(folder.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    with tempfile.TemporaryDirectory() as tmp:

        def run() -> None:
            for f in files:
                shutil.copyfile(f, Path(tmp) / f.name)

        return nbytes / 1e9 / _best_seconds(run, repeats)


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "hf-obliviate"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hf_obliviate.cli"]


def _child_peak_rss(cmd: list[str]) -> tuple[int, float]:
    """Runs ``cmd`` in a child process; returns its peak RSS in bytes (kernel high-water mark) and wall seconds."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t0 = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"  # KiB on Linux
        "print(rc, peak * 1024, time.perf_counter() - t0)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, check=True)
    rc, peak, seconds = proc.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return int(peak), float(seconds)


def largest_tensor_bytes(folder: Path) -> int:
    from hf_obliviate.delta.checkpoint import CheckpointReader

    with CheckpointReader(folder) as reader:
        return max(
            torch.Size(reader.shape(n)).numel() * torch.empty((), dtype=reader.dtype(n)).element_size()
            for n in reader.names()
        )


def linear_detection(folder: Path) -> str:
    """How ``hf-obliviate compress`` finds the Linear weights of this checkpoint: ``by name`` (a verified
    architecture: the pass runs without torch) or ``by type`` (torch and transformers build it on the meta device)."""
    from hf_obliviate.delta.checkpoint import CheckpointReader
    from hf_obliviate.delta.linear_names import linear_weight_names_by_name

    with CheckpointReader(folder) as reader:
        config = reader.config()
        found = linear_weight_names_by_name({n: reader.shape(n) for n in reader.names()}, config)
    if config is None:
        return "2-D *.weight tensors (no config.json; no torch)"
    return "by name (no torch)" if found is not None else "by type (torch + transformers)"


def streaming_peak_rss(base: Path, ft: Path, out: Path) -> dict[str, Any]:
    """Peak RSS of ``hf-obliviate compress`` in a child process, and of its set-up alone (the imports and the Linear
    detection, by name for a verified architecture, else by type on the meta device) in another: the difference is
    the memory the streaming pass itself holds."""
    cmd = _cli() + ["compress", "--base", str(base), "--finetuned", str(ft), "--output_dir", str(out)]
    peak, seconds = _child_peak_rss(cmd)
    setup = (
        "import sys\n"
        "from pathlib import Path\n"
        "import hf_obliviate.cli, hf_obliviate.hub.cli\n"
        "from transformers import HfArgumentParser\n"
        "from hf_obliviate.delta.checkpoint import CheckpointReader\n"
        "from hf_obliviate.delta.stream import checkpoint_linear_names\n"
        "with CheckpointReader(sys.argv[1]) as reader:\n"
        "    checkpoint_linear_names(Path(sys.argv[1]), reader, None)\n"
    )
    detection = linear_detection(ft)
    setup_peak, _ = _child_peak_rss([sys.executable, "-c", setup, str(ft)])
    ft_bytes = checkpoint_bytes(ft)
    largest = largest_tensor_bytes(ft)
    return {
        "command": " ".join(["hf-obliviate", *cmd[len(_cli()) :]]),
        "linear_detection": detection,
        "peak_rss_bytes": peak,
        "setup_rss_bytes": setup_peak,
        "working_mem_bytes": peak - setup_peak,
        "largest_tensor_bytes": largest,
        "working_mem_vs_largest_tensor": (peak - setup_peak) / largest,
        "checkpoint_bytes_read": checkpoint_bytes(base) + ft_bytes,
        "finetuned_checkpoint_bytes": ft_bytes,
        "peak_mem_ratio": peak / ft_bytes,
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------------ SmolLM2 row
def _byte_ids(texts: list[str], seq_len: int, n: int, vocab: int) -> torch.Tensor:
    data = " ".join(texts).encode()
    ids = torch.tensor(list(data[: n * seq_len]), dtype=torch.long) % vocab
    return ids.reshape(n, seq_len)


def _token_windows(tokenizer, texts: list[str], seq_len: int, n: int) -> torch.Tensor:
    """Exactly ``n`` windows of ``seq_len`` tokens ([`token_windows`] gives at most ``n``)."""
    from hf_obliviate.delta.calibration import token_windows

    ids = token_windows(tokenizer, texts, n, seq_len)
    if tuple(ids.shape) != (n, seq_len):
        raise ValueError(f"Not enough text for {n} windows of {seq_len} tokens.")
    return ids


def finetuned_lm_row(tmp: Path, quick: bool, args) -> tuple[dict[str, Any], dict[str, Any]]:
    """Few-step full fine-tune of a causal LM on movie-review sentences, then all the measurements."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_obliviate.data import load_movie_reviews

    texts = [r["text"] for r in load_movie_reviews("train", n=2000, seed=0)]
    held_out = [r["text"] for r in load_movie_reviews("validation", n=200, seed=0)]
    seq = 32 if quick else 64
    if quick:  # a tiny random Llama with byte "tokens": no model download or conversion
        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=256, tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp / "base")
        base_dir, case = tmp / "base", "tiny-llama (quick)"
        train = _byte_ids(texts, seq, 4 * args.ft_steps, 256)
        calib = _byte_ids(texts[1000:], seq, 32, 256)
        evals = _byte_ids(held_out, seq, 8, 256)
    else:
        from transformers import AutoTokenizer

        from hf_obliviate.smollm import smollm2_path

        base_dir, case = smollm2_path(), "smollm2-135m"
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        train = _token_windows(tokenizer, texts, seq, 4 * args.ft_steps)
        calib = _token_windows(tokenizer, texts[1000:], seq, args.calib_windows)
        evals = _token_windows(tokenizer, held_out, seq, 16)

    load = dict(dtype=torch.float32)
    ft = AutoModelForCausalLM.from_pretrained(base_dir, **load)
    ft.train()
    opt = torch.optim.AdamW(ft.parameters(), lr=args.ft_lr)
    t0 = time.perf_counter()
    for step in range(args.ft_steps):
        batch = train[4 * step : 4 * step + 4]
        loss = ft(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    ft_seconds = time.perf_counter() - t0
    ft.eval()
    del opt
    ft.save_pretrained(tmp / "ft")
    base = AutoModelForCausalLM.from_pretrained(base_dir, **load).eval()

    delta = compress_model(base, ft, "bitdelta", k=1, progress=False)
    size = delta.size_report()
    rebuilt = delta.apply(AutoModelForCausalLM.from_pretrained(base_dir, **load).eval())
    mse_base = logit_mse(base, ft, evals)
    mse_initial = logit_mse(rebuilt, ft, evals)
    del rebuilt
    distill_cfg = DistillConfig(
        steps=args.distill_steps, batch_size=4, lr=args.distill_lr, num_sequences=calib.shape[0], seq_len=seq
    )
    t0 = time.perf_counter()
    distilled = distill_scales(delta, base, ft, calib, distill_cfg, progress=False)
    distill_seconds = time.perf_counter() - t0
    rebuilt = distilled.apply(AutoModelForCausalLM.from_pretrained(base_dir, **load).eval())
    mse_distilled = logit_mse(rebuilt, ft, evals)
    del rebuilt

    linear = sorted(linear_weight_names(ft))
    base_state, ft_state = base.state_dict(), ft.state_dict()
    pairs = [(base_state[n].detach(), ft_state[n].detach()) for n in linear]
    speed = throughput(pairs, args.repeats)
    stream = streaming_peak_rss(Path(base_dir), tmp / "ft", tmp / "delta-lm")
    streamed = CompressedDelta.load(tmp / "delta-lm")
    assert streamed.modules == delta.modules
    row = {
        "case": case,
        "bits_per_weight": size["bits_per_linear_weight"],
        "compress_gbps": speed["compress_gbps"],
        "decompress_gbps": speed["decompress_gbps"],
        "copy_gbps": speed["copy_gbps"],
        "logit_mse_initial": mse_initial,
        "logit_mse_distilled": mse_distilled,
        "peak_mem_ratio": stream["peak_mem_ratio"],
    }
    meta = {
        "model": str(base_dir) if quick else "bundled SmolLM2-135M-Instruct (fp32, dequantised Q4_1 GGUF)",
        "linear_matrices": len(linear),
        "linear_weights": size["linear_weights"],
        "linear_bytes": speed["linear_bytes"],
        "dtype": "float32",
        "ratio_vs_dense_fp16_whole_delta": size["ratio_vs_dense_fp16"],
        "finetune": {
            "data": "bundled Rotten Tomatoes train sentences",
            "steps": args.ft_steps,
            "batch": 4,
            "seq_len": seq,
            "optimizer": f"AdamW lr {args.ft_lr}",
            "seconds": ft_seconds,
        },
        "logit_mse": {
            "eval": f"{evals.shape[0]} held-out windows × {seq} tokens (validation sentences)",
            "base_vs_finetuned": mse_base,
        },
        "distillation": {
            "calibration": f"{calib.shape[0]} windows × {seq} tokens (train sentences not used by the fine-tune)",
            "steps": args.distill_steps,
            "batch": 4,
            "lr": args.distill_lr,
            "seconds": distill_seconds,
        },
        "streaming_compress": stream,
        "file_copy_gbps": file_copy_gbps(tmp / "ft"),
    }
    return row, meta


# ----------------------------------------------------------------------------------------- Llama-7B-shaped row
def llama_shaped_row(tmp: Path, quick: bool, args) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random fp16 matrices with Llama-7B layer shapes, base + small delta; two checkpoints on disk."""
    shapes = {k: (v[0] // 16, v[1] // 16) for k, v in LLAMA7B_LAYER.items()} if quick else LLAMA7B_LAYER
    gen = torch.Generator().manual_seed(0)
    base_state, ft_state = {}, {}
    for layer in range(args.layers):
        for name, shape in shapes.items():
            key = f"model.layers.{layer}.{name}.weight"
            w = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
            base_state[key] = w
            ft_state[key] = (w.float() + torch.randn(shape, generator=gen) * 1e-3).to(torch.float16)
    for folder, state in (("base7b", base_state), ("ft7b", ft_state)):
        (tmp / folder).mkdir()
        save_file(state, str(tmp / folder / "model.safetensors"), metadata={"format": "pt"})
    names = sorted(base_state)
    pairs = [(base_state[n], ft_state[n]) for n in names]
    speed = throughput(pairs, args.repeats)
    stream = streaming_peak_rss(tmp / "base7b", tmp / "ft7b", tmp / "delta7b")
    streamed = CompressedDelta.load(tmp / "delta7b")
    size = streamed.size_report()
    row = {
        "case": "llama7b-shaped" + (" (quick: 1/16 sizes)" if quick else ""),
        "bits_per_weight": size["bits_per_linear_weight"],
        "compress_gbps": speed["compress_gbps"],
        "decompress_gbps": speed["decompress_gbps"],
        "copy_gbps": speed["copy_gbps"],
        "logit_mse_initial": None,
        "logit_mse_distilled": None,
        "peak_mem_ratio": stream["peak_mem_ratio"],
    }
    meta = {
        "layers": args.layers,
        "shapes": {k: list(v) for k, v in shapes.items()},
        "linear_matrices": len(names),
        "linear_weights": size["linear_weights"],
        "linear_bytes": speed["linear_bytes"],
        "dtype": "float16",
        "delta": "N(0, 1e-3) added to N(0, 0.02) base weights, stored in fp16",
        "streaming_compress": stream,
        "file_copy_gbps": file_copy_gbps(tmp / "ft7b"),
    }
    return row, meta


# ------------------------------------------------------------------------------------------------------ output
def write_markdown(result: dict, path: Path) -> None:
    def fmt(v, digits=3):
        if v is None:
            return "n/a"
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)

    lines = [
        "# Delta compression benchmark (BitDelta k = 1)",
        "",
        f"{result['meta']['device']}, torch {result['meta']['torch']}. Throughput: GB of fine-tuned Linear weights "
        "(checkpoint dtype) per second, best of repeats, in one process next to a plain `torch.clone` of the same "
        "tensors. Peak memory: peak RSS of the streaming `hf-obliviate compress` command / bytes of the fine-tuned "
        "checkpoint (it reads base and fine-tune; target ≤ 0.5 for SmolLM2). The command runs without torch here: "
        "the Linear weights are found by name (SmolLM2's `llama` architecture is verified against detection by module "
        "type) or, without a config.json, as the 2-D `*.weight` tensors. Set-up: peak RSS of the same imports and "
        "the Linear detection alone; working memory = peak − set-up, compared with the largest tensor of the "
        "checkpoint (aim ≤ 3×).",
        "",
        "| case | bits/weight | compress GB/s | decompress GB/s | copy GB/s | compress / copy | logit MSE | "
        "logit MSE distilled | peak mem ratio | set-up RSS MB | working mem / largest tensor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        stream = next(m for m in result["meta"].values() if isinstance(m, dict) and m.get("case") == r["case"])
        stream = stream["streaming_compress"]
        lines.append(
            f"| {r['case']} | {r['bits_per_weight']:.4f} | {fmt(r['compress_gbps'])} | {fmt(r['decompress_gbps'])} | "
            f"{fmt(r['copy_gbps'])} | {r['compress_gbps'] / r['copy_gbps']:.2f} | {fmt(r['logit_mse_initial'])} | "
            f"{fmt(r['logit_mse_distilled'])} | {r['peak_mem_ratio']:.3f} | {stream['setup_rss_bytes'] / 2**20:.0f} | "
            f"{stream['working_mem_vs_largest_tensor']:.2f} |"
        )
    lines += ["", f"Regenerate: `{result['meta']['command']}`.", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional
        return
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.25
    for i, (key, label) in enumerate(
        [("compress_gbps", "compress"), ("decompress_gbps", "decompress"), ("copy_gbps", "copy (clone)")]
    ):
        ax.bar([j + (i - 1) * width for j in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['case']}\n{r['bits_per_weight']:.3f} bits/w" for r in rows])
    ax.set_ylabel("GB/s (fine-tuned Linear weights)")
    ax.set_yscale("log")
    ax.set_title(f"BitDelta k=1 throughput ({result['meta']['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS), help="JSON path; the .md and .png are written next to it.")
    parser.add_argument("--quick", action="store_true", help="Tiny shapes (seconds): for the test suite.")
    parser.add_argument("--layers", type=int, default=None, help="Llama-7B-shaped decoder layers (default 2).")
    parser.add_argument("--ft_steps", type=int, default=None, help="Fine-tuning steps (default 10; quick 3).")
    parser.add_argument("--ft_lr", type=float, default=None, help="Fine-tuning lr (default 1e-4; quick 1e-3).")
    parser.add_argument("--distill_steps", type=int, default=None, help="Distillation steps (default 30; quick 5).")
    parser.add_argument("--distill_lr", type=float, default=1e-5, help="Scale-distillation AdamW lr.")
    parser.add_argument("--repeats", type=int, default=None, help="Timing repeats (default 2; quick 1).")
    parser.add_argument("--calib_windows", type=int, default=64, help="Distillation calibration windows.")
    parser.add_argument("--only", choices=["lm", "llama7b_shaped"], default=None, help="Run one row only.")
    args = parser.parse_args(argv)
    quick = args.quick
    args.layers = args.layers if args.layers is not None else 1 if quick else 2
    args.ft_steps = args.ft_steps if args.ft_steps is not None else 3 if quick else 10
    args.ft_lr = args.ft_lr if args.ft_lr is not None else 1e-3 if quick else 1e-4
    args.distill_steps = args.distill_steps if args.distill_steps is not None else 5 if quick else 30
    args.repeats = args.repeats if args.repeats is not None else 1 if quick else 2
    torch.manual_seed(0)
    rows, metas = [], {}
    with tempfile.TemporaryDirectory(prefix="obliviate-bench-") as tmp:
        tmp = Path(tmp)
        for fn, key in ((finetuned_lm_row, "lm"), (llama_shaped_row, "llama7b_shaped")):
            if args.only not in (None, key):
                continue
            t0 = time.perf_counter()
            row, meta = fn(tmp, quick, args)
            meta["seconds_total"] = time.perf_counter() - t0
            meta["case"] = row["case"]
            rows.append(row)
            metas[key] = meta
            print(json.dumps(row), flush=True)
    shown = [a for a in (argv if argv is not None else sys.argv[1:])]
    result = {
        "rows": rows,
        "meta": {
            **metas,
            "device": f"CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "quick": quick,
            "method": "bitdelta k=1",
            "command": " ".join(["python benchmarks/compression.py", *shown]),
            "definitions": {
                "bits_per_weight": "8 × bytes of the packed signs and scales / number of compressed Linear weights",
                "compress_gbps": "fine-tuned Linear bytes / s for Δ = W_ft − W_base (fp32) + BitDelta encoding",
                "decompress_gbps": "fine-tuned Linear bytes / s for W_base + α·sign back in the checkpoint dtype",
                "copy_gbps": "fine-tuned Linear bytes / s for torch.clone of the same tensors (same run)",
                "logit_mse": "mean squared logit difference to the fine-tuned model on held-out text",
                "peak_mem_ratio": "peak RSS of `hf-obliviate compress` / bytes of the fine-tuned checkpoint",
                "compress / copy (Markdown)": "compress_gbps / copy_gbps (target ≥ 0.25)",
                "working_mem_vs_largest_tensor (meta.*.streaming_compress)": "(peak RSS − set-up RSS) / bytes of the "
                "checkpoint's largest tensor",
            },
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    write_plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
