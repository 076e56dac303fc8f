"""The Obliviate experiment at our scale: backdoored MiniLM-L6, PEFT fine-tunes with and without the defense.

1. Plant each task-agnostic attack (POR, NeuBA, BadPre, UOR) into the bundled MiniLM-L6, on IMDB sentences
   (cached by config hash, so reruns skip this), plus an adaptive POR that plants under the attention penalty.
2. Choose the defense coefficients and the LoRA / adapter recipe on a validation split carved from the training
   sentences (never the test sentences): small grids on POR + LoRA; the settings whose validation CACC stays within
   1.5 points of the undefended run also run on NeuBA + LoRA; the best few of them (and the best that cuts the ASR
   by 85%) run again on a second seed, the best two over both seeds also as bottleneck adapters, and the setting with
   the lowest validation ASR averaged over the seeds, attacks and PEFT types wins: defense first (it must cut the
   validation ASR by 85% when any setting does), then its CACC must keep the floor on each attack and PEFT type (when
   none does, the one that keeps it on LoRA and misses it least on adapters; `lora_adapter_choice`).
   `ObliviateTrainingArguments`' defaults (`hf_obliviate.config.CLASSIFIER_DEFAULTS`) are the recipe this chooses.
3. For every encoder (clean control, each attack) × PEFT type (LoRA, prefix tuning, bottleneck adapter) × seed,
   fine-tune on Rotten Tomatoes sentences undefended and defended (the reference recipe, the recipe chosen on the
   validation split, and for LoRA / adapters any recipe of `TEST_RECIPES`), and measure CACC and
   ASR on the test sentences (the LMSanitator rule; BadPre and UOR, which have no target label, by the targeted ASR
   with each trigger's majority prediction on validation sentences as its target, `TARGET_FREE`).
   Also a task-specific row (10% of the fine-tuning data poisoned) and the adaptive attack.

Writes ``benchmarks/results/defense.{json,md,png}`` (and ``defense_cells.jsonl`` as it goes, so a run can resume).

Usage::

    python benchmarks/defense.py                     # full run (sizes: see `Sizes`)
    python benchmarks/defense.py --quick             # a smoke run of every code path on tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from hf_obliviate.config import SCAN_CONSISTENCY, SCAN_KL, SCAN_RELATIVE, ObliviateConfig
from hf_obliviate.metrics import asr_reduction

ROOT = Path(__file__).resolve().parent
ATTACKS = ("por", "neuba", "badpre", "uor")
# Attacks with no target label in the downstream task: each trigger's target is its majority prediction on triggered
# validation data, and the ASR is targeted (METHOD.md's rule for UOR). A BadPre trigger pushes the text to one garbage
# state, which the fine-tuned head maps to one class: on two balanced classes the LMSanitator rule then counts about
# half of the kept examples and the accuracy drop is at most CACC - 0.5, however fully the trigger controls the output.
TARGET_FREE = ("badpre", "uor")
CLEAN_ENCODERS = ("clean", "task-specific")  # rows fine-tuned from the bundled MiniLM itself
CLEAN_CHECKPOINT = "minilm"
PEFTS = ("lora", "prefix", "adapter")
# Prefix tuning, POR encoder, validation split, 100 steps: lr 1e-2, 3e-3 and 5e-4 stayed at chance (CACC 0.50), 1e-3
# reached 0.63 (0.64 after 2 epochs); a trainable pooler did not help at 1e-2 or 3e-3.
LEARNING_RATES = {"lora": 1e-3, "prefix": 1e-3, "adapter": 1e-3}
GRID = ((0.0, 3e-3), (3e-4, 3e-3), (0.0, 1e-2), (3e-4, 1e-2), (0.0, 3e-2))
# The centred row's norm is smaller than the raw row's, so its grid reaches higher coefficients.
CENTRED_GRID = ((3e-4, 3e-3), (3e-4, 1e-2), (3e-4, 3e-2))
# The consistency variant adds a term of its own (weight 1, a KL between predictions) to the centred recipe.
CONSISTENCY_GRID = ((3e-4, 3e-3), (3e-4, 1e-2))
# Every token's row: the mean row norm is about that of the CLS row (loss_attn 4-8 at the start), so the same grid.
ALL_ROWS_GRID = ((0.0, 3e-3), (0.0, 1e-2))
# Only the last three of MiniLM's six layers: their weighted mean is comparable to the plain mean, so the same grid.
LATE_LAYERS_GRID = ((0.0, 3e-3), (0.0, 1e-2))
# The scan-consistency and scan-relative variants' own term (weight in VARIANTS) alone, then with the reference
# attention term.
SCAN_GRID = ((0.0, 0.0), (0.0, 3e-3))
# Variants of the LoRA / adapter recipe (names in VARIANTS), each tried on its own validation grid.
VARIANT_GRIDS = {
    "centred": CENTRED_GRID, "consistency": CONSISTENCY_GRID,
    "all-rows": ALL_ROWS_GRID, "late-layers": LATE_LAYERS_GRID, "scan-consistency": SCAN_GRID,
    "scan-relative": SCAN_GRID, "scan-ranked": SCAN_GRID, "scan-top8": SCAN_GRID, "scan-kl": SCAN_GRID,
}  # fmt: skip
# The variants a full run tries on the validation split (`--all-variants`: every one of VARIANT_GRIDS). The others
# lost there with random batches (benchmarks/results/history/: best validation ASR on POR within the CACC floor
# centred 0.253, consistency 0.259, all-rows 0.525, late-layers 0.377, against scan-consistency 0.055), and their
# 12 validation fine-tunes would take about 7 of the run's 90 minutes. scan-ranked and scan-top8 cost 5-6 points of
# CACC on POR + LoRA at 200 steps (results/history/scan-ranked/) and are not raced; scan-kl is (4 fine-tunes).
FULL_RUN_VARIANTS = ("scan-consistency", "scan-relative", "scan-kl")
# LoRA / adapter recipes run on every test row whatever the validation split chooses, so the table shows them next to
# the default (none now). Until 2026-11-24 `scan-consistency` (λ 0 / 0) ran here: it was the default then, and its
# test cells at the current protocol are in the journal (run 2026-11-24/25), so the table still shows them; a fresh
# run leaves them out, which keeps it within the 90 minutes now that validation races two consistency variants.
TEST_RECIPES: tuple[tuple[str, tuple[float, float]], ...] = ()


@dataclass
class Sizes:
    """Run sizes, chosen for a 2-core CPU machine: planting the four attacks plus the adaptive one takes about an
    hour there (once; cached; BadPre and UOR about 20 minutes each, side by side on one thread each), then 47
    validation and 92 test fine-tunes of 100 steps, each evaluated on 200 sentences × (1 + one per trigger) copies
    for the ASR and on the whole split for CACC. On 2 idle cores with the encoders planted and their trigger scans
    cached (``--jobs 2``, the default there: two one-thread fine-tunes side by side) the whole run took 80.0 minutes
    from an empty journal (2026-11-25, results/history/fresh-full-run/; the validation stage about 25); a plain cell
    takes about 50 s, a `scan-consistency` one about 87 s, a `scan-relative` one about 92 s, and a cold scan about a
    minute per encoder. With random batches (``--sampling random``) the same two cells took 75 s and 168 s.
    `scan-kl` joined the validation race later (the 80.0 minutes ran 43 validation fine-tunes): its 4 screening
    fine-tunes (about 117 s each) add 4.2 minutes, so about 84 in all.
    LoRA learns at lr 1e-3 in 100 steps (validation CACC 0.71-0.745 on the POR encoder; at 60 steps and lr 5e-4 it
    stayed at chance, 0.55). On a GPU, ``results/defense_gpu.md`` ran ``--train 3200 --epochs 1 --eval-n 1000
    --plant-steps 640 --jobs 12 --lambdas 3e-4 3e-3 --variant scan-relative 0 3e-3 --seeds 0 1`` (then 2 3) on one
    H100: planting and 92 fine-tunes in 5.8 minutes (other fine-tunes need their own journal)."""

    train: int = 1600
    epochs: float = 1.0
    batch: int = 16
    max_length: int = 64
    # "bucketed": batches of similar lengths in random order (`length_bucketed`). A random batch of 16 of these
    # sentences is 44% padding (27.5 tokens on average, 49.3 for the longest of a batch); sorted in groups of 8
    # batches the padded tokens fall by 1.58x. transformers' LengthGroupedSampler sorts groups of 50 batches and
    # runs each longest first (a curriculum): 1.46x faster, but validation CACC on POR fell from 0.745 to 0.690.
    sampling: str = "bucketed"
    bucket_batches: int = 8
    eval_n: int = 200  # test sentences, each with one triggered copy per trigger (ASR; CACC too unless `cacc_n`)
    val_n: int = 200
    # Clean sentences to measure CACC on (`--cacc-n`; at most the whole split: test 1000, validation 500; None: the
    # `eval_n` / `val_n` ones). On 200 a CACC near 0.7 has a standard error of 3.2 points, twice the 1.5-point floor;
    # on 1000, 1.4. About 4 s a cell. Cells measured either way are told apart by `protocol_of`; the tables before
    # 2026-11-25 measured CACC on the 200 (results/history/cacc-200/).
    cacc_n: int | None = 1000
    plant_steps: int = 300
    plant_batch: int = 16
    mlm_warmup: int | None = 100  # NeuBA / BadPre MLM-head warm-up steps (None: the attack's default, 200)
    # Per-attack planting settings over the attack config's defaults (METHOD.md's reference values, set for far longer
    # runs than our 300 steps): at their reference rates BadPre (2e-5) and UOR (5e-5) stayed below the 0.8 bar.
    plant_overrides: dict[str, dict] = field(
        default_factory=lambda: {"badpre": {"learning_rate": 1e-4}, "uor": {"learning_rate": 2e-4}}
    )
    scan_sentences: int = 2  # sentences of the scan-consistency variant's trigger scan (about a minute on 2 cores)
    seeds: tuple[int, ...] = (0, 1)
    # validation: every setting on seed 0, then the `finalists` best (and the best reference setting) on the other
    # seeds, chosen by the mean over all of them (`confirm_finalists`)
    val_seeds: tuple[int, ...] = (0, 1)
    finalists: int = 3
    adapter_finalists: int = 2  # the best LoRA settings (over the seeds) that also run as adapter fine-tunes
    attacks: tuple[str, ...] = ATTACKS
    pefts: tuple[str, ...] = PEFTS
    grid: tuple[tuple[float, float], ...] = GRID
    variant_grids: dict[str, tuple[tuple[float, float], ...]] = field(
        default_factory=lambda: {v: VARIANT_GRIDS[v] for v in FULL_RUN_VARIANTS}
    )
    # Per PEFT type (`--lr` sets them all). Part of the sizes, not a module global: the fine-tunes run in spawned
    # worker processes, which import this module afresh and would see a changed global at its default.
    learning_rates: dict[str, float] = field(default_factory=lambda: dict(LEARNING_RATES))


QUICK = Sizes(
    train=32, epochs=1, batch=16, eval_n=16, val_n=16, cacc_n=16, plant_steps=2, plant_batch=2, mlm_warmup=1,
    scan_sentences=1, seeds=(0,), val_seeds=(0, 1), finalists=1,
    pefts=("lora",), grid=((3e-4, 3e-3),), variant_grids={v: ((3e-4, 3e-3),) for v in VARIANT_GRIDS},
)  # fmt: skip


# What a cell's fine-tune and measurement used beyond its journal key (`finetune_of`): each cell records it, and a
# journal holds the cells of one set of them (`recipe_conflicts`).
FINETUNE_FIELDS = ("sampling", "train", "epochs", "batch", "max_length", "bucket_batches", "learning_rates", "eval_n",
                   "val_n", "cacc_n", "scan_sentences")  # fmt: skip


def finetune_of(sizes: Sizes) -> dict:
    """The settings of `FINETUNE_FIELDS` that a cell of these sizes is fine-tuned and measured with (JSON values)."""
    return json.loads(json.dumps({name: getattr(sizes, name) for name in FINETUNE_FIELDS}))


def _recorded(cell: dict) -> dict:
    # cells before 2026-11-25 record their sampling only (journal cells without it used "random")
    return cell.get("finetune") or {"sampling": cell.get("sampling", "random")}


def journal_finetune(cells) -> dict | None:
    """The fine-tuning settings (`finetune_of`) that every cell of a journal records alike, or None when they
    differ (or the journal is empty). Cells from before 2026-11-25 record their sampling only."""
    recorded = [_recorded(c) for c in cells]
    return recorded[0] if recorded and all(r == recorded[0] for r in recorded) else None


FINETUNE_FLAGS = {"sampling": "--sampling", "train": "--train", "epochs": "--epochs", "batch": "--batch",
                  "learning_rates": "--lr", "eval_n": "--eval-n", "cacc_n": "--cacc-n"}  # fmt: skip


def recipe_conflicts(cells, sizes: Sizes) -> list[str]:
    """The fine-tuning settings in which some journal cell differs from these sizes, as "name theirs (this run: ours;
    its flag)": the journal key leaves them out, so cells of other settings must not be reused or tabulated with
    these."""
    own, found = finetune_of(sizes), {}
    for cell in cells:
        for name, value in _recorded(cell).items():
            if value != own.get(name):
                found.setdefault(name, set()).add(json.dumps(value, sort_keys=True))
    return [f"{name} {' / '.join(sorted(values))} (this run: {json.dumps(own.get(name), sort_keys=True)}"
            f"{'; ' + FINETUNE_FLAGS[name] if name in FINETUNE_FLAGS else ''})"
            for name, values in found.items()]  # fmt: skip


def protocol_of(sizes: Sizes) -> int:
    """How cells of these sizes are measured: 1, CACC on the `eval_n` (`val_n`) sentences that also have triggered
    copies (``cacc_n=None``; the tables before 2026-11-25); 2, CACC on `cacc_n` clean sentences of the split (the
    default). A journal key holds it: cells of the other protocol are not reused, and `current_cells` keeps them out
    of the tables."""
    return 1 if sizes.cacc_n is None else 2


@dataclass
class Cell:
    encoder: str
    peft: str
    seed: int
    defended: bool
    lambda_amp: float
    lambda_attn: float
    cacc: float
    asr: float
    metric: str
    near_chance: bool
    seconds: float
    split: str = "test"
    variant: str = "reference"
    extra: dict = field(default_factory=dict)
    sampling: str = "random"  # the training sampler (`Sizes.sampling`; journal cells without it used "random")
    checkpoint: str = CLEAN_CHECKPOINT  # `checkpoint_of`: a re-planted attack is another encoder, with its own cells
    protocol: int = 1  # how the cell was measured (`protocol_of`; journal cells without it: 1)
    finetune: dict | None = None  # `finetune_of` its sizes (journal cells without it: before 2026-11-25)
    device: str | None = None  # `device_name()` where it ran (journal cells without it: not recorded)


# Named variants of the recipe (the reference is METHOD.md's): name -> ObliviateConfig overrides.
VARIANTS = {
    "reference": {"attn_centre": False},  # METHOD.md §1: the raw logit row's norm
    "skip-virtual-keys": {"attn_centre": False, "attn_virtual_keys": "skip"},  # prefix tuning only
    "centred": {"attn_centre": True},  # LoRA / adapters: penalise the centred logit row (softmax ignores its mean)
    # centred, plus KL(p(x) || p(x')) with one random short rare word inserted (the attacks' triggers left out of
    # the words inserted, so the test measures that the insensitivity generalises to unseen triggers)
    "consistency": {"attn_centre": True, "lambda_consistency": 1.0, "consistency_insertions": 1},
    # every real token's query row, not only CLS: a trigger can reach CLS through the other tokens' rows
    "all-rows": {"attn_centre": False, "attn_query": "rows"},
    # per-layer weights: MiniLM-L6's last three layers only. On the POR encoder the [CLS] row puts 0.30 and 0.73 of
    # its attention (head mean) on an inserted trigger in layers 5 and 6 and under 0.03 in layers 1-4, while the
    # reference term shrank every layer's row alike (layer 1 from 8.7 to 3.3) and left 0.23 and 0.35 in layers 5
    # and 6 (benchmarks/results/trigger_attention.md, the make-demo models).
    "late-layers": {"attn_centre": False, "attn_layer_weights": [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]},
    # the consistency copy inserts the 32 tokens that a vocabulary scan of the encoder (before training) finds moving
    # its [CLS] output most, and pulls the copy's final [CLS] hidden state to the clean one
    # (hf_obliviate.consistency.scan_trigger_tokens; no trigger is given to it; hf_obliviate.config.SCAN_CONSISTENCY)
    "scan-consistency": {"attn_centre": False, **SCAN_CONSISTENCY},
    # the same copies, the squared distance divided by the clean batch's spread of [CLS] states, with gradients
    # (consistency_target="relative"), so that making every sentence's [CLS] the same does not meet it: on NeuBA +
    # adapters the defended [CLS] states of `scan-consistency` spread 35-45 times less than undefended ones
    # (results/history/consistency-shapes/; hf_obliviate.config.SCAN_RELATIVE)
    "scan-relative": {"attn_centre": False, **SCAN_RELATIVE},
    # scan-relative with the scanned tokens drawn by rank (the k-th with probability proportional to 1/k) instead of
    # uniformly: at 200 fine-tuning steps the scan's top-ranked POR trigger `bb` kept its ASR under scan-relative
    # while ranks 3-6 fell (results/history/cpu-200-steps/)
    "scan-ranked": {"attn_centre": False, **SCAN_RELATIVE, "consistency_sampling": "rank"},
    # scan-relative drawing uniformly from the scan's top 8 tokens instead of 32 (the same side run)
    "scan-top8": {"attn_centre": False, **SCAN_RELATIVE, "consistency_scan_top_k": 8},
    # the same copies pulled to the clean batch's predictions (KL, weight 1) instead of its [CLS] state: in that side
    # run POR + LoRA kept less of its backdoor than under scan-relative (hf_obliviate.config.SCAN_KL)
    "scan-kl": {"attn_centre": False, **SCAN_KL},
}  # fmt: skip
# A recipe is `ObliviateConfig`'s own settings (METHOD.md's terms) plus its VARIANTS overrides, whatever defaults
# `ObliviateTrainingArguments` has (the classifier defaults are the recipe this benchmark chose).
RECIPE_BASE = {f.name: f.default for f in fields(ObliviateConfig) if f.name != "obliviate"}
LORA_VARIANTS = tuple(VARIANT_GRIDS)
PREFIX_VARIANTS = ("reference", "skip-virtual-keys")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """The GPU's name, or ``CPU (n cores)``: what the tables say the cells ran on."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def cells_device(cells: list[dict], here: str) -> str:
    """What ``cells`` ran on, as their journal records it; ``here`` (this machine) for cells that record nothing,
    made before the field came in (2026-11-25; the committed CPU journal's cells all ran on the 2-core machine)."""
    recorded = sorted({c["device"] for c in cells if c.get("device")})
    unrecorded = any(not c.get("device") for c in cells)
    if not recorded:
        return here
    return " + ".join(recorded) + (f" (and cells with no device recorded, taken as {here})" if unrecorded else "")


