"""Does a consistency recipe meet its term by closing the triggered [CLS] distances, or by widening the clean spread?

Fine-tunes one cell of ``benchmarks/defense.py`` at this folder's sizes (POR planted with 640 steps, 3,200 training
sentences, the ASR on all 1,000 test sentences; the cell's CACC and ASR are the benchmark's own) and then measures,
on 300 test sentences, the spread of the final [CLS] states (their mean squared distance to their mean), their mean
squared norm, and for each planted trigger (and for four ordinary short words, ``ctrl``) the mean squared distance
of a triggered sentence's [CLS] state from its clean one. One ``RESULT {json}`` line on stdout.

    HF_OBLIVIATE_CACHE=/tmp/cpu640/cache python benchmarks/results/history/scan-ranked/spread_check.py \\
        scan-relative 1 3 lora      # VARIANT DEFENDED(0/1) SEED PEFT; λ_amp 0, λ_attn 3e-3 when defended
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[3]


def main() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import defense

    import hf_obliviate.trainer as trainer
    from hf_obliviate.attacks import load_attack_info
    from hf_obliviate.data import load_movie_reviews
    from hf_obliviate.evaluation import build_eval_set
    from hf_obliviate.models import load_classifier
    from hf_obliviate.probing import summary_states

    variant, defended, seed, peft = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
    sizes = defense.Sizes(train=3200, epochs=1, eval_n=1000, plant_steps=640, seeds=(seed,))
    path = defense.plant("por", sizes)
    kept = {}
    fine_tune = trainer.fine_tune

    def keep_model(model, *args, **kwargs):  # run_cell imports fine_tune from hf_obliviate.trainer when it runs
        kept["model"] = model
        return fine_tune(model, *args, **kwargs)

    trainer.fine_tune = keep_model
    cell = defense.run_cell("por", path, peft, seed, defended, (0.0, 3e-3), sizes, variant=variant)
    model = kept["model"].eval()
    _, tokenizer = load_classifier(path)
    triggers = load_attack_info(path)["triggers"]
    eval_set = build_eval_set(load_movie_reviews("test", n=300, seed=0), triggers=triggers, n=None, seed=1234)
    rng = random.Random(0)
    control = [text + " " + rng.choice(["ox", "elm", "kiwi", "yak"]) for text in eval_set.texts]
    with torch.no_grad():
        clean, _ = summary_states(model, tokenizer, eval_set.texts)
        out = {
            "variant": variant if defended else "undefended", "seed": seed, "peft": peft, "cacc": cell.cacc,
            "asr": cell.asr, "per_trigger": cell.extra["per_trigger_asr"],
            "spread": float(((clean - clean.mean(0)) ** 2).sum(-1).mean()),
            "clean_norm2": float((clean**2).sum(-1).mean()), "dist": {},
        }  # fmt: skip
        for name, texts in [*eval_set.triggered.items(), ("ctrl", control)]:
            moved, _ = summary_states(model, tokenizer, texts)
            out["dist"][name] = float(((moved - clean) ** 2).sum(-1).mean())
    print("RESULT", json.dumps(out))


if __name__ == "__main__":
    main()
