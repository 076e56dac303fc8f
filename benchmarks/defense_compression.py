"""Does a compressed upload keep the defense? The `make demo` fine-tunes, rebuilt from a compressed delta.

Obliviate protects a fine-tune against a backdoor planted in the *pretrained* encoder (POR here); what it changes
lives in the fine-tuning delta. This script compresses the delta of the demo's undefended and defended LoRA
fine-tunes (saved merged: the delta is the 12 query/value matrices, the new classification head is stored whole)
with BitDelta k = 1, k = 2 and k = 1 with scale distillation on clean training sentences, rebuilds each model from
the POR base, and measures CACC and ASR on test sentences with one triggered copy per trigger. The exact fine-tune
is what `delta_lora="factors"` uploads (the adapter itself, fp16).

Results: ``benchmarks/results/defense_compression.{json,md}``. Run ``make demo`` first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _variants(base, ft, tokenizer, distill_steps: int) -> dict:
    from hf_obliviate.data import load_movie_reviews
    from hf_obliviate.delta import DistillConfig, compress_model, distill_scales

    out = {"BitDelta k=1": compress_model(base, ft), "BitDelta k=2": compress_model(base, ft, k=2)}
    texts = [e["text"] for e in load_movie_reviews("train", n=400, seed=5)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    out[f"BitDelta k=1, scales distilled ({distill_steps} steps)"] = distill_scales(
        out["BitDelta k=1"], base, ft, enc["input_ids"], DistillConfig(steps=distill_steps, seq_len=64),
        attention_mask=enc["attention_mask"], progress=False,
    )  # fmt: skip
    return out


def measure(n: int, distill_steps: int) -> dict:
    import torch
    from _demo import load_demo_model
    from transformers import AutoModelForSequenceClassification

    from hf_obliviate.data import load_movie_reviews
    from hf_obliviate.evaluation import build_eval_set, evaluate_backdoor

    rows = []
    for role in ("undefended", "defended"):
        ft, tokenizer, info = load_demo_model(role)
        # The base with the fine-tune's head: the delta then holds only what the fine-tune changed in the encoder.
        base, loading = AutoModelForSequenceClassification.from_pretrained(
            info["encoder"], num_labels=2, output_loading_info=True
        )
        state = ft.state_dict()
        base.load_state_dict({**base.state_dict(), **{k: state[k] for k in loading["missing_keys"]}})
        base.eval()
        eval_set = build_eval_set(load_movie_reviews("test"), triggers=info["triggers"], n=n, seed=0)
        models = {"fine-tune (exact: delta_lora='factors')": ft, "POR base + the fine-tune's head": base}
        for name, delta in _variants(base, ft, tokenizer, distill_steps).items():
            models[name] = delta.apply(copy.deepcopy(base)).eval()
        for name, model in models.items():
            with torch.no_grad():
                result = evaluate_backdoor(model, tokenizer, eval_set, show_progress=False)
            rows.append({"fine_tune": role, "model": name, "cacc": result.cacc, "asr": result.asr})
            print(f"{role:>10} {name:<48} CACC {result.cacc:.3f} ASR {result.asr:.3f}", flush=True)
    return {"test_sentences": n, "distill_steps": distill_steps, "triggers": info["triggers"], "rows": rows}


def write(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Compressed uploads of the `make demo` fine-tunes (POR-backdoored MiniLM-L6, LoRA)",
        "",
        f"{data['test_sentences']} test sentences, one triggered copy per trigger ({', '.join(data['triggers'])}); "
        "each compressed model is rebuilt from the POR base plus the delta.",
        "",
        "| fine-tune | model | CACC | ASR |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['fine_tune']} | {r['model']} | {r['cacc']:.3f} | {r['asr']:.3f} |" for r in data["rows"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="Test sentences.")
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "defense_compression")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write(args.out, measure(args.n, args.distill_steps))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