def _attack_config(attack: str, sizes: Sizes):
    """The planting config of an encoder of the table (``attack`` in ATTACKS or "adaptive-por")."""
    from hf_obliviate.attacks import get_attack_config

    adaptive = attack == "adaptive-por"
    attack = "por" if adaptive else attack
    kwargs = {"num_steps": sizes.plant_steps, "batch_size": sizes.plant_batch}
    if sizes.mlm_warmup is not None and attack in ("neuba", "badpre"):
        kwargs["mlm_head_warmup_steps"] = sizes.mlm_warmup
    kwargs.update(sizes.plant_overrides.get(attack, {}))
    if adaptive:
        kwargs["attention_penalty"] = 3e-3
    return attack, get_attack_config(attack, **kwargs)


def checkpoint_of(encoder: str, sizes: Sizes) -> str:
    """The journal's name for an encoder's checkpoint: the encoder and a hash of its planting config. Unlike the
    cache folder's name it leaves out where the bundled model is installed, so a journal holds on any checkout."""
    from hf_obliviate.attacks import config_hash

    if encoder in CLEAN_ENCODERS:
        return CLEAN_CHECKPOINT
    return f"{encoder}-{config_hash(*_attack_config(encoder, sizes), CLEAN_CHECKPOINT)}"


def tabulated_protocol(cells: list[dict], sizes: Sizes) -> int:
    """The protocol a journal's tables show: that of these sizes (`protocol_of`) when the journal has cells of it,
    else that of its cells (an earlier run's journal, tabulated as it is)."""
    own, found = protocol_of(sizes), {c.get("protocol", 1) for c in cells}
    return found.pop() if own not in found and len(found) == 1 else own


def current_cells(cells: list[dict], sizes: Sizes) -> list[dict]:
    """The journal cells to tabulate: of an encoder that has cells fine-tuned from the checkpoint these sizes plant
    (`checkpoint_of`), only those (a cell of the encoder planted with other settings stays in the file but out of the
    tables); of any other encoder, all of its cells (a journal of an earlier planting, e.g. under results/history/).
    Of the journal's cells, those of `tabulated_protocol`, and of the cells that record their fine-tuning settings
    (`finetune_of`), those of these sizes."""
    protocol = tabulated_protocol(cells, sizes)
    own = finetune_of(sizes)
    cells = [c for c in cells if c.get("protocol", 1) == protocol and c.get("finetune", own) == own]
    current = {e: checkpoint_of(e, sizes) for e in {c["encoder"] for c in cells}}
    planted_now = {c["encoder"] for c in cells if c.get("checkpoint") == current[c["encoder"]]}
    return [c for c in cells if c["encoder"] not in planted_now or c.get("checkpoint") == current[c["encoder"]]]


def plant(attack: str, sizes: Sizes) -> Path:
    """Plant ``attack`` (in ATTACKS or "adaptive-por"; cached) and return the checkpoint folder."""
    from hf_obliviate.attacks import plant_backdoor
    from hf_obliviate.attacks._common import attack_cache_dir
    from hf_obliviate.bundled import minilm_path

    attack, config = _attack_config(attack, sizes)
    plant_backdoor(attack, minilm_path(), config=config, show_progress=True)
    return attack_cache_dir(attack, config, minilm_path())


# Tokens kept of each encoder's cached trigger scan; a variant's `consistency_scan_top_k` draws from the first ones.
SCAN_TOP_K = 32


