"""Overhead of defended training against plain PEFT training, measured side by side in one run.

For each PEFT type (LoRA, prefix tuning, bottleneck adapter) and shape (batch × sequence), a plain
``transformers.Trainer`` and an ``ObliviateTrainer`` are built on two copies of the same model (default attention:
SDPA). Their training steps alternate (plain, defended, plain, defended, ...) so both see the same machine state;
we report the median step time and the peak memory of each, and their ratios.

Peak memory of a step = the trainer's static footprint (its model's parameters and optimizer state) + the step's
transient peak above what was allocated when the step began: ``torch.cuda.max_memory_allocated`` minus
``memory_allocated`` on a GPU; on a CPU, the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` before every step) minus the resident size at the start of the step. Both models live in
one process (so that their steps can alternate); counting each one's own static footprint keeps the other model out
of its number.

Usage::

    python benchmarks/overhead.py                       # classification rows on the bundled MiniLM-L6
    python benchmarks/overhead.py --steps 10 --out benchmarks/results/overhead
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
PREFIX_TOKENS = 16  # hf_obliviate.models.wrap_peft's default num_virtual_tokens
ROWS = [
    ("lora", 16, 64),
    ("prefix", 16, 64),
    ("adapter", 16, 64),
    ("lora", 4, 512),
    ("prefix", 4, 512),
    ("adapter", 4, 512),
]


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return the memory in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS:")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM:")


def _static_bytes(model, optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def _examples(source: str, n: int, seed: int, texts: Path | None) -> list[dict]:
    if texts is None:
        from hf_obliviate.data import load_movie_reviews

        return load_movie_reviews("train", n=n, seed=seed, source=source)
    import random

    pool = json.loads(texts.read_text())[source]
    return random.Random(seed).sample(pool, n)


def _batch(tokenizer, batch: int, seq_len: int, device: torch.device, seed: int, texts: Path | None) -> dict:
    source = "imdb" if seq_len > 128 else "rotten_tomatoes"
    examples = _examples(source, batch, seed, texts)
    enc = tokenizer(
        [e["text"] for e in examples], truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
    )
    enc["labels"] = torch.tensor([e["label"] for e in examples])
    return {k: v.to(device) for k, v in enc.items()}


def _step(trainer, model, batch) -> None:
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def _load(model_dir: Path | None, random_init: bool):
    from hf_obliviate.models import load_classifier

    if not random_init:
        return load_classifier(model_dir, attn_implementation="sdpa")
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from hf_obliviate.bundled import minilm_path

    path = model_dir or minilm_path()
    config = AutoConfig.from_pretrained(path, num_labels=2, attn_implementation="sdpa")
    return AutoModelForSequenceClassification.from_config(config), AutoTokenizer.from_pretrained(path)


def measure_pair(plain, defended, make_batch, steps: int, warmup: int, device: torch.device) -> dict:
    """Alternate one plain and one defended step per batch; return the row's timing and memory fields (median step
    times, peak memories, their ratios).

    ``plain`` and ``defended`` are ``(trainer, model)`` pairs; ``make_batch(i)`` gives the i-th batch (a dict).
    """
    times: dict[str, list[float]] = {"plain": [], "defended": []}
    peaks: dict[str, list[int]] = {"plain": [], "defended": []}
    for i in range(warmup + steps):
        data = make_batch(i)
        for name, (trainer, model) in (("plain", plain), ("defended", defended)):
            before = _reset_peak(device)
            start = time.perf_counter()
            _step(trainer, model, dict(data))
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = _static_bytes(model, trainer.optimizer) + _peak_bytes(device) - before
            if i >= warmup:
                times[name].append(elapsed)
                peaks[name].append(peak)
    plain_t, defended_t = statistics.median(times["plain"]), statistics.median(times["defended"])
    plain_m, defended_m = max(peaks["plain"]), max(peaks["defended"])
    return {
        "plain_step_s": round(plain_t, 4),
        "defended_step_s": round(defended_t, 4),
        "time_ratio": round(defended_t / plain_t, 3),
        "plain_peak_mb": round(plain_m / 2**20, 1),
        "defended_peak_mb": round(defended_m / 2**20, 1),
        "mem_ratio": round(defended_m / plain_m, 3),
        "steps": steps,
    }


def measure_row(
    peft: str,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    device: torch.device,
    model_dir: Path | None = None,
    random_init: bool = False,
    texts: Path | None = None,
) -> dict:
    from transformers import Trainer

    from hf_obliviate.config import DEFAULT_LAMBDA_AMP, DEFAULT_LAMBDA_ATTN
    from hf_obliviate.models import wrap_peft
    from hf_obliviate.trainer import ObliviateTrainer, ObliviateTrainingArguments

    torch.manual_seed(0)
    base, tokenizer = _load(model_dir, random_init)
    if peft == "prefix":
        # peft's prefix keys shift BERT's position ids by the prefix length: 512 + 16 would overflow the table.
        seq_len = min(seq_len, base.config.max_position_embeddings - PREFIX_TOKENS)
    plain_model = wrap_peft(copy.deepcopy(base), peft).to(device).train()
    defended_model = wrap_peft(base, peft).to(device).train()
    common = dict(report_to="none", use_cpu=device.type == "cpu", learning_rate=1e-4, disable_tqdm=True)
    plain_args = ObliviateTrainingArguments(output_dir="/tmp/overhead-plain", obliviate=False, **common)
    # METHOD.md's two terms (ObliviateConfig's defaults), the overhead the targets are about; the classifier defaults'
    # consistency term adds a forward and backward pass of the inserted copy (README, Benchmarks)
    method = {"lambda_consistency": 0.0, "lambda_amp": DEFAULT_LAMBDA_AMP, "lambda_attn": DEFAULT_LAMBDA_ATTN}
    defended_args = ObliviateTrainingArguments(output_dir="/tmp/overhead-defended", **method, **common)
    plain = Trainer(model=plain_model, args=plain_args)
    defended = ObliviateTrainer(model=defended_model, args=defended_args)
    for trainer in (plain, defended):
        trainer.create_optimizer()
    timing = measure_pair(
        (plain, plain_model),
        (defended, defended_model),
        lambda i: _batch(tokenizer, batch, seq_len, device, seed=i, texts=texts),
        steps,
        warmup,
        device,
    )
    return {
        "model": "MiniLM-L6" + (" (random init)" if random_init else " (bundled)"),
        "peft": peft,
        "trainer": "cls",
        "batch": batch,
        "seq_len": seq_len,
        **timing,
    }


def write_results(rows: list[dict], out: Path, device: torch.device) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "memory": "static (params + optimizer state) + transient step peak ("
        + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS at step start")
        + ")",
        "targets": {"cls": {"time_ratio": 1.15, "mem_ratio": 1.20}, "sft": {"time_ratio": 1.20, "mem_ratio": 1.25}},
        "command": "python " + " ".join(sys.argv),
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Defended vs plain PEFT training overhead ({meta['device']})",
        "",
        "Median step time and peak memory, plain `transformers.Trainer` vs `ObliviateTrainer` (SDPA attention), "
        f"measured side by side with alternating steps. Memory: {meta['memory']}.",
        "",
        "| model | trainer | peft | batch × seq | plain s/step | defended s/step | time ratio | plain peak MB "
        "| defended peak MB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['trainer']} | {r['peft']} | {r['batch']} × {r['seq_len']} | {r['plain_step_s']} | "
            f"{r['defended_step_s']} | **{r['time_ratio']}** | {r['plain_peak_mb']} | {r['defended_peak_mb']} | "
            f"**{r['mem_ratio']}** |"
        )
    lines += ["", "Targets: classification time ≤ 1.15, memory ≤ 1.20; SFT time ≤ 1.20, memory ≤ 1.25.", ""]
    lines.append(f"Regenerate: `{meta['command']}` (torch {meta['torch']}, {meta['threads']} threads).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars of the time and memory ratios per row, with the target lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['trainer']} {r['peft']}\n{r['batch']}×{r['seq_len']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.6))
    ax.bar([i - 0.2 for i in x], [r["time_ratio"] for r in rows], 0.4, label="step time ratio")
    ax.bar([i + 0.2 for i in x], [r["mem_ratio"] for r in rows], 0.4, label="peak memory ratio")
    for y, style, name in ((1.15, "--", "cls time target"), (1.20, ":", "cls memory target")):
        ax.axhline(y, color="grey", linestyle=style, linewidth=1, label=name)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("defended / plain")
    ax.set_ylim(0.8, max(1.5, max(max(r["time_ratio"], r["mem_ratio"]) for r in rows) + 0.05))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per trainer and row.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "overhead", help="Path stem of .json/.md.")
    parser.add_argument("--rows", default="all", help="Comma-separated row indices to run (default all).")
    parser.add_argument("--model", type=Path, default=None, help="Model directory (default: the bundled MiniLM-L6).")
    parser.add_argument(
        "--random-init", action="store_true", help="Same architecture, random weights (timing and memory only)."
    )
    parser.add_argument("--texts", type=Path, default=None, help="JSON {source: [{text, label}]} instead of bundled.")
    parser.add_argument("--replot", action="store_true", help="Only redraw <out>.png from <out>.json.")
    args = parser.parse_args()
    if args.replot:
        data = json.loads(args.out.with_suffix(".json").read_text())
        plot(data["rows"], args.out.with_suffix(".png"), f"Obliviate overhead, {data['meta']['device']}")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    selected = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    rows = []
    for peft, batch, seq_len in selected:
        row = measure_row(
            peft, batch, seq_len, args.steps, args.warmup, device, args.model, args.random_init, args.texts
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_results(rows, args.out, device)
    meta_device = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    plot(rows, args.out.with_suffix(".png"), f"Obliviate overhead, {meta_device}")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
