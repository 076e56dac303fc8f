"""Side run of the defense benchmark: other shapes of the `scan-consistency` term, and why it costs clean accuracy.

The defaults (`scan-consistency`: the final [CLS] hidden state of a copy with one scanned token inserted pulled to
the clean one by a mean squared error, λ 0.03) keep NeuBA + bottleneck adapters about 5 points of validation CACC
below the undefended fine-tune. This script fine-tunes validation cells of ``benchmarks/defense.py`` (same sizes,
sampling, encoders and scanned tokens) with the term in another shape and, after each fine-tune, measures how far
the model's final [CLS] states still spread over the 200 validation sentences (``summary_spread``: the mean squared
distance to their mean; ``summary_sq``: their mean squared norm). One JSON line per cell goes to ``--out``.

Shapes (``--shape``):
  mse       the default term (a control: equal to the benchmark's own cell)
  relative  the squared distance divided by the clean batch's spread (the clean side arrives detached, so the
            spread is a per-step constant: it rescales the term, it does not make collapse cost)
  hinge     per row, only the part of the mean squared distance above ``--margin`` (ordinary words may move [CLS])
  kl        KL between the predictions on the batch and on the copy (``consistency_target="logits"``)
  mse-eval  the default term with dropout off in both of its passes (the clean state from an extra pass without
            gradients): under dropout the two passes differ even without an inserted word, and the term pulls them
            together too
  relative-grad  ``relative`` with the clean batch's spread read with its gradients (from the main pass's hidden
            states), so that shrinking the spread raises the term: collapse costs. This is the library's
            ``consistency_target="relative"``, the `scan-relative` variant of benchmarks/defense.py (λ 0.003)
  relative-capped  ``relative-grad`` with the spread capped at the first training batch's (a constant): a collapse
            below it costs, a spread above it earns nothing (``relative-grad`` rewards any growth of the spread)
  mse-guard  ``mse`` (its weight, 0.03) plus ``relu(1 - spread / (g × the first batch's spread))``, g from
            ``--guard-below`` (default 1), the clean states with their gradients: the squared distance pulls as the
            default does, and a collapse of the spread costs
  mse-pcgrad  ``mse`` with its gradient projected off the task loss's gradient on the steps where the two conflict
            (a negative inner product over the trainable parameters: PCGrad, Yu et al. 2020, one way), so that the
            term cannot buy its pull by unlearning the task; rows record the share of steps that conflicted
  contrastive  an InfoNCE over the batch: each copy's centred [CLS] state must be nearer, by cosine over ``--tau``,
            to its own clean state than to the other sentences' (a collapsed [CLS] leaves it at log(batch), its
            largest value, so unlike the squared distance it cannot be met by making every sentence look the same)
  augment   no pull between two states at all: the task's own cross-entropy on the copy, against the batch's true
            labels (augmentation with the scanned tokens; λ 1 weighs the copy as the batch). The copy must be
            classified by its sentence, whatever token was inserted, so an inserted trigger has to lose its hold,
            and a collapse of the [CLS] states costs as much as it costs the task
  placebo   ``mse``'s copy and forward pass (so the same draws of the random generators as ``mse``, dropout
            included), its term multiplied by 0: no gradient. Against the undefended cell of the same seed it
            measures how far CACC and ASR move when only the dropout masks differ, the noise under any defense's
            clean-accuracy change
  none      no defense (the undefended fine-tune, for its spread)

    python benchmarks/consistency_shapes.py --shape relative --lam 0.003 --cells neuba:adapter:0 neuba:adapter:1

``--common-dropout`` runs the copy's forward pass on a fork of the random generators (``torch.random.fork_rng``):
the copy draws its dropout masks without moving the generators, so the fine-tune's own passes draw the masks of the
undefended run of the same seed, step for step (common random numbers), and a defended and an undefended cell
differ by the term's gradient alone.

``--lr`` overrides the fine-tunes' learning rate (every PEFT type), ``--lam-attn`` adds the attention term
(METHOD.md's, raw logit row) at that weight, ``--lam 0`` leaves the attention term alone. Each process fine-tunes on
one thread (as the benchmark's workers do on 2 cores); run two side by side there. ``--cacc-n 500`` measures CACC on
the whole validation split (default: on the 200 sentences with triggered copies, as the runs of 2026-11-24).

``--summarise CELLS...`` prints a Markdown table of the cells measured on all 500 validation sentences, per setting
and (encoder, PEFT) pair, with the benchmark journal's matching validation cells: the CACC change against the
undefended cell of the same seed and learning rate (mean ± standard deviation over the seeds) and the mean ASR
reduction over the pairs.

Results of 2026-11-24 and 2026-11-25: ``results/history/consistency-shapes/``.
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

from hf_obliviate.consistency import squared_distance, state_spread  # noqa: E402
from hf_obliviate.metrics import asr_reduction  # noqa: E402

OUT = ROOT / "results" / "history" / "consistency-shapes" / "cells.jsonl"
SHAPES = ("mse", "relative", "relative-grad", "relative-capped", "mse-guard", "mse-pcgrad", "hinge", "kl", "mse-eval",
          "contrastive", "augment", "placebo", "none")  # fmt: skip
# a shape's own settings, part of a summary's setting
SHAPE_PARAMETERS = ("margin", "tau", "guard_below", "common_dropout")
FIRST_SPREAD: list[float] = []  # `relative-capped`, `mse-guard`: the clean spread of this fine-tune's first batch
CONFLICTS: list[float] = []  # `mse-pcgrad`: per step of this fine-tune, the cosine of the task and defense gradients


def _spread_and_first(clean):
    """The clean batch's spread of summary states (with gradients) and that of this fine-tune's first batch."""
    spread = state_spread(clean)
    if not FIRST_SPREAD:
        FIRST_SPREAD.append(float(spread.detach()))
    return spread, FIRST_SPREAD[0]


def use_shape(shape: str, margin: float, tau: float = 0.1, guard_below: float = 1.0) -> dict:
    """Patch the defense's hidden-state term for ``shape``; return the ObliviateConfig overrides of the variant."""
    import torch

    import hf_obliviate.defense as core

    overrides = dict(defense.VARIANTS["scan-consistency"])
    if shape == "kl":
        overrides["consistency_target"] = "logits"
    elif shape == "relative":

        def relative(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
            return squared_distance(clean, perturbed) / state_spread(clean.float()).clamp_min(1e-6)

        core.hidden_consistency_loss = relative
    elif shape == "hinge":

        def hinge(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
            return torch.relu(((perturbed.float() - clean.detach().float()) ** 2).mean(-1) - margin).mean()

        core.hidden_consistency_loss = hinge
    elif shape == "relative-grad":  # the library's consistency_target="relative": benchmarks/defense.py's variant
        overrides = dict(defense.VARIANTS["scan-relative"])
    elif shape == "relative-capped":
        overrides = dict(defense.VARIANTS["scan-relative"])

        def capped(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
            spread, first = _spread_and_first(clean.float())  # the term pays for a collapse below the first, not above
            return squared_distance(clean, perturbed) / torch.clamp(spread, min=1e-6, max=first)

        core.relative_consistency_loss = capped
    elif shape == "mse-guard":
        overrides = {**defense.VARIANTS["scan-relative"], "lambda_consistency":
                     defense.VARIANTS["scan-consistency"]["lambda_consistency"]}  # fmt: skip

        def guarded(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
            clean = clean.float()
            spread, first = _spread_and_first(clean)
            # 0 until the spread falls below `guard_below` times the first batch's
            guard = torch.relu(1 - spread / max(guard_below * first, 1e-6))
            return torch.nn.functional.mse_loss(perturbed.float(), clean.detach()) + guard

        core.relative_consistency_loss = guarded
    elif shape == "mse-pcgrad":
        from hf_obliviate.trainer import ObliviateTrainerMixin

        ObliviateTrainerMixin._defended_loss = _projected(ObliviateTrainerMixin._defended_loss)
    elif shape == "contrastive":

        def contrastive(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
            centre = clean.detach().float().mean(0)
            a = torch.nn.functional.normalize(perturbed.float() - centre, dim=-1)
            b = torch.nn.functional.normalize(clean.detach().float() - centre, dim=-1)
            labels = torch.arange(len(a), device=a.device)
            return torch.nn.functional.cross_entropy(a @ b.T / tau, labels)

        core.hidden_consistency_loss = contrastive
    elif shape == "augment":
        overrides = {**overrides, "consistency_target": "logits", "lambda_consistency": 1.0}

        original = core.ObliviateDefense.consistency_loss

        def augmented(self, inputs, logits, model=None, outputs=None):
            # the library's own copy and forward pass (as `kl`'s); only the loss on the copy's logits is the task's
            labels = inputs["labels"]
            core.consistency_loss = lambda clean, copy: torch.nn.functional.cross_entropy(
                copy.float(), labels.to(copy.device)
            )
            return original(self, inputs, logits, model, outputs)

        core.ObliviateDefense.consistency_loss = augmented
    elif shape == "placebo":
        core.hidden_consistency_loss = lambda clean, perturbed: 0.0 * perturbed.float().sum()
    elif shape == "mse-eval":
        original = core.ObliviateDefense.consistency_loss

        def without_dropout(self, inputs, logits, model=None, outputs=None):
            # eval mode, not only the Dropout modules: SDPA attention reads its module's own `training` flag
            modules = list((model or self.model).modules())
            modes = [m.training for m in modules]
            (model or self.model).eval()
            try:  # outputs=None: the clean target comes from a pass without dropout too
                return original(self, inputs, logits, model)
            finally:
                for module, mode in zip(modules, modes):
                    module.training = mode

        core.ObliviateDefense.consistency_loss = without_dropout
    return overrides


def common_dropout() -> None:
    """Run the consistency copy's forward pass (whatever the shape) on a fork of the random generators, so that it
    leaves their state as it found it: the fine-tune's own passes then draw the undefended run's dropout masks."""
    import torch

    import hf_obliviate.defense as core

    original = core.ObliviateDefense.consistency_loss

    def forked(self, inputs, logits, model=None, outputs=None):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return original(self, inputs, logits, model, outputs)

    core.ObliviateDefense.consistency_loss = forked


def _projected(defended_loss):
    """``_defended_loss`` whose defense terms' gradient loses its component along the task loss's gradient when the
    two point against each other (the task's is kept whole): the returned loss has the task loss's value plus the
    terms', and as its gradient ``(1 - c) · g_task + g_terms`` with ``c = min(0, g_task · g_terms) / |g_task|²``."""
    import torch

    def projected(self, model, inputs, return_outputs, num_items_in_batch, **capture_inputs):
        record = self._record_terms
        seen = {}

        def keep_task(task_loss, terms):  # the task loss as `_defended_loss` logs it (divided by the scale)
            seen["task"] = task_loss
            record(task_loss, terms)

        self._record_terms = keep_task
        try:
            result = defended_loss(self, model, inputs, return_outputs, num_items_in_batch, **capture_inputs)
        finally:
            del self._record_terms
        loss = result[0] if return_outputs else result
        task = seen["task"] * self._extra_terms_scale(num_items_in_batch)
        params = [p for p in model.parameters() if p.requires_grad]
        g_task = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
        # the last pass through the model's graph: the returned loss's backward pass does not go through it
        g_terms = torch.autograd.grad(loss - task, params, allow_unused=True)
        g_task = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_task)]
        g_terms = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_terms)]
        dot = sum((a * b).sum() for a, b in zip(g_task, g_terms))
        norm = sum((a * a).sum() for a in g_task)
        other = sum((b * b).sum() for b in g_terms)
        CONFLICTS.append(float(dot / (norm.sqrt() * other.sqrt()).clamp_min(1e-12)))
        c = torch.clamp(dot / norm.clamp_min(1e-12), max=0.0)
        surrogate = sum((p * ((1 - c) * a + b).detach()).sum() for p, a, b in zip(params, g_task, g_terms))
        # that value and that gradient
        loss = surrogate - surrogate.detach() + loss.detach()
        return (loss, result[1]) if return_outputs else loss

    return projected


def summary_spread(model, tokenizer, sizes: defense.Sizes) -> tuple[float, float]:
    """``(mean squared distance of the final [CLS] states to their mean, their mean squared norm)`` over the
    validation sentences the cell is evaluated on."""
    import torch

    from hf_obliviate.data import load_movie_reviews
    from hf_obliviate.probing import summary_state

    texts = [e["text"] for e in load_movie_reviews("validation", n=sizes.val_n, seed=0)]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=sizes.max_length, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        states = summary_state(model, dict(batch))[0].float()
    return float(state_spread(states)), float((states**2).sum(-1).mean())


# The benchmark's validation cells as settings of this script: (shape, λ_consistency, λ_attn), at its learning rate.
JOURNAL_SETTINGS = {
    ("reference", 0.0, 0.0, False): ("none", 0.0, 0.0),
    ("scan-consistency", 0.0, 0.0, True): ("mse", defense.VARIANTS["scan-consistency"]["lambda_consistency"], 0.0),
    ("scan-relative", 0.0, 0.003, True): ("relative-grad", defense.VARIANTS["scan-relative"]["lambda_consistency"],
                                          0.003),
}  # fmt: skip


def setting_cells(paths: list[Path], journal: Path | None) -> dict[tuple, dict[tuple, dict]]:
    """Cells measured with CACC on all 500 validation sentences, by setting ``(shape, λ_consistency, λ_attn, lr)``
    (the shape with its margin or τ, if any), then by ``(encoder, peft, seed)``: this script's lines, and the
    matching validation cells of the benchmark's ``journal`` (at its own learning rate; a side-run line of the same
    cell and setting is checked against it)."""
    found: dict[tuple, dict[tuple, dict]] = {}

    def add(setting: tuple, cell: dict) -> None:
        key = (cell["encoder"], cell["peft"], cell["seed"])
        old = found.setdefault(setting, {}).get(key)
        if old is not None and (old["cacc"], old["asr"]) != (cell["cacc"], cell["asr"]):
            raise SystemExit(f"{setting} {key}: two different results ({old['cacc']}, {old['asr']}) and "
                             f"({cell['cacc']}, {cell['asr']}).")  # fmt: skip
        found[setting][key] = cell

    for path in paths:
        for line in path.read_text().splitlines():
            cell = json.loads(line)
            if cell.get("cacc_n") == 500 and cell.get("split", "validation") == "validation":
                shape = cell["shape"] + "".join(
                    f" ({name.replace('_', ' ')})" if cell[name] is True else f" ({name} {cell[name]:g})"
                    for name in SHAPE_PARAMETERS if cell.get(name) is not None
                )  # fmt: skip
                add((shape, cell["lambda_consistency"], cell.get("lambda_attn", 0.0), cell["lr"]), cell)
    for line in journal.read_text().splitlines() if journal else ():
        cell = json.loads(line)
        name = (cell.get("variant", "reference"), cell["lambda_amp"], cell["lambda_attn"], cell["defended"])
        if cell["split"] == "validation" and cell.get("protocol", 1) == 2 and name in JOURNAL_SETTINGS:
            if cell["peft"] in ("lora", "adapter") and cell["encoder"] in defense.VALIDATION_ENCODERS:
                rates = cell.get("finetune", {}).get("learning_rates", defense.LEARNING_RATES)
                add((*JOURNAL_SETTINGS[name], rates[cell["peft"]]), cell)
    return found


def summarise(found: dict[tuple, dict[tuple, dict]]) -> str:
    """A Markdown table: per setting and (encoder, PEFT) pair, the seeds, mean CACC and ASR, and the CACC change
    against the undefended cell of the same seed and learning rate (mean ± standard deviation over the seeds whose
    two runs are above chance), then the mean ASR reduction over the pairs, as the benchmark's validation rule
    measures it (1 - defended / undefended, each averaged over the seeds)."""
    import statistics

    lines = ["| setting (shape, λ_consistency, λ_attn, lr) | pair | seeds | CACC | ΔCACC vs undefended (pts) | ASR |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    totals = []
    for setting in sorted(found, key=lambda s: (s[3], s[0] != "none", s)):
        shape, lr = setting[0], setting[3]
        if shape != "none" and setting[1] == 0:
            shape = "attention only"  # λ_consistency 0: the shape plays no part
        base = found.get(("none", 0.0, 0.0, lr), {})
        reductions = []
        for pair in sorted({k[:2] for k in found[setting]}, key=lambda p: (p[1], p[0])):
            runs = {k[2]: c for k, c in found[setting].items() if k[:2] == pair}
            kept = [s for s in runs if not runs[s]["near_chance"]]
            both = [s for s in kept if (*pair, s) in base and not base[(*pair, s)]["near_chance"]]
            deltas = [100 * (runs[s]["cacc"] - base[(*pair, s)]["cacc"]) for s in both]
            delta = ""
            if shape != "none" and deltas:
                spread = f" ± {statistics.stdev(deltas):.1f}" if len(deltas) > 1 else ""
                delta = f"{statistics.mean(deltas):+.1f}{spread} (n={len(deltas)})"
                undefended = statistics.mean(base[(*pair, s)]["asr"] for s in both)
                reductions.append(asr_reduction(undefended, statistics.mean(runs[s]["asr"] for s in both)))
            chance = len(runs) - len(kept)
            lines.append(
                f"| {shape}, {setting[1]:g}, {setting[2]:g}, {lr:g} | {pair[0]} + {pair[1]} | "
                f"{','.join(map(str, sorted(runs)))} | {statistics.mean(runs[s]['cacc'] for s in kept or runs):.3f}"
                f"{f' ({chance} at chance)' if chance else ''} | {delta} | "
                f"{statistics.mean(runs[s]['asr'] for s in kept or runs):.3f} |"
            )
        if reductions:
            totals.append(f"- {shape}, λ {setting[1]:g} / {setting[2]:g}, lr {lr:g}: mean ASR reduction "
                          f"{100 * statistics.mean(reductions):.1f}% over {len(reductions)} pairs")  # fmt: skip
    return "\n".join(lines + [""] + totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarise", type=Path, nargs="+", metavar="CELLS",
                        help="Print the Markdown table of these cell files (with the journal's validation cells) "
                             "and stop.")  # fmt: skip
    parser.add_argument("--journal", type=Path, default=ROOT / "results" / "defense_cells.jsonl",
                        help="The benchmark's journal, for --summarise.")  # fmt: skip
    parser.add_argument("--shape", choices=SHAPES)
    parser.add_argument("--lam", type=float, default=None, help="λ_consistency (default: the shape's variant's).")
    parser.add_argument("--margin", type=float, default=0.05, help="The hinge's margin (mean squared distance).")
    parser.add_argument("--tau", type=float, default=0.1, help="The contrastive shape's temperature.")
    parser.add_argument("--guard-below", type=float, default=1.0,
                        help="mse-guard: the guard acts below this fraction of the first batch's spread.")  # fmt: skip
    parser.add_argument("--common-dropout", action="store_true",
                        help="Run the copy's forward pass on a fork of the random generators.")  # fmt: skip
    parser.add_argument("--cacc-n", type=int, default=None, help="CACC on this many clean sentences (defense.py's).")
    parser.add_argument("--lr", type=float, default=None, help="Learning rate of every PEFT type.")
    parser.add_argument("--lam-attn", type=float, default=0.0, help="λ_attn of the attention term beside it.")
    parser.add_argument("--cells", nargs="+", help="encoder:peft:seed, e.g. neuba:adapter:0")
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="The split the cells train and test on: test only to measure noise against the "
                             "benchmark's own test cells (with --cacc-n 1000, as theirs), never to choose a "
                             "setting; --summarise reads validation cells only.")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.summarise:
        print(summarise(setting_cells(args.summarise, args.journal)))
        return
    if args.shape is None or args.cells is None:
        parser.error("give --shape and --cells (or --summarise).")
    cells = consistency_schedule.parse_cells(parser, args.cells, pefts=defense.PEFTS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import hf_obliviate.trainer as trainer

    torch.set_num_threads(1)  # as each of the benchmark's two workers on 2 cores: its cells' numbers, exactly
    overrides = use_shape(args.shape, args.margin, args.tau, args.guard_below)
    if args.common_dropout:
        common_dropout()
    if args.lam is not None:
        overrides["lambda_consistency"] = args.lam
    defense.VARIANTS["side-run"] = overrides
    tuned = {}
    fine_tune = trainer.fine_tune

    def keep_model(model, tokenizer, *a, **kw):  # run_cell imports fine_tune from hf_obliviate.trainer when it runs
        tuned["model"], tuned["tokenizer"] = model, tokenizer
        FIRST_SPREAD.clear()  # each cell's fine-tune caps the spread at its own first batch's
        CONFLICTS.clear()
        return fine_tune(model, tokenizer, *a, **kw)

    trainer.fine_tune = keep_model
    sizes = defense.Sizes(cacc_n=args.cacc_n)
    if args.lr is not None:
        sizes.learning_rates = dict.fromkeys(sizes.learning_rates, args.lr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    defended = args.shape != "none"
    for spec, (encoder, peft, seed) in zip(args.cells, cells):
        path = defense.plant(encoder, sizes)
        lambdas = (0.0, args.lam_attn if defended else 0.0)
        cell = defense.run_cell(encoder, path, peft, int(seed), defended, lambdas, sizes, split=args.split,
                                variant="side-run" if defended else "reference")  # fmt: skip
        spread, square = summary_spread(tuned["model"], tuned["tokenizer"], sizes)
        row = {"shape": args.shape, "lambda_consistency": overrides["lambda_consistency"] if defended else 0.0,
               "margin": args.margin if args.shape == "hinge" else None,
               "tau": args.tau if args.shape == "contrastive" else None, "cacc_n": args.cacc_n,
               "guard_below": args.guard_below if args.shape == "mse-guard" and args.guard_below != 1 else None,
               "common_dropout": True if args.common_dropout else None,
               "first_spread": FIRST_SPREAD[0] if FIRST_SPREAD else None,
               **({"conflicting_steps": sum(c < 0 for c in CONFLICTS) / len(CONFLICTS),
                   "mean_cosine": round(sum(CONFLICTS) / len(CONFLICTS), 4)} if CONFLICTS else {}),
               "lr": sizes.learning_rates[peft], "lambda_attn": args.lam_attn if defended else 0.0,
               "encoder": encoder, "peft": peft, "seed": int(seed), "split": args.split, "cacc": cell.cacc,
               "asr": cell.asr,
               "metric": cell.metric, "near_chance": cell.near_chance, "seconds": cell.seconds,
               "summary_spread": float(f"{spread:.4g}"), "summary_sq": float(f"{square:.4g}")}  # fmt: skip
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{spec} {args.shape}: CACC {cell.cacc:.3f}, {cell.metric} {cell.asr:.3f}, spread {spread:.3f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