def scanned_tokens(encoder_path: Path | None, model, tokenizer, sentences: int) -> list[int]:
    """The trigger scan's `SCAN_TOP_K` tokens for an encoder (`hf_obliviate.consistency.scan_trigger_tokens`, what
    `ObliviateTrainer` runs on the model before fine-tuning without a ``consistency_pool``), cached per encoder
    checkpoint: every seed and PEFT type of an encoder starts from the same encoder, so one scan serves them all
    (`prefetch_scans` makes it on the bare encoder first)."""
    from hf_obliviate.artifacts import settings_hash
    from hf_obliviate.bundled import minilm_path
    from hf_obliviate.consistency import SCAN_SENTENCES, scan_trigger_tokens
    from hf_obliviate.delta.writer import write_json_atomic
    from hf_obliviate.smollm import cache_dir

    texts = SCAN_SENTENCES[:sentences]
    source = Path(encoder_path or minilm_path()).resolve()
    stamp = (source / "model.safetensors").stat().st_mtime_ns if (source / "model.safetensors").is_file() else 0
    path = cache_dir() / "trigger-scans" / f"{settings_hash([str(source), stamp, list(texts)])}.json"
    if path.is_file():
        return json.loads(path.read_text())
    tokens = scan_trigger_tokens(model, tokenizer, top_k=SCAN_TOP_K, sentences=texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, tokens)  # two workers may scan the same encoder at once: the last rename wins
    return tokens


def prefetch_scans(specs) -> None:
    """Run the trigger scan (`scanned_tokens`) of every encoder that a `scan-consistency` cell of ``specs`` needs, in
    this process and on the bare encoder, before the cells run: every cell of an encoder then reads the same scan,
    whichever PEFT type runs first (an adapter or a prefix already changes the model a little at initialisation; for
    LoRA, B = 0, it is the bare encoder), and two workers never scan a cold encoder twice."""
    from hf_obliviate.models import load_classifier

    wanted = {}
    for spec in specs:
        if spec["defended"] and VARIANTS[spec.get("variant", "reference")].get("consistency_tokens") == "scan":
            wanted.setdefault(spec["encoder_path"], spec["sizes"].scan_sentences)
    for path, sentences in wanted.items():
        model, tokenizer = load_classifier(path)
        scanned_tokens(path, model.to(_device()), tokenizer, sentences)


