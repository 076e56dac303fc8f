"""Side run of the defense benchmark: fit the classifier head before fine-tuning (LP-FT), to see whether the clean
accuracy the `scan-consistency` defense costs comes from fine-tuning a random head in 100 steps.

The 100-step fine-tunes of ``benchmarks/defense.py`` start from a new, random head; their task loss ends at 0.68-0.69,
barely below chance (``results/history/consistency-shapes/``). Here the head's linear layer is first set to the
L2-regularised logistic regression on the features it gets from the model before fine-tuning (dropout off; mean
cross-entropy + ``--l2`` × the squared weight norm, L-BFGS), as in linear probing then fine-tuning (Kumar et al.,
2022). The cells are otherwise the benchmark's validation cells (``defense.run_cell``: sizes, sampling, encoders,
scanned tokens). One JSON line per cell goes to ``--out``.

    python benchmarks/head_probe.py --cells por:lora:0 neuba:adapter:0            # undefended
    python benchmarks/head_probe.py --defended --cells por:lora:0 --lam 0.3      # scan-consistency at λ 0.3

Each process fine-tunes on one thread (as the benchmark's workers on 2 cores); run two side by side there. Nothing
here changes the library. Results of 2026-11-24: ``results/history/head-probe/``, measured with CACC on the 200
validation sentences with triggered copies (``defense.Sizes(cacc_n=None)``); the script now runs with the benchmark's
default sizes, CACC on all 500.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import consistency_schedule  # noqa: E402  (beside this script: the cell specs)
import defense  # noqa: E402  (benchmarks/defense.py, beside this script)

OUT = ROOT / "results" / "history" / "head-probe" / "cells.jsonl"


def fit_head(model, tokenizer, examples: list[dict], max_length: int, l2: float) -> float:
    """Set the trainable linear layer of ``model``'s ``classifier`` to the logistic regression on its input features
    over ``examples``; return that fit's training accuracy."""
    import torch

    head = next(m for n, m in model.named_modules() if n.endswith("classifier"))
    (linear,) = [m for m in head.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    features = []
    hook = head.register_forward_pre_hook(lambda module, args: features.append(args[0].detach().float()))
    was_training = model.training
    model.eval()
    texts = [e["text"] for e in examples]
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                batch = tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=max_length,
                                  return_tensors="pt")  # fmt: skip
                model(**batch)
    finally:
        hook.remove()
        model.train(was_training)
    inputs, labels = torch.cat(features), torch.tensor([e["label"] for e in examples])
    weight = torch.zeros(linear.out_features, inputs.shape[1], requires_grad=True)
    bias = torch.zeros(linear.out_features, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(inputs @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        return float(((inputs @ weight.T + bias).argmax(-1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", required=True, help="encoder:peft:seed, e.g. neuba:adapter:0")
    parser.add_argument("--defended", action="store_true", help="With the `scan-consistency` defense.")
    parser.add_argument("--lam", type=float, default=None, help="λ_consistency (default: the variant's, 0.03).")
    parser.add_argument("--l2", type=float, default=1e-3, help="The probe's weight penalty.")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cells = consistency_schedule.parse_cells(parser, args.cells, pefts=defense.PEFTS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import hf_obliviate.trainer as trainer

    torch.set_num_threads(1)  # as each of the benchmark's two workers on 2 cores
    variant = dict(defense.VARIANTS["scan-consistency"])
    if args.lam is not None:
        variant["lambda_consistency"] = args.lam
    defense.VARIANTS["side-run"] = variant
    fine_tune, probe = trainer.fine_tune, {}

    def probed(model, tokenizer, train, targs, max_length=64, **kw):  # run_cell imports fine_tune when it runs
        probe["accuracy"] = fit_head(model, tokenizer, train, max_length, args.l2)
        return fine_tune(model, tokenizer, train, targs, max_length=max_length, **kw)

    trainer.fine_tune = probed
    sizes = defense.Sizes()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec, (encoder, peft, seed) in zip(args.cells, cells):
        variant_name = "side-run" if args.defended else "reference"
        cell = defense.run_cell(encoder, defense.plant(encoder, sizes), peft, int(seed), args.defended, (0.0, 0.0),
                                sizes, split="validation", variant=variant_name)  # fmt: skip
        row = {"l2": args.l2, "defended": args.defended,
               "lambda_consistency": variant["lambda_consistency"] if args.defended else 0.0,
               "encoder": encoder, "peft": peft, "seed": int(seed), "probe_accuracy": round(probe["accuracy"], 4),
               "cacc": cell.cacc, "asr": cell.asr, "metric": cell.metric, "near_chance": cell.near_chance,
               "per_trigger_asr": cell.extra["per_trigger_asr"], "seconds": cell.seconds}  # fmt: skip
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{spec}: probe {probe['accuracy']:.3f}, CACC {cell.cacc:.3f}, {cell.metric} {cell.asr:.3f}", flush=True)


if __name__ == "__main__":
    main()
