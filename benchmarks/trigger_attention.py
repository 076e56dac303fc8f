"""Where a planted trigger draws attention, layer by layer, and what the defense changed there.

For the models of `make demo` (the bundled MiniLM-L6, the same with POR planted, and the undefended and defended
LoRA fine-tunes of that POR encoder) this inserts each POR trigger once into validation sentences (never the test
sentences) and measures, per layer, with `hf_obliviate.probing.trigger_attention`:

* the share of the [CLS] row's attention (head mean) that falls on the trigger, and the largest share of one head;
* the share of every real token's row;
* the [CLS] row's pre-softmax logit norm, which the reference attention term penalises.

Results go to ``benchmarks/results/trigger_attention.{json,md}``. Run ``make demo`` first (it trains the two
fine-tunes; a minute here afterwards, on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MEASURES = ("summary", "summary_top_head", "all_rows", "summary_logit_norm")


def measure(n: int, seed: int) -> dict:
    from _demo import load_demo_model

    from hf_obliviate.bundled import minilm_path
    from hf_obliviate.data import load_movie_reviews
    from hf_obliviate.models import load_classifier
    from hf_obliviate.probing import trigger_attention

    undefended, tokenizer, info = load_demo_model("undefended")
    defended, _, defended_info = load_demo_model("defended")
    encoder = info["encoder"]
    models = {
        "MiniLM-L6 (clean)": load_classifier(minilm_path())[0].eval(),
        "POR encoder": load_classifier(encoder)[0].eval(),
        "POR + LoRA, undefended": undefended,
        "POR + LoRA, Obliviate": defended,
    }
    texts = [e["text"] for e in load_movie_reviews("validation", n=n, seed=seed)]
    results = {}
    for name, model in models.items():
        per_trigger = [trigger_attention(model, tokenizer, texts, t, seed=seed) for t in info["triggers"]]
        # per layer, the mean over triggers
        results[name] = {key: [statistics.mean(v) for v in zip(*(getattr(r, key) for r in per_trigger))]
                         for key in MEASURES}  # fmt: skip
        print(name, " ".join(f"{v:.3f}" for v in results[name]["summary"]), flush=True)
    return {
        "triggers": info["triggers"],
        "sentences_per_trigger": n,
        "seed": seed,
        "encoder": Path(encoder).name,
        "fine_tunes": {"undefended": {k: info.get(k) for k in ("cacc", "asr")},
                       "defended": {k: defended_info.get(k) for k in ("cacc", "asr", "lambda_amp", "lambda_attn")}},
        "models": results,
    }  # fmt: skip


def write(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    layers = len(next(iter(data["models"].values()))["summary"])
    header = "| model | " + " | ".join(f"layer {i + 1}" for i in range(layers)) + " |"
    rule = "|---|" + "---|" * layers
    titles = {
        "summary": "Share of the [CLS] row's attention on the trigger (head mean)",
        "summary_top_head": "The same, largest share of one head",
        "all_rows": "Share of every real token's attention row on the trigger",
        "summary_logit_norm": "[CLS] row's pre-softmax logit norm (head mean): what the reference term penalises",
    }
    lines = [
        "# Where the POR trigger draws attention (MiniLM-L6, `make demo` models)",
        "",
        f"Each of the POR triggers ({', '.join(data['triggers'])}) inserted once at a random word position into "
        f"{data['sentences_per_trigger']} Rotten Tomatoes validation sentences (seed {data['seed']}); values are "
        "means over sentences and triggers. Fine-tunes: undefended CACC "
        f"{data['fine_tunes']['undefended']['cacc']:.3f} / ASR {data['fine_tunes']['undefended']['asr']:.3f}, "
        f"Obliviate (λ_amp {data['fine_tunes']['defended']['lambda_amp']:g}, λ_attn "
        f"{data['fine_tunes']['defended']['lambda_attn']:g}) CACC {data['fine_tunes']['defended']['cacc']:.3f} / "
        f"ASR {data['fine_tunes']['defended']['asr']:.3f} (their test numbers).",
    ]
    for key in MEASURES:
        lines += ["", f"**{titles[key]}**", "", header, rule]
        digits = 1 if key == "summary_logit_norm" else 3
        for name, values in data["models"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.{digits}f}" for v in values[key]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60, help="Validation sentences per trigger.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "trigger_attention")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write(args.out, measure(args.n, args.seed))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