def length_bucketed(examples: list, lengths: list[int], batch: int, group: int, seed: int) -> list:
    """``examples`` in an order whose consecutive runs of ``batch`` have similar lengths, the batches in random
    order (train it with a sequential sampler): a seeded shuffle, cut into groups of ``group`` batches, each group
    sorted by length and cut into batches, then every batch shuffled into place. One epoch's order; later epochs
    repeat it."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch * group):
        chunk = sorted(order[start : start + batch * group], key=lambda i: lengths[i])
        batches += [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return [examples[i] for b in batches for i in b]


def run_cell(
    encoder: str,
    encoder_path: Path | None,
    peft: str,
    seed: int,
    defended: bool,
    lambdas: tuple[float, float],
    sizes: Sizes,
    split: str = "test",
    poison: dict | None = None,
    spread: bool = False,
    variant: str = "reference",
) -> Cell:
    from hf_obliviate.attacks import load_attack_info, poison_dataset
    from hf_obliviate.data import load_movie_reviews
    from hf_obliviate.evaluation import build_eval_set, evaluate_backdoor, predict_labels
    from hf_obliviate.metrics import accuracy, is_near_chance
    from hf_obliviate.models import load_classifier, wrap_peft
    from hf_obliviate.trainer import ObliviateTrainingArguments, fine_tune
    from hf_obliviate.triggers import DEFAULT_TRIGGERS

    start = time.time()
    torch.manual_seed(seed)
    train = load_movie_reviews("train", n=sizes.train, seed=seed)
    triggers = list(DEFAULT_TRIGGERS)
    if encoder_path is not None:
        triggers = load_attack_info(encoder_path)["triggers"]
    if poison is not None:
        train, _ = poison_dataset(
            train, rate=poison["rate"], target_label=poison["target"], triggers=triggers, seed=seed
        )
    model, tokenizer = load_classifier(encoder_path)
    if sizes.sampling == "bucketed":
        lengths = tokenizer([e["text"] for e in train], truncation=True, max_length=sizes.max_length,
                            return_length=True)["length"]  # fmt: skip
        train = length_bucketed(train, lengths, sizes.batch, sizes.bucket_batches, seed)
    model = wrap_peft(model, peft).to(_device())
    lambda_amp, lambda_attn = lambdas if defended else (0.0, 0.0)
    args = ObliviateTrainingArguments(
        output_dir=f"/tmp/obliviate-defense/{encoder}-{peft}-{seed}-{int(defended)}",
        obliviate=defended,
        **{
            **RECIPE_BASE,
            **(VARIANTS[variant] if defended else {}),
            "lambda_amp": lambda_amp,
            "lambda_attn": lambda_attn,
        },
        learning_rate=sizes.learning_rates[peft],
        num_train_epochs=sizes.epochs,
        per_device_train_batch_size=sizes.batch,
        train_sampling_strategy="sequential" if sizes.sampling == "bucketed" else sizes.sampling,
        warmup_steps=0.05,  # a float in [0, 1) is a ratio of the total steps
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        disable_tqdm=True,
        use_cpu=_device().type == "cpu",
    )
    kwargs, extra = {}, {}
    if defended and VARIANTS[variant].get("consistency_tokens") == "scan":
        top_k = args.consistency_scan_top_k  # the variant's own, over RECIPE_BASE
        if top_k > SCAN_TOP_K:
            raise ValueError(
                f"Variant {variant!r} draws from {top_k} scanned tokens; the cached scans hold {SCAN_TOP_K}."
            )
        kwargs["consistency_pool"] = scanned_tokens(encoder_path, model, tokenizer, sizes.scan_sentences)[:top_k]
        found = tokenizer.convert_ids_to_tokens(kwargs["consistency_pool"])
        extra = {"scan_tokens": found, "scan_trigger_ranks": {t: found.index(t) + 1 for t in triggers if t in found}}
    elif defended and VARIANTS[variant].get("lambda_consistency", 0) > 0:
        from hf_obliviate.consistency import rare_token_pool

        kwargs["consistency_pool"] = rare_token_pool(tokenizer, exclude=sorted({*triggers, *DEFAULT_TRIGGERS}))
    fine_tune(model, tokenizer, train, args, max_length=sizes.max_length, **kwargs)
    own_cacc = {}
    if sizes.cacc_n is not None:  # protocol 2
        clean = load_movie_reviews(split, n=min(sizes.cacc_n, len(load_movie_reviews(split))), seed=0)
        preds, classes = predict_labels(model, tokenizer, [e["text"] for e in clean])
        cacc = accuracy([e["label"] for e in clean], preds)
        own_cacc = {
            "cacc_n": len(clean),
            "cacc": cacc,
            "near_chance": is_near_chance(cacc, max(classes, 2), preds=preds),
        }
    eval_examples = load_movie_reviews(split, n=sizes.val_n if split == "validation" else sizes.eval_n, seed=0)
    eval_set = build_eval_set(eval_examples, triggers=triggers, n=None, seed=1234, spread=spread)
    targets = None
    if encoder in TARGET_FREE:
        dev = load_movie_reviews("validation", n=min(200, sizes.val_n), seed=1)
        dev_set = build_eval_set(dev, triggers=triggers, n=None, seed=99)
        result = evaluate_backdoor(
            model, tokenizer, eval_set, targets="majority", dev_set=dev_set, show_progress=False
        )
        targets = result.targets
        metric, score = "targeted_asr", result.targeted_asr["mean"]
    else:
        result = evaluate_backdoor(model, tokenizer, eval_set, show_progress=False)
        metric, score = "asr", result.asr
    return Cell(
        encoder=encoder, peft=peft, seed=seed, defended=defended, lambda_amp=lambda_amp, lambda_attn=lambda_attn,
        cacc=own_cacc.get("cacc", result.cacc), asr=score, metric=metric,
        near_chance=own_cacc.get("near_chance", result.near_chance),
        seconds=round(time.time() - start, 1), split=split, variant=variant if defended else "reference",
        sampling=sizes.sampling, checkpoint=checkpoint_of(encoder, sizes), protocol=protocol_of(sizes),
        finetune=finetune_of(sizes), device=device_name(),
        extra={**({"cacc_n": own_cacc["cacc_n"], "asr_set_cacc": result.cacc,
                   "asr_set_near_chance": result.near_chance} if own_cacc else {}),
               "lmsanitator_asr": result.asr, "accuracy_drop": result.accuracy_drop,
               "per_trigger_asr": result.per_trigger_asr, "targets": targets, **extra},
    )  # fmt: skip


def _key(cell: dict) -> tuple:
    return (cell["encoder"], cell["peft"], cell["seed"], cell["defended"], cell["lambda_amp"], cell["lambda_attn"],
            cell["split"], cell.get("variant", "reference"), cell.get("checkpoint", CLEAN_CHECKPOINT),
            cell.get("protocol", 1))  # fmt: skip


class Journal:
    """Cells appended to a JSONL file as they finish, so an interrupted run resumes where it stopped.

    ``jobs > 1`` runs the missing cells of a [`run_many`] batch in that many worker processes, each on
    ``cpu_count // jobs`` threads: on 2 CPU cores two one-thread fine-tunes finished a validation cell in 104 s each,
    one two-thread fine-tune in 77 s (1.5× the throughput), with the same CACC and ASR (a cell does not depend on the
    thread count)."""

    def __init__(self, path: Path, resume: bool, jobs: int = 1):
        self.path = path
        self.jobs = jobs
        self._pool = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.cells: dict[tuple, dict] = {}
        self.made = 0  # cells this process ran (the others came from the file)
        if resume and path.is_file():
            for line in path.read_text().splitlines():
                cell = json.loads(line)
                self.cells[_key(cell)] = cell
        elif path.is_file():
            path.unlink()

    @staticmethod
    def key_of(spec: dict) -> tuple:
        """The journal key of the cell that ``run_cell(**spec)`` makes."""
        defended = spec["defended"]
        lambdas = spec["lambdas"] if defended else (0.0, 0.0)
        return _key({**spec, "lambda_amp": lambdas[0], "lambda_attn": lambdas[1], "split": spec.get("split", "test"),
                     "variant": spec.get("variant", "reference") if defended else "reference",
                     "checkpoint": checkpoint_of(spec["encoder"], spec["sizes"]),
                     "protocol": protocol_of(spec["sizes"])})  # fmt: skip

    def run_many(self, specs: list[dict]) -> list[dict]:
        """The cells of ``specs`` (``run_cell`` arguments), from the journal or made now (in parallel with
        ``jobs > 1``), in the order given."""
        keys = [self.key_of(spec) for spec in specs]
        todo = {key: spec for key, spec in zip(keys, specs) if key not in self.cells}
        prefetch_scans(todo.values())
        if self.jobs <= 1 or len(todo) <= 1:
            for key, spec in todo.items():
                self._record(key, asdict(run_cell(**spec)))
        else:
            from concurrent.futures import as_completed

            futures = {self._executor().submit(run_cell, **spec): key for key, spec in todo.items()}
            for future in as_completed(futures):
                self._record(futures[future], asdict(future.result()))
        return [self.cells[key] for key in keys]

    def _executor(self):
        if self._pool is None:
            from hf_obliviate.parallel import spawn_pool

            self._pool = spawn_pool(self.jobs)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _record(self, key: tuple, cell: dict) -> None:
        self.cells[key] = cell
        self.made += 1
        with open(self.path, "a") as handle:
            handle.write(json.dumps(cell) + "\n")
        print(
            f"{cell['encoder']:>9} {cell['peft']:>7} {cell['variant']} seed {cell['seed']} "
            f"{'def' if cell['defended'] else 'und'} "
            f"λ=({cell['lambda_amp']:g},{cell['lambda_attn']:g}) CACC {cell['cacc']:.3f} "
            f"{cell['metric']} {cell['asr']:.3f} [{cell['seconds']}s]",
            flush=True,
        )


class MissingCells(LookupError):
    """A `ReplayJournal` was asked for a cell it does not have."""


class ReplayJournal(Journal):
    """A journal's cells, read only: `run_many` returns them and raises `MissingCells` where it would fine-tune, so
    `--summarise-only` replays the validation stage (`validate`) and shows the choices and validation cells that the
    run (or `--resume`) shows, not every validation cell the file has gathered."""

    def __init__(self, cells: list[dict]):
        self.cells = {_key(cell): cell for cell in cells}
        self.made, self.jobs, self._pool = 0, 1, None

    def run_many(self, specs: list[dict]) -> list[dict]:
        keys = [self.key_of(spec) for spec in specs]
        missing = [key for key in keys if key not in self.cells]
        if missing:
            encoder, peft, seed, _, amp, attn, split, variant = missing[0][:8]
            raise MissingCells(f"{len(missing)} cells missing, e.g. {encoder} + {peft} seed {seed} {split} "
                               f"{variant} λ {amp:g}/{attn:g}")  # fmt: skip
        return [self.cells[key] for key in keys]


# The recipe is chosen over both attacks whose planted backdoor works (ASR >= 0.8): POR for every setting, NeuBA for
# the settings that keep clean accuracy on POR. Chosen on POR alone, the `centred` recipe helped POR and not NeuBA.
VALIDATION_ENCODERS = ("por", "neuba")
CACC_FLOOR = 0.015  # a defended run's clean accuracy may fall this far below the undefended run's (the target)
# The mean ASR reduction. The LoRA / adapter recipe that becomes the default must reach it on the validation
# split when any setting does: measured with CACC on all 500 validation sentences, the floor-first rule alone chose
# the reference recipe, which kept clean accuracy by not defending (validation ASR 0.88-1.00 in 7 of 8 runs).
REDUCTION_TARGET = 0.85


def _confirm(journal: Journal, paths: dict[str, Path], sizes: Sizes, tuning: list[dict]) -> list[dict]:
    """Run on the other validation encoders (undefended, then each defended LoRA setting of ``tuning`` that is within
    the CACC floor on POR and above chance, and those of `TEST_RECIPES`) the settings POR alone cannot rule out."""
    por_base = next(c for c in tuning if not c["defended"] and c["encoder"] == "por")
    shown = {(name, *lam) for name, lam in TEST_RECIPES}  # on every attack, so the validation table shows them
    keep = [c for c in tuning if c["defended"] and c["encoder"] == "por" and (_within_floor(c, por_base) or
            (c.get("variant", "reference"), c["lambda_amp"], c["lambda_attn"]) in shown)]  # fmt: skip
    specs = []
    for encoder in (e for e in VALIDATION_ENCODERS[1:] if e in paths):
        common = dict(encoder=encoder, encoder_path=paths[encoder], peft="lora", seed=0, sizes=sizes,
                      split="validation")  # fmt: skip
        specs.append(dict(defended=False, lambdas=(0.0, 0.0), **common))
        specs += [dict(defended=True, lambdas=(c["lambda_amp"], c["lambda_attn"]),
                       variant=c.get("variant", "reference"), **common) for c in keep]  # fmt: skip
    return journal.run_many(specs)


def choose_lambdas(journal: Journal, paths: dict[str, Path], sizes: Sizes) -> tuple[tuple[float, float], list[dict]]:
    """Pick (λ_amp, λ_attn) on the validation split with LoRA, seed 0: the grid on POR, confirmed on NeuBA."""
    por = dict(encoder="por", encoder_path=paths["por"], peft="lora", seed=0, sizes=sizes, split="validation")
    tuning = journal.run_many([dict(defended=False, lambdas=(0.0, 0.0), **por)] +
                              [dict(defended=True, lambdas=lambdas, **por) for lambdas in sizes.grid])  # fmt: skip
    tuning += _confirm(journal, paths, sizes, tuning)
    return pick_lambdas(tuning), tuning


def _cacc_drop(cacc: float, base: float) -> float:
    """How far ``cacc`` falls below the undefended ``base``, rounded: 0.745 - 0.73 is a hair above 0.015 in floating
    point, and a drop of exactly the floor keeps it."""
    return round(base - cacc, 9)


def _within_floor(cell: dict, base: dict) -> bool:
    return _cacc_drop(cell["cacc"], base["cacc"]) <= CACC_FLOOR and not cell["near_chance"]


def _setting(cell: dict) -> tuple:
    return cell.get("variant", "reference"), cell["lambda_amp"], cell["lambda_attn"]


def _ranked(
    tuning: list[dict], strict: bool = True, min_reduction: float = 0.0
) -> list[tuple[float, float, tuple, dict[tuple, dict]]]:
    """The defended settings (recipe, λ_amp, λ_attn) of ``tuning`` that qualify, best first, as (mean ASR,
    −mean CACC, setting, its runs by (encoder, PEFT type, seed)).

    The undefended runs above chance are the bases, one per (encoder, PEFT type, seed). A setting qualifies when it
    ran on every base's encoder, PEFT type and seed, none of those runs is at chance, and for each encoder and PEFT
    type its CACC averaged over the seeds is within 1.5 points of the undefended average. Its score is the validation
    ASR averaged over the seeds, then over the (encoder, PEFT type) pairs. ``strict=False`` drops the floor and ranks
    by the largest CACC drop over the pairs first, then by the score: the setting that misses the floor least.
    ``min_reduction`` also asks its ASR reduction (1 − defended / undefended ASR, each averaged over the seeds),
    averaged over the pairs, to reach that fraction (`REDUCTION_TARGET`: a setting that does not defend is no
    default, however little accuracy it costs)."""

    def key(c: dict) -> tuple:
        return c["encoder"], c["peft"], c.get("seed", 0)

    bases = {key(c): c for c in tuning if not c["defended"] and not c["near_chance"]}
    settings: dict[tuple, dict[tuple, dict]] = {}
    for c in tuning:
        if c["defended"]:
            settings.setdefault(_setting(c), {})[key(c)] = c
    by_encoder: dict[tuple, list[tuple]] = {}
    for k in bases:
        by_encoder.setdefault(k[:2], []).append(k)
    mean = statistics.mean
    scored = []
    for setting, runs in settings.items():
        if not bases or any(k not in runs or runs[k]["near_chance"] for k in bases):
            continue
        cacc = {e: mean(runs[k]["cacc"] for k in keys) for e, keys in by_encoder.items()}
        drop = max(_cacc_drop(cacc[e], mean(bases[k]["cacc"] for k in keys)) for e, keys in by_encoder.items())
        if strict and drop > CACC_FLOOR:
            continue
        if min_reduction > 0:
            undefended = [mean(bases[k]["asr"] for k in keys) for keys in by_encoder.values()]
            defended = [mean(runs[k]["asr"] for k in keys) for keys in by_encoder.values()]
            if mean(asr_reduction(u, d) if u > 0 else 0.0 for d, u in zip(defended, undefended)) < min_reduction:
                continue
        asr = mean(mean(runs[k]["asr"] for k in keys) for keys in by_encoder.values())
        scored.append((0.0 if strict else drop, (asr, -mean(cacc.values()), setting, runs)))
    return [entry for _, entry in sorted(scored, key=lambda t: (t[0], *t[1][:2]))]


def _best_trial(tuning: list[dict]) -> tuple[dict | None, list[dict]]:
    """The best setting of [`_ranked`] over every run of ``tuning``; when none qualifies there, over its LoRA runs,
    then over its LoRA runs of seed 0 (the stages of the validation split, last first). Returns the setting's first
    run on POR (``None`` when no setting qualifies) and the defended runs."""
    trials = [c for c in tuning if c["defended"]]
    lora = [c for c in tuning if c["peft"] == "lora"]
    ranked = _ranked(tuning) or _ranked(lora) or _ranked([c for c in lora if c.get("seed", 0) == 0])
    if not ranked:
        return None, trials
    runs = ranked[0][3]
    return next((c for k, c in runs.items() if k[0] == "por"), next(iter(runs.values()))), trials


def pick_lambdas(tuning: list[dict]) -> tuple[float, float]:
    """The coefficients of [`_best_trial`] over the reference LoRA runs (the lowest ASR overall when none
    qualifies)."""
    tuning = [c for c in tuning if c["peft"] == "lora" and c.get("variant", "reference") == "reference"]
    best, trials = _best_trial(tuning)
    best = best or min((c for c in trials if c["encoder"] == "por"), key=lambda c: (c["asr"], -c["cacc"]))
    return best["lambda_amp"], best["lambda_attn"]


def pick_prefix_variant(tuning: list[dict], lambdas: tuple[float, float]) -> str:
    """The prefix-tuning recipe of [`_best_trial`] on POR + prefix tuning at the chosen coefficients (other
    coefficients are diagnostics); the reference unless a variant wins."""
    tuning = [c for c in tuning if c["peft"] == "prefix" and (not c["defended"] or
              (c["lambda_amp"], c["lambda_attn"]) == tuple(lambdas))]  # fmt: skip
    if not tuning:
        return "reference"
    best, _ = _best_trial(tuning)
    return best["variant"] if best is not None else "reference"


def lora_adapter_choice(tuning: list[dict]) -> tuple[tuple | None, str]:
    """The LoRA / adapter setting (recipe, λ_amp, λ_attn) of the validation runs and the rule that chose it.

    Defense first: among the settings whose mean validation ASR reduction over every LoRA and adapter pair reaches
    `REDUCTION_TARGET`, the best of [`_ranked`] (the CACC floor kept on every pair, lowest ASR); when none of them
    keeps the floor everywhere, the one that keeps it on LoRA and misses it least on adapters (a setting that costs
    adapters some accuracy beats one that collapses them), else the one that misses it least anywhere. Only when no
    setting reaches the target does the floor come first: [`_best_trial`]'s choice over every run, then the same
    fallbacks without the target, else LoRA's alone."""
    runs = [c for c in tuning if c["peft"] in ("lora", "adapter")]
    lora = [c for c in runs if c["peft"] == "lora"]
    adapters = any(c["peft"] == "adapter" for c in runs)
    pairs = "every attack and PEFT pair" if adapters else "LoRA"
    on_lora = {entry[2] for entry in _ranked(lora)} if adapters else set()
    for cut in (REDUCTION_TARGET, 0.0):
        said = (
            f"cut validation ASR by {REDUCTION_TARGET:.0%} and " if cut else f"none cut it by {REDUCTION_TARGET:.0%}: "
        )
        if ranked := _ranked(runs, min_reduction=cut):
            return ranked[0][2], f"{said}kept the CACC floor on {pairs}"
        relaxed = _ranked(runs, strict=False, min_reduction=cut)
        if kept := [entry for entry in relaxed if entry[2] in on_lora]:
            return kept[0][2], (f"{said}no such setting kept the CACC floor on adapters too: the one that kept it on "
                                "LoRA and missed it least on adapters")  # fmt: skip
        if cut and relaxed:
            return relaxed[0][2], f"{said}no such setting kept the CACC floor on {pairs}: the one that missed it least"
    best, _ = _best_trial(lora)
    return (_setting(best), "LoRA alone") if best is not None else (None, "none qualified")


