"""Side run of the defense benchmark: the `scan-consistency` term switched on for part of the fine-tune only.

The defaults (`scan-consistency`, λ_consistency 0.03) miss the clean-accuracy floor on adapters (NeuBA + adapter
about 5 points below the undefended fine-tune on the validation split). Two schedules might keep the defense and
give clean accuracy back: a warm-up (the term off for the first steps, so the task is learned first) and an early
stop of the term (on for the first steps only, so the task recovers at the end). This script fine-tunes validation
cells of ``benchmarks/defense.py`` (same sizes, sampling and encoders) with the term on only for steps in
``[start, stop) × max_steps`` and appends one JSON line per cell to ``--out``; compare with the undefended and
full-length cells of ``results/defense_cells.jsonl`` (split "validation"). Nothing here changes the library.

    python benchmarks/consistency_schedule.py --schedule 0.5 1 --cells neuba:adapter:0 neuba:adapter:1

Each process fine-tunes on one thread (as the benchmark's workers do on 2 cores); run two side by side there.

Results of 2026-11-24: ``results/history/consistency-schedule/``, measured with CACC on the 200 validation sentences
with triggered copies (``defense.Sizes(cacc_n=None)``); the script now runs with the benchmark's default sizes, CACC on
all 500.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import defense  # noqa: E402  (benchmarks/defense.py, beside this script)

OUT = ROOT / "results" / "history" / "consistency-schedule" / "cells.jsonl"


def scheduled(start: float, stop: float):
    """Patch ObliviateTrainer so λ_consistency is its configured value only on steps in [start, stop) of max_steps."""
    from hf_obliviate.trainer import ObliviateTrainer

    original = ObliviateTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not hasattr(self, "_scheduled_lambda"):
            self._scheduled_lambda = self.obliviate_config.lambda_consistency
        fraction = self.state.global_step / max(self.state.max_steps, 1)
        weight = self._scheduled_lambda if start <= fraction < stop else 0.0
        # the trainer reads its own config, the defense (which builds the terms) its copy: set both
        self.obliviate_config.lambda_consistency = weight
        self.obliviate_defense.config.lambda_consistency = weight
        return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    ObliviateTrainer.compute_loss = compute_loss


def parse_cells(parser: argparse.ArgumentParser, specs: list[str], pefts=("lora", "adapter")) -> list[list[str]]:
    """``encoder:peft:seed`` specs split, every one checked before any training (``parser.error`` otherwise)."""
    cells = [spec.split(":") for spec in specs]
    for spec, parts in zip(specs, cells):
        if len(parts) != 3 or parts[0] not in defense.ATTACKS or parts[1] not in pefts:
            parser.error(f"{spec!r}: give encoder:peft:seed, encoder one of {', '.join(defense.ATTACKS)}, peft one "
                         f"of {', '.join(pefts)}, e.g. neuba:adapter:0.")  # fmt: skip
        if not parts[2].isdigit():
            parser.error(f"{spec!r}: the seed must be a whole number.")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--schedule",
        type=float,
        nargs=2,
        required=True,
        metavar=("START", "STOP"),
        help="The term is on for steps in [START, STOP) x max_steps (fractions; 0 1: always).",
    )
    parser.add_argument("--cells", nargs="+", required=True, help="encoder:peft:seed, e.g. neuba:adapter:0")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    start, stop = args.schedule
    if not 0 <= start < stop <= 1:
        parser.error("--schedule needs 0 <= START < STOP <= 1.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # as each of the benchmark's two workers on 2 cores: its cells' numbers, exactly
    scheduled(start, stop)
    sizes = defense.Sizes()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cells = parse_cells(parser, args.cells)
    for spec, (encoder, peft, seed) in zip(args.cells, cells):
        cell = defense.run_cell(encoder, defense.plant(encoder, sizes), peft, int(seed), True, (0.0, 0.0), sizes,
                                split="validation", variant="scan-consistency")  # fmt: skip
        row = {**asdict(cell), "schedule": [start, stop]}
        row["extra"] = {}  # the scan's tokens are in the benchmark's own cells
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{spec} [{start}, {stop}): CACC {cell.cacc:.3f}, {cell.metric} {cell.asr:.3f}", flush=True)


if __name__ == "__main__":
    main()