def pick_lora_variant(tuning: list[dict], lambdas: tuple[float, float]) -> tuple[str, tuple[float, float]]:
    """The LoRA / adapter recipe of [`lora_adapter_choice`] over every LoRA and adapter validation run (the reference
    grid and each of `LORA_VARIANTS`' grids on LoRA, the finalists on adapters); the reference at ``lambdas`` unless
    a variant wins."""
    if not any(c["defended"] and c["peft"] == "lora" and c.get("variant", "reference") != "reference"
               for c in tuning):  # fmt: skip
        return "reference", tuple(lambdas)
    setting, _ = lora_adapter_choice(tuning)
    if setting is None or setting[0] == "reference":
        return "reference", tuple(lambdas)
    return setting[0], (setting[1], setting[2])


def choose_lora_variant(
    journal: Journal, paths: dict[str, Path], sizes: Sizes, lambdas: tuple[float, float], tuning: list[dict]
) -> tuple[str, tuple[float, float], list[dict]]:
    """LoRA, validation split, seed 0: each variant of ``sizes.variant_grids`` on its grid on POR (confirmed on
    NeuBA), against the reference runs of the coefficient search (``tuning``)."""
    runs = journal.run_many([dict(encoder="por", encoder_path=paths["por"], peft="lora", seed=0, defended=True,
                                  lambdas=lam, sizes=sizes, split="validation", variant=variant)
                             for variant, grid in sizes.variant_grids.items() for lam in grid])  # fmt: skip
    por_base = [c for c in tuning if not c["defended"] and c["encoder"] == "por"]
    runs += [c for c in _confirm(journal, paths, sizes, por_base + runs) if c["defended"]]
    variant, chosen = pick_lora_variant(tuning + runs, lambdas)
    return variant, chosen, runs


def _validation_specs(paths: dict[str, Path], sizes: Sizes, peft: str, seeds, settings: list[tuple]) -> list[dict]:
    """``run_cell`` arguments of the validation split: per seed and validation encoder, the undefended run and each
    setting (recipe, λ_amp, λ_attn) of ``settings`` (nothing when there is none)."""
    specs = []
    for seed in seeds if settings else ():
        for encoder in (e for e in VALIDATION_ENCODERS if e in paths):
            common = dict(encoder=encoder, encoder_path=paths[encoder], peft=peft, seed=seed, sizes=sizes,
                          split="validation")  # fmt: skip
            specs.append(dict(defended=False, lambdas=(0.0, 0.0), **common))
            specs += [dict(defended=True, lambdas=(amp, attn), variant=variant, **common)
                      for variant, amp, attn in settings]  # fmt: skip
    return specs


def confirm_finalists(journal: Journal, paths: dict[str, Path], sizes: Sizes, tuning: list[dict]) -> list[dict]:
    """The validation split's further seeds (``sizes.val_seeds[1:]``) for the finalists of seed 0: the
    ``sizes.finalists`` best LoRA settings of [`_ranked`], the best reference setting (the coefficients of the
    reference recipe are chosen among reference settings) and the best that cuts the ASR by `REDUCTION_TARGET`
    (`_with_defender`), on every validation encoder, with their undefended runs.
    One seed's 200 validation sentences put about 3.4 points of noise on CACC and more on ASR: seed 0 alone chose the
    attention term on top of `scan-consistency` by NeuBA ASR 0.105 against 0.210, and the test rows then showed it
    costing clean accuracy."""
    lora = [c for c in tuning if c["peft"] == "lora" and c.get("seed", 0) == 0]
    ranked = [setting for *_, setting, _ in _ranked(lora)]
    finalists = ranked[: sizes.finalists]
    if not any(s[0] == "reference" for s in finalists):
        finalists += [s for s in ranked if s[0] == "reference"][:1]
    return journal.run_many(
        _validation_specs(paths, sizes, "lora", sizes.val_seeds[1:], _with_defender(finalists, lora))
    )


def _with_defender(finalists: list[tuple], runs: list[dict]) -> list[tuple]:
    """``finalists`` plus, when it is not among them, the setting of ``runs`` that reaches `REDUCTION_TARGET` and
    misses the CACC floor least ([`_ranked`] with ``strict=False``): [`lora_adapter_choice`] puts such a setting
    first, so it must run on every stage."""
    defender = [setting for *_, setting, _ in _ranked(runs, strict=False, min_reduction=REDUCTION_TARGET)][:1]
    return finalists + [s for s in defender if s not in finalists]


def confirm_on_adapters(journal: Journal, paths: dict[str, Path], sizes: Sizes, tuning: list[dict]) -> list[dict]:
    """The LoRA recipe also serves bottleneck adapters: the ``sizes.adapter_finalists`` best LoRA settings of
    [`_ranked`] (over every validation seed), and the best that cuts the ASR by `REDUCTION_TARGET`
    (`_with_defender`), run as adapter fine-tunes on every validation encoder and seed, with
    their undefended runs, and [`pick_lora_variant`] then asks a setting to keep the floor there too. (On the test
    rows the attention term on top of `scan-consistency`, chosen on LoRA alone, collapsed NeuBA + adapter to
    chance.)"""
    lora = [c for c in tuning if c["peft"] == "lora"]
    finalists = [setting for *_, setting, _ in _ranked(lora)][: sizes.adapter_finalists]
    return journal.run_many(
        _validation_specs(paths, sizes, "adapter", sizes.val_seeds, _with_defender(finalists, lora))
    )


def choose_prefix_variant(
    journal: Journal, por_path: Path, sizes: Sizes, lambdas: tuple[float, float]
) -> tuple[str, list[dict]]:
    """Prefix tuning, validation split, POR, seed 0: undefended, then every named variant at the chosen λ."""
    common = dict(encoder="por", encoder_path=por_path, peft="prefix", seed=0, sizes=sizes, split="validation")
    specs = [dict(defended=False, lambdas=(0.0, 0.0), **common)]
    specs += [dict(defended=True, lambdas=lambdas, variant=variant, **common) for variant in PREFIX_VARIANTS]
    runs = journal.run_many(specs)
    return pick_prefix_variant(runs, lambdas), runs


def summarise(cells: list[dict]) -> list[dict]:
    rows = []
    groups: dict[tuple, dict[bool, list[dict]]] = {}
    undefended: dict[tuple, list[dict]] = {}
    for cell in cells:
        if cell["split"] != "test":
            continue
        if cell["defended"]:
            group = (cell["encoder"], cell["peft"], cell.get("variant", "reference"), cell["lambda_amp"],
                     cell["lambda_attn"])  # fmt: skip
            groups.setdefault(group, {}).setdefault(True, []).append(cell)
        else:
            undefended.setdefault((cell["encoder"], cell["peft"]), []).append(cell)
    for (encoder, peft, variant, lambda_amp, lambda_attn), by in groups.items():
        by[False] = undefended.get((encoder, peft), [])  # every variant is compared with the same plain runs
        paired = {c["seed"] for c in by.get(False, [])} & {c["seed"] for c in by.get(True, [])}
        und = [c for c in by.get(False, []) if c["seed"] in paired]  # seeds with both runs only: a cut-short
        dfd = [c for c in by.get(True, []) if c["seed"] in paired]  # run must not compare unlike seeds
        if not paired:
            continue
        mean = statistics.mean
        asr_u, asr_d = mean(c["asr"] for c in und), mean(c["asr"] for c in dfd)
        cacc_u, cacc_d = mean(c["cacc"] for c in und), mean(c["cacc"] for c in dfd)
        reduction = asr_reduction(asr_u, asr_d)
        # the mean over attacks uses the seeds whose two runs are both above chance (a model at chance shows no
        # backdoor whether or not the defense works); the row itself averages every paired seed
        chance = {c["seed"] for c in und + dfd if c["near_chance"]}
        pairs = [(u, d) for u in sorted(und, key=lambda c: c["seed"]) for d in dfd if u["seed"] == d["seed"]]
        clean = [(u, d) for u, d in pairs if u["seed"] not in chance]
        asr_cu = mean(u["asr"] for u, _ in clean) if clean else float("nan")
        asr_cd = mean(d["asr"] for _, d in clean) if clean else float("nan")
        reduction_clean = asr_reduction(asr_cu, asr_cd)  # nan without a clean seed
        drops = {
            side: [c.get("extra", {}).get("accuracy_drop") for c in runs]
            for side, runs in (("undefended", und), ("defended", dfd))
        }
        rows.append({
            "encoder": encoder, "peft": peft, "variant": variant, "lambda_amp": lambda_amp, "lambda_attn": lambda_attn,
            "metric": und[0]["metric"], "seeds": len(und),
            # BadPre's own measure (it has no target label): accuracy lost on triggered inputs
            **({f"accuracy_drop_{side}": round(mean(v), 4) for side, v in drops.items()}
               if encoder == "badpre" and None not in drops["undefended"] + drops["defended"] else {}),
            "cacc_undefended": round(cacc_u, 4), "cacc_defended": round(cacc_d, 4),
            "cacc_delta_points": round(100 * (cacc_d - cacc_u), 2),
            # each seed's change against its own undefended run: the seeds of one row often disagree by more than
            # the 1.5-point floor, and a mean alone hides that
            "cacc_delta_points_by_seed": {str(u["seed"]): round(100 * (d["cacc"] - u["cacc"]), 2) for u, d in pairs},
            "asr_undefended": round(asr_u, 4), "asr_defended": round(asr_d, 4),
            "asr_reduction": round(reduction, 4),
            "near_chance": bool(chance),
            "seeds_above_chance": len(clean),
            "asr_reduction_above_chance": round(reduction_clean, 4),
            "asr_undefended_above_chance": round(asr_cu, 4),
        })  # fmt: skip
    return rows


def recipes_for(
    peft: str, lambdas, prefix_variant: str = "reference", lora_variant: str = "reference", lora_lambdas=None
) -> list[tuple[str, tuple[float, float]]]:
    """The defended runs of a test cell: the reference recipe at ``lambdas``, when one won on the validation split
    the variant chosen for the PEFT type (prefix tuning's own; LoRA's also for adapters), and for LoRA / adapters
    `TEST_RECIPES`. All stay in the table."""
    lambdas = tuple(lambdas)
    chosen = (prefix_variant, lambdas) if peft == "prefix" else (lora_variant, tuple(lora_lambdas or lambdas))
    recipes = [("reference", lambdas)] + ([chosen] if chosen[0] != "reference" else [])
    if peft != "prefix":
        recipes += [(name, tuple(lam)) for name, lam in TEST_RECIPES if (name, tuple(lam)) not in recipes]
    return recipes


def planned_test_keys(
    sizes: Sizes,
    lambdas,
    prefix_variant: str = "reference",
    lora_variant: str = "reference",
    lora_lambdas=None,
    protocol: int | None = None,
) -> set[tuple]:
    """The journal keys of the test fine-tunes a full run makes with these choices: per seed every encoder (clean
    control and each attack) × PEFT type plus the task-specific and adaptive LoRA rows, undefended and with each of
    [`recipes_for`], measured by ``protocol`` (default: `protocol_of` the sizes). Cells of earlier choices (other
    coefficients or recipes) stay in the journal and the tables but are not part of the plan."""
    keys, protocol = set(), protocol or protocol_of(sizes)
    rows = [(e, p) for e in ("clean", *sizes.attacks) for p in sizes.pefts]
    rows += [("task-specific", "lora"), ("adaptive-por", "lora")]
    checkpoints = {encoder: checkpoint_of(encoder, sizes) for encoder, _ in rows}
    for seed in sizes.seeds:
        for encoder, peft in rows:
            keys.add((encoder, peft, seed, False, 0.0, 0.0, "test", "reference", checkpoints[encoder], protocol))
            for variant, (amp, attn) in recipes_for(peft, lambdas, prefix_variant, lora_variant, lora_lambdas):
                keys.add((encoder, peft, seed, True, amp, attn, "test", variant, checkpoints[encoder], protocol))
    return keys


def _label(r: dict, default: bool = True) -> str:
    """The PEFT type, with the recipe and its coefficients unless the row is the default (chosen) one."""
    if default:
        return r["peft"]
    return f"{r['peft']} ({r['variant']}, λ {r['lambda_amp']:g}/{r['lambda_attn']:g})"


def _recipe(r: dict) -> tuple[str, float, float]:
    return r["variant"], r["lambda_amp"], r["lambda_attn"]


PLANTED_ASR = 0.8  # an attack whose undefended ASR stays below this was not planted: its row measures nothing


def _mean_reduction(rows: list[dict]) -> tuple[float | None, list[dict]]:
    # A fine-tune at chance has ASR ~0 without any defense working: such seeds are listed, not averaged. Nor are
    # rows whose attack does not work undefended (the bar: ASR >= 0.8 against an undefended fine-tune).
    counted = [r for r in rows if r["asr_reduction_above_chance"] == r["asr_reduction_above_chance"]
               and r["asr_undefended_above_chance"] >= PLANTED_ASR]  # fmt: skip
    reductions = [r["asr_reduction_above_chance"] for r in counted]
    return (round(statistics.mean(reductions), 4) if reductions else None), counted


def write(
    out: Path, rows: list[dict], tuning: list[dict], lambdas, sizes: Sizes, device: str, wall: float, *,
    prefix_variant: str = "reference", lora_variant: str = "reference", lora_lambdas=None,
    cells: list[dict] | None = None, made: int | None = None, given: bool = False,
) -> None:  # fmt: skip
    """The JSON, Markdown and plot of a run. ``given``: the coefficients and recipes came from ``--lambdas`` /
    ``--variant`` (no validation stage chose them), and the tables say so."""
    lora_lambdas = tuple(lora_lambdas or lambdas)
    chosen = "given (--lambdas / --variant)" if given else "chosen on the validation split"

    def is_default(r: dict) -> bool:  # the recipes chosen on the validation split (LoRA's also for adapters)
        if r["peft"] == "prefix":
            return _recipe(r) == (prefix_variant, *lambdas)
        return _recipe(r) == (lora_variant, *lora_lambdas)

    order = (*ATTACKS, "task-specific", "adaptive-por", "clean")
    # the defaults first, then the other recipes measured; each by attack and PEFT type (not the journal's order)
    rows = sorted(rows, key=lambda r: (not is_default(r), order.index(r["encoder"]), PEFTS.index(r["peft"])))
    attack_rows = [r for r in rows if r["encoder"] in ATTACKS]
    default = [r for r in attack_rows if is_default(r)]
    mean, counted = _mean_reduction(default)
    mean_reference, counted_reference = _mean_reduction(
        [r for r in attack_rows if _recipe(r) == ("reference", *lambdas)]
    )
    # every other recipe measured on the test rows (e.g. earlier defaults), each over the rows it has
    by_recipe = {}
    for recipe in sorted({_recipe(r) for r in attack_rows if r["peft"] != "prefix"}):
        value, counted_recipe = _mean_reduction([r for r in attack_rows if r["peft"] != "prefix" and
                                                 _recipe(r) == recipe])  # fmt: skip
        by_recipe[f"{recipe[0]} λ {recipe[1]:g}/{recipe[2]:g}"] = {"mean": value, "rows": len(counted_recipe)}
    summary = {
        "cells_in_mean": len(counted),
        "rows_without_a_seed_above_chance": sum(r["seeds_above_chance"] == 0 for r in default),
        "mean_asr_reduction_task_agnostic": mean,
        "mean_asr_reduction_reference_recipe": mean_reference,
        "cells_in_reference_mean": len(counted_reference),
        "mean_asr_reduction_by_lora_adapter_recipe": by_recipe,
        "max_cacc_drop_points": round(max((-r["cacc_delta_points"] for r in rows), default=0.0), 2),
        "chosen_lambdas": {"lambda_amp": lambdas[0], "lambda_attn": lambdas[1]},
        "prefix_variant": prefix_variant,
        "lora_variant": lora_variant,
        "lora_variant_lambdas": list(lora_lambdas),
        "lora_variant_rule": "given (--lambdas / --variant)"
        if given or not tuning
        else lora_adapter_choice(tuning)[1],
        "max_cacc_drop_points_defaults": round(
            max((-r["cacc_delta_points"] for r in rows if is_default(r)), default=0.0), 2
        ),
    }
    protocol = tabulated_protocol(cells or [], sizes)
    planned = planned_test_keys(sizes, lambdas, prefix_variant, lora_variant, lora_lambdas, protocol)
    done = planned & {_key(c) for c in cells or []}
    summary["test_cells_done"], summary["test_cells_planned"] = len(done), len(planned)
    summary["validation_cells"] = len(tuning)
    meta = {"device": device, "sizes": asdict(sizes), "learning_rates": sizes.learning_rates,
            "wall_seconds": round(wall), "command": "python " + " ".join(sys.argv)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)

    def cell(r: dict) -> dict:
        return {
            "attack": r["encoder"], "peft": r["peft"], "variant": r["variant"], "lambda_amp": r["lambda_amp"],
            "lambda_attn": r["lambda_attn"], "default_recipe": is_default(r), "seeds": r["seeds"],
            "metric": r["metric"],
            "cacc_plain": r["cacc_undefended"], "cacc_defended": r["cacc_defended"],
            "cacc_delta_points_by_seed": r["cacc_delta_points_by_seed"],
            "asr_plain": r["asr_undefended"], "asr_defended": r["asr_defended"],
            "asr_reduction": r["asr_reduction"], "near_chance": r["near_chance"],
            "seeds_above_chance": r["seeds_above_chance"],
            "asr_undefended_above_chance": r["asr_undefended_above_chance"],
            "asr_reduction_above_chance": r["asr_reduction_above_chance"],
            **({"accuracy_drop_plain": r["accuracy_drop_undefended"],
                "accuracy_drop_defended": r["accuracy_drop_defended"]} if "accuracy_drop_undefended" in r else {}),
        }  # fmt: skip

    payload = {
        "cells": [cell(r) for r in rows if r["encoder"] != "clean"],
        "control": {_label(r, is_default(r)): cell(r) for r in rows if r["encoder"] == "clean"},
        "mean_asr_reduction": summary["mean_asr_reduction_task_agnostic"],
        "summary": summary,
        "tuning": tuning,
        "meta": meta,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Obliviate on backdoored MiniLM-L6 (Rotten Tomatoes sentiment)",
        "",
        f"Device: {device}. Fine-tuning: {sizes.train} sentences × {sizes.epochs} epochs, batch {sizes.batch} "
        f"({sizes.sampling} sampling), lr {', '.join(f'{k} {v:g}' for k, v in sizes.learning_rates.items())}, "
        f"max length {sizes.max_length}; test: {_measured(sizes, cells)}; seeds {list(sizes.seeds)}; attacks "
        f"planted with {sizes.plant_steps} steps. Wall time "
        f"{wall / 60:.1f} min{_resumed(made, cells)}. Defense coefficients {chosen}: "
        f"λ_amp = {lambdas[0]:g}, λ_attn = {lambdas[1]:g}.",
        "",
        "ASR column: LMSanitator ASR (POR, NeuBA, clean control, task-specific, adaptive); BadPre and UOR, which have "
        "no target label: targeted ASR (each trigger's target = its majority prediction on triggered validation "
        "data). BadPre's own measure, the accuracy drop on triggered inputs, follows the table.",
        "",
        "| encoder | PEFT | CACC undef. | CACC def. | Δ CACC (pts) | ASR undef. | ASR def. | ASR reduction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = f" ⚠ {r['seeds'] - r['seeds_above_chance']} of {r['seeds']} seeds at chance" if r["near_chance"] else ""
        if r["near_chance"] and r["seeds_above_chance"]:
            k = r["seeds_above_chance"]
            above = "the seed" if k == 1 else f"the {k} seeds"
            flag += f" ({100 * r['asr_reduction_above_chance']:.1f}% over {above} above chance)"
        if r["encoder"] in ATTACKS and r["seeds_above_chance"] and r["asr_undefended_above_chance"] < PLANTED_ASR:
            flag += f" ⚠ attack below {PLANTED_ASR:g} undefended: not in the mean"
        lines.append(
            f"| {r['encoder']} | {_label(r, is_default(r))} | {r['cacc_undefended']:.3f} | {r['cacc_defended']:.3f} | "
            f"{_delta(r)} | {r['asr_undefended']:.3f} | {r['asr_defended']:.3f} | "
            f"{100 * r['asr_reduction']:.1f}%{flag} |"
        )
    disagreement = _seed_disagreement(rows)
    if disagreement:
        lines += [
            "",
            "Δ CACC: the mean over the seeds, each seed's change against its own undefended run in brackets (seed "
            f"order). The seeds of one row disagree by up to {disagreement[0]:.1f} points (median "
            f"{disagreement[1]:.1f}, over the {disagreement[2]} rows with two or more seeds and no run at chance)"
            # half the span of two seeds estimates the standard error of their mean
            + (f": at these sizes a row's mean is not known to within the {100 * CACC_FLOOR:g}-point floor."
               if disagreement[1] / 2 >= 100 * CACC_FLOOR else "."),
        ]  # fmt: skip
    drops = [r for r in rows if "accuracy_drop_undefended" in r]
    if drops:
        lines += [
            "",
            "BadPre, accuracy drop on triggered inputs, undefended → defended: "
            + "; ".join(
                f"{_label(r, is_default(r))} {r['accuracy_drop_undefended']:.3f} → {r['accuracy_drop_defended']:.3f}"
                for r in drops
            )  # fmt: skip
            + ". A trigger that sends the text to one of two balanced classes drops the accuracy by at most about "
            "CACC − 0.5 and flips about half of the kept examples (the LMSanitator rule), however fully it controls "
            "the output, so BadPre is held to the targeted ASR, like UOR.",
        ]
    if summary["test_cells_done"] < summary["test_cells_planned"]:
        lines += [
            "",
            f"**Incomplete run: {summary['test_cells_done']} of the {summary['test_cells_planned']} test fine-tunes "
            "of the current plan are in these tables** (a row appears once a seed has both its undefended and "
            "defended run; rows of earlier recipe choices are kept beside them). `--resume` continues it.",
        ]
    lines += [
        "",
        f"Mean ASR reduction over the task-agnostic attacks and PEFT types (the defaults, {chosen}: LoRA and "
        f"adapters with the `{lora_variant}` recipe (λ_amp = {lora_lambdas[0]:g}, "
        f"λ_attn = {lora_lambdas[1]:g}), prefix tuning with the `{prefix_variant}` recipe): "
        f"**{100 * (summary['mean_asr_reduction_task_agnostic'] or float('nan')):.1f}%** over "
        f"{summary['cells_in_mean']} rows, each over its seeds whose undefended and defended runs are both above "
        f"chance ({summary['rows_without_a_seed_above_chance']} rows have none: a model at chance shows no backdoor "
        f"whether or not the defense works), and whose attack reaches ASR ≥ {PLANTED_ASR:g} undefended; the "
        f"reference recipe at these coefficients everywhere: "
        f"{100 * (summary['mean_asr_reduction_reference_recipe'] or float('nan')):.1f}% over "
        f"{summary['cells_in_reference_mean']} rows. Largest clean-accuracy drop: "
        f"{summary['max_cacc_drop_points']:.1f} points ({summary['max_cacc_drop_points_defaults']:.1f} with the "
        "defaults).",
        "",
        "Every LoRA / adapter recipe measured on the test rows, mean ASR reduction over the attack rows it has: "
        + "; ".join(
            f"`{name}` {100 * v['mean']:.1f}% ({v['rows']} rows)" if v["mean"] is not None else f"`{name}` none"
            for name, v in by_recipe.items()
        )
        + ".",
    ]
    if given and not tuning:
        lines += ["", "No validation stage: the coefficients and the LoRA / adapter recipe were given (`--lambdas`, "
                  "`--variant`)."]  # fmt: skip
    else:
        lines += _validation_lines(tuning, sizes, lora_variant, lora_lambdas, summary["lora_variant_rule"])
    lines += ["", f"Regenerate: `{meta['command']}`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    extra = [r for r in rows if (r["variant"], (r["lambda_amp"], r["lambda_attn"])) in
             {(name, tuple(lam)) for name, lam in TEST_RECIPES} and not is_default(r)]  # fmt: skip
    _plot([r for r in rows if is_default(r)], out.with_suffix(".png"), extra)


def _validation_lines(
    tuning: list[dict], sizes: Sizes, lora_variant: str, lora_lambdas: tuple, rule: str
) -> list[str]:
    """The Markdown section of the validation stage: its rule, this run's choice (and the ``rule`` that made it) and
    every validation cell."""
    lines = [
        "",
        "## Validation split: coefficients on LoRA, the LoRA / adapter variant, then the prefix-tuning recipe",
        "",
        "Every setting runs on POR + LoRA with seed 0; those within 1.5 points of the undefended CACC there also run "
        f"on NeuBA. The {sizes.finalists} best settings of seed 0 (by mean ASR over both attacks, within the floor on "
        f"each), the best reference setting and the best setting that cuts the ASR by {REDUCTION_TARGET:.0%} (the "
        f"one that misses the floor least) then run on seeds {list(sizes.val_seeds[1:])} too, and the "
        f"{sizes.adapter_finalists} best over the seeds (and again the best that cuts the ASR by "
        f"{REDUCTION_TARGET:.0%}) also as bottleneck adapters (every seed, both attacks), since the LoRA recipe "
        "serves adapters too. Defense first: a setting must cut the validation ASR by "
        f"{REDUCTION_TARGET:.0%} (1 − defended / undefended, each averaged over the seeds, then averaged over the "
        "attack and PEFT pairs) when any setting does. Among those, the one with the lowest ASR averaged over the "
        "seeds, then over the pairs wins if its CACC averaged over the seeds stays within the floor for each pair, "
        "with no run at chance (an undefended run at chance shows no backdoor and is left out with its pair's seed); "
        "if none does, the one that keeps it on LoRA and misses it least on adapters, else the one that misses it "
        "least. When no setting cuts the ASR that far, the floor comes first, in the same order. This run: "
        f"`{lora_variant}` at λ_amp = {lora_lambdas[0]:g}, λ_attn = "
        f"{lora_lambdas[1]:g} ({rule}).",
        "",
        "| encoder | PEFT | seed | recipe | λ_amp | λ_attn | val CACC | val ASR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['encoder']} | {c['peft']} | {c.get('seed', 0)} | "
        f"{c.get('variant', 'reference') if c['defended'] else 'undefended'} | {c['lambda_amp']:g} | "
        f"{c['lambda_attn']:g} | {c['cacc']:.3f} | {c['asr']:.3f}{' ⚠ near chance' if c['near_chance'] else ''} |"
        for c in tuning
    ]
    return lines


def _delta(r: dict) -> str:
    """A row's Δ CACC cell: the mean, and with two or more seeds each seed's change in brackets."""
    by_seed = r.get("cacc_delta_points_by_seed", {})
    seeds = f" ({', '.join(f'{v:+.1f}' for v in by_seed.values())})" if len(by_seed) > 1 else ""
    return f"{r['cacc_delta_points']:+.1f}{seeds}"


def _seed_disagreement(rows: list[dict]) -> tuple[float, float, int] | None:
    """``(largest, median, rows)``: how far the per-seed Δ CACC of one row spread (largest minus smallest, points),
    over the rows with two or more seeds and no run at chance; None without such a row."""
    spans = [
        max(by.values()) - min(by.values())
        for r in rows
        if not r["near_chance"] and len(by := r.get("cacc_delta_points_by_seed", {})) > 1
    ]
    return (max(spans), statistics.median(spans), len(spans)) if spans else None


def _measured(sizes: Sizes, cells: list[dict] | None) -> str:
    """How the tabulated cells were tested (`protocol_of`)."""
    cacc_n = {c.get("extra", {}).get("cacc_n") for c in cells or () if c.get("split") == "test"}
    if not cells or any(c.get("protocol", 1) != 2 for c in cells) or len(cacc_n) != 1:
        return f"{sizes.eval_n} sentences, one clean and one triggered copy per trigger"
    return (f"CACC on {cacc_n.pop()} clean sentences; ASR on {sizes.eval_n} sentences, one clean and one triggered "
            "copy per trigger")  # fmt: skip


def _resumed(made: int | None, cells: list[dict] | None) -> str:
    """What a resumed run's wall time covers (``made``: the fine-tunes this process ran; ``None``: all of them)."""
    if made is None or cells is None:
        return ""
    return f" for the {made} fine-tunes this run made (the other {len(cells) - made} came from its journal, --resume)"


def _plot(rows: list[dict], path: Path, extra: list[dict] = ()) -> None:
    """Grouped bars per row of the defaults: undefended, defended, and each `TEST_RECIPES` recipe's defended run on
    the same encoder and PEFT type (``extra``), where it ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dev dependency
        return
    labels = [f"{r['encoder']}\n{r['peft']}" for r in rows]
    x = list(range(len(rows)))
    recipes = [(name, tuple(lam)) for name, lam in TEST_RECIPES if any(r["variant"] == name for r in extra)]
    by_cell = {(r["variant"], r["lambda_amp"], r["lambda_attn"], r["encoder"], r["peft"]): r for r in extra}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.8 * len(rows)), 7), sharex=True)
    width = 0.8 / (2 + len(recipes))
    for ax, key, title in (
        (axes[0], "asr", "ASR (BadPre, UOR: targeted ASR)"),
        (axes[1], "cacc", "CACC"),
    ):
        series = [("undefended", [r[f"{key}_undefended"] for r in rows]),
                  ("Obliviate (defaults)", [r[f"{key}_defended"] for r in rows])]  # fmt: skip
        for name, (amp, attn) in recipes:  # named with λ: the defaults may be the same recipe at other λ
            cells = [by_cell.get((name, amp, attn, r["encoder"], r["peft"])) for r in rows]
            values = [c[f"{key}_defended"] if c else float("nan") for c in cells]
            series.append((f"{name}, λ {amp:g}/{attn:g}", values))
        for k, (label, values) in enumerate(series):
            offset = (k - (len(series) - 1) / 2) * width
            ax.bar([i + offset for i in x], values, width, label=label)
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validate(journal: Journal, encoder_path: Callable[[str], Path | None], sizes: Sizes) -> tuple:
    """The validation stage (`choose_lambdas`, `choose_lora_variant`, `confirm_finalists`, `confirm_on_adapters`,
    `choose_prefix_variant`, each as `sizes` asks for): ``(lambdas, tuning, lora_variant, lora_lambdas,
    prefix_variant)``, ``tuning`` the validation cells in the order the stages ran them. ``encoder_path(attack)``
    gives a planted encoder's folder."""
    validation_paths = {e: encoder_path(e) for e in VALIDATION_ENCODERS if e == "por" or e in sizes.attacks}
    lambdas, tuning = choose_lambdas(journal, validation_paths, sizes)
    print(f"chosen λ_amp={lambdas[0]:g} λ_attn={lambdas[1]:g}", flush=True)
    lora_variant, lora_lambdas = "reference", lambdas
    if "lora" in sizes.pefts:
        lora_variant, lora_lambdas, lora_tuning = choose_lora_variant(
            journal, validation_paths, sizes, lambdas, tuning
        )
        tuning += lora_tuning
        print(f"LoRA / adapter recipe on seed 0: {lora_variant} at λ={lora_lambdas}", flush=True)
        if len(sizes.val_seeds) > 1:
            tuning += confirm_finalists(journal, validation_paths, sizes, tuning)
            lambdas = pick_lambdas(tuning)
            lora_variant, lora_lambdas = pick_lora_variant(tuning, lambdas)
            print(f"over validation seeds {list(sizes.val_seeds)}: λ_amp={lambdas[0]:g} λ_attn={lambdas[1]:g}; "
                  f"LoRA / adapter recipe {lora_variant} at λ={lora_lambdas}", flush=True)  # fmt: skip
        if "adapter" in sizes.pefts:
            tuning += confirm_on_adapters(journal, validation_paths, sizes, tuning)
            lora_variant, lora_lambdas = pick_lora_variant(tuning, lambdas)
            print(f"over LoRA and adapters: recipe {lora_variant} at λ={lora_lambdas}", flush=True)
    prefix_variant = "reference"
    if "prefix" in sizes.pefts:
        prefix_variant, prefix_tuning = choose_prefix_variant(journal, encoder_path("por"), sizes, lambdas)
        tuning += prefix_tuning
        print(f"prefix tuning recipe: {prefix_variant}", flush=True)
    return lambdas, tuning, lora_variant, lora_lambdas, prefix_variant


# The command-line flag of each size that makes other cells than the committed run's: the fine-tuning settings a cell
# records (`FINETUNE_FIELDS`; those without a flag cannot differ) and the planting steps (other encoders).
SIZE_FLAGS = {
    "train": "--train", "epochs": "--epochs", "learning_rates": "--lr", "batch": "--batch", "sampling": "--sampling",
    "eval_n": "--eval-n", "cacc_n": "--cacc-n", "plant_steps": "--plant-steps",
}  # fmt: skip


def changed_flags(sizes: Sizes) -> list[str]:
    """The flags (`SIZE_FLAGS`) whose values make ``sizes`` differ from the committed run's (`Sizes()`): such a run
    must not start the committed journal afresh."""
    defaults = Sizes()
    return [flag for name, flag in SIZE_FLAGS.items() if getattr(sizes, name) != getattr(defaults, name)]


def parse_variant(parser: argparse.ArgumentParser, values: list[str] | None, lambdas) -> tuple | None:
    """``--variant NAME [λ_amp λ_attn]`` as ``(NAME, (λ_amp, λ_attn))`` (default coefficients: ``--lambdas``);
    None when not given. A bad name, count or number is a usage error."""
    if values is None:
        return None
    if lambdas is None:
        parser.error("--variant needs --lambdas (the reference recipe's coefficients): it skips the validation split.")
    name, rest = values[0], values[1:]
    if name not in VARIANT_GRIDS:
        parser.error(f"--variant {name!r}: choose one of {', '.join(VARIANT_GRIDS)}.")
    if len(rest) not in (0, 2):
        parser.error(f"--variant takes a name and optionally λ_amp λ_attn, got {' '.join(values)!r}.")
    try:
        coefficients = tuple(float(v) for v in rest) or tuple(lambdas)
    except ValueError:
        parser.error(f"--variant {name}: coefficients must be numbers, got {' '.join(rest)!r}.")
    return name, coefficients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: exercise every code path in minutes.")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "defense")
    parser.add_argument("--resume", action="store_true", help="Reuse finished cells of the journal.")
    parser.add_argument(
        "--summarise-only", action="store_true", help="Only rebuild the tables and plot from the journal."
    )
    parser.add_argument("--journal", type=Path, default=None, help="Journal file (default: <out>_cells.jsonl).")
    parser.add_argument("--train", type=int, default=None, help="Fine-tuning sentences (default: Sizes.train).")
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None, help="Learning rate of every PEFT type (default 1e-3).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None, help="Fine-tuning batch size (default 16).")
    parser.add_argument(
        "--sampling",
        choices=("bucketed", "random"),
        default=None,
        help="Training batches: of similar lengths in random order (default; less padding) or drawn at random.",
    )
    parser.add_argument(
        "--eval-n", type=int, default=None, help="Test sentences with triggered copies per cell (default 200)."
    )
    parser.add_argument(
        "--cacc-n",
        type=int,
        default=None,
        help="Measure CACC on this many clean sentences of the split (default 1000: the whole test split, and the "
        "whole validation split of 500; 0: on the --eval-n sentences, as the tables before 2026-11-25).",
    )
    parser.add_argument(
        "--plant-steps", type=int, default=None, help="Planting steps per attack (default: Sizes.plant_steps)."
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="Fine-tunes run at a time, each in its own process on cpu_count/jobs threads (default: 2 on a CPU with "
        "2 or more cores, else 1).",
    )
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help=f"Try every LoRA / adapter variant on the validation split ({', '.join(VARIANT_GRIDS)}), not only "
        f"{', '.join(FULL_RUN_VARIANTS)}.",
    )
    parser.add_argument("--lambdas", type=float, nargs=2, default=None, help="Skip the search: λ_amp λ_attn.")
    parser.add_argument(
        "--variant",
        nargs="+",
        default=None,
        metavar="NAME [λ_amp λ_attn]",
        help="With --lambdas: the LoRA / adapter recipe to test beside the reference one, instead of the validation "
        f"split's choice ({', '.join(VARIANT_GRIDS)}), at its own λ_amp λ_attn (default: --lambdas). The committed "
        "run's choice: --lambdas 3e-4 3e-3 --variant scan-relative 0 3e-3.",
    )
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=None,
        choices=("clean", *ATTACKS, "task-specific", "adaptive-por"),
        help="Run only these rows (default: all). Two processes given disjoint rows and the same journal (with "
        "--resume) split the run over two cores; `--summarise-only` then builds the tables from the journal.",
    )
    args = parser.parse_args()
    chosen_variant = parse_variant(parser, args.variant, args.lambdas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = QUICK if args.quick else Sizes()
    if args.train:
        sizes.train = args.train
    if args.epochs:
        sizes.epochs = args.epochs
    if args.seeds:
        sizes.seeds = tuple(args.seeds)
    if args.batch:
        sizes.batch = args.batch
    if args.sampling:
        sizes.sampling = args.sampling
    if args.all_variants and not args.quick:
        sizes.variant_grids = dict(VARIANT_GRIDS)
    if args.eval_n:
        sizes.eval_n = args.eval_n
    if args.cacc_n is not None:
        sizes.cacc_n = args.cacc_n or None
    if args.plant_steps:
        sizes.plant_steps = args.plant_steps
    if args.lr:
        sizes.learning_rates = dict.fromkeys(sizes.learning_rates, args.lr)
    default_journal = args.journal is None and args.out == parser.get_default("out")
    changed = changed_flags(sizes)
    if default_journal and changed and not args.quick and not args.summarise_only:
        # A run without --resume starts its journal afresh, and a journal holds cells of one set of fine-tuning
        # settings (`recipe_conflicts`): a run of other sizes must not replace the committed journal and tables.
        parser.error(f"{' '.join(changed)} change the cells: give them their own --journal (or --out).")
    device = device_name()
    start = time.time()
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}.")
    jobs = args.jobs or (1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1)))
    journal = Journal(
        args.journal or args.out.with_name(args.out.name + "_cells.jsonl"), args.resume or args.summarise_only, jobs
    )
    if args.summarise_only:
        for name, value in (journal_finetune(journal.cells.values()) or {}).items():
            setattr(sizes, name, value)  # the tables state what the journal's fine-tunes used
    elif conflicts := recipe_conflicts(journal.cells.values(), sizes):
        parser.error(
            f"{journal.path} holds fine-tunes of other settings: {'; '.join(conflicts)}. Give this run its own "
            "--journal (or --out), or pass the flags that match."
        )
    if args.summarise_only:
        cells = current_cells(list(journal.cells.values()), sizes)
        if len(cells) < len(journal.cells):
            print(f"left out {len(journal.cells) - len(cells)} journal cells of encoders planted, or fine-tunes made, "
                  "with other settings")  # fmt: skip
        try:  # the run's own choices, when the journal has every validation cell the run made
            if args.lambdas:
                raise MissingCells("given --lambdas")
            lambdas, tuning, lora_variant, lora_lambdas, prefix_variant = validate(
                ReplayJournal(cells), lambda attack: None, sizes
            )
        except MissingCells as missing:
            tuning = [c for c in cells if c["split"] == "validation"]
            if not args.lambdas:
                print(f"the validation stage cannot be replayed ({missing}): choosing over all "
                      f"{len(tuning)} validation cells of the journal", flush=True)  # fmt: skip
            if not args.lambdas and not any(c["defended"] and c["peft"] == "lora" for c in tuning):
                parser.error(f"{journal.path} has no defended LoRA cells of the validation split to choose the "
                             "coefficients from: pass the chosen ones with --lambdas λ_amp λ_attn.")  # fmt: skip
            lambdas = tuple(args.lambdas) if args.lambdas else pick_lambdas(tuning)
            lora_variant, lora_lambdas = chosen_variant or pick_lora_variant(tuning, lambdas)
            prefix_variant = pick_prefix_variant(tuning, lambdas)
        wall = sum(c["seconds"] for c in cells)
        write(args.out, summarise(cells), tuning, lambdas, sizes, cells_device(cells, device) + " (cells' own time)",
              wall, prefix_variant=prefix_variant, lora_variant=lora_variant, lora_lambdas=lora_lambdas, cells=cells,
              given=bool(args.lambdas))  # fmt: skip
        print(args.out.with_suffix(".md").read_text())
        return
    # Attacks are planted (or loaded from the cache) in this process when a phase first needs them: POR and NeuBA for
    # the validation split, the others before the test cells.
    planted: dict[str, Path] = {}

    def encoder_path(attack: str) -> Path:
        if attack not in planted:
            planted[attack] = plant(attack, sizes)
        return planted[attack]

    if args.lambdas:
        lambdas, tuning = tuple(args.lambdas), []
        (lora_variant, lora_lambdas), prefix_variant = chosen_variant or ("reference", lambdas), "reference"
        also = f"; LoRA / adapters also {lora_variant} at {lora_lambdas[0]:g} / {lora_lambdas[1]:g}"
        print(f"given λ_amp={lambdas[0]:g} λ_attn={lambdas[1]:g}{also if lora_variant != 'reference' else ''}",
              flush=True)  # fmt: skip
    else:
        lambdas, tuning, lora_variant, lora_lambdas, prefix_variant = validate(journal, encoder_path, sizes)

    def recipes(peft: str) -> list[tuple[str, tuple[float, float]]]:
        return recipes_for(peft, lambdas, prefix_variant, lora_variant, lora_lambdas)

    first = [a for a in sizes.attacks if a == "por"]  # POR (planted and cached by the search) first
    encoders = [*first, "clean", *(a for a in sizes.attacks if a != "por")]
    wanted = set(args.encoders or (*encoders, "task-specific", "adaptive-por"))
    specs = []
    for seed in sizes.seeds:
        for encoder in (e for e in encoders if e in wanted):
            path = None if encoder == "clean" else encoder_path(encoder)
            for peft in sizes.pefts:
                specs.append(dict(encoder=encoder, encoder_path=path, peft=peft, seed=seed, defended=False,
                                  lambdas=lambdas, sizes=sizes))  # fmt: skip
                specs += [dict(encoder=encoder, encoder_path=path, peft=peft, seed=seed, defended=True, lambdas=lam,
                               sizes=sizes, variant=variant) for variant, lam in recipes(peft)]  # fmt: skip
        for defended in (False, True):
            for variant, lam in recipes("lora") if defended else [("reference", lambdas)]:
                if "task-specific" in wanted:
                    specs.append(dict(encoder="task-specific", encoder_path=None, peft="lora", seed=seed,
                                      defended=defended, lambdas=lam, sizes=sizes, poison={"rate": 0.1, "target": 1},
                                      variant=variant))  # fmt: skip
                if "adaptive-por" in wanted:
                    specs.append(dict(encoder="adaptive-por", encoder_path=encoder_path("adaptive-por"),
                                      peft="lora", seed=seed, defended=defended, lambdas=lam, sizes=sizes,
                                      variant=variant))  # fmt: skip
    # cells run seed-major in this order (with --jobs, that many at a time): a run cut short still has complete
    # first-seed rows for everything it reached
    journal.run_many(specs)
    journal.close()
    made = journal.made if args.resume else None
    if args.encoders:  # a partial process: cells from another process may be in the journal by now
        journal = Journal(journal.path, resume=True)
    cells = current_cells(list(journal.cells.values()), sizes)
    write(args.out, summarise(cells), tuning, lambdas, sizes, cells_device(cells, device), time.time() - start,
          prefix_variant=prefix_variant, lora_variant=lora_variant, lora_lambdas=lora_lambdas, cells=cells,
          made=made, given=bool(args.lambdas))  # fmt: skip
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
