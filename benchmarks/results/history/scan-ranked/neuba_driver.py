"""The driver of ``neuba_cells.jsonl``: `defense.run_cell` on NeuBA planted for 640 steps, 200 fine-tuning steps.

    HF_OBLIVIATE_CACHE=/tmp/cpu640/cache python neuba_driver.py neuba plant      # plant once (cached)
    HF_OBLIVIATE_CACHE=/tmp/cpu640/cache OMP_NUM_THREADS=1 python neuba_driver.py neuba lora:1:plain \\
        lora:1:scan-relative lora:1:scan-kl ...                                   # PEFT:SEED:VARIANT, one line each
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    sys.path.insert(0, str(HERE.parents[2]))
    import defense

    sizes = defense.Sizes(train=3200, epochs=1, eval_n=1000, plant_steps=640)
    encoder = sys.argv[1]
    path = defense.plant(encoder, sizes)
    if sys.argv[2:] == ["plant"]:
        return
    for spec in sys.argv[2:]:
        peft, seed, variant = spec.split(":")
        defended = variant != "plain"
        cell = defense.run_cell(encoder, path, peft, int(seed), defended, (0.0, 3e-3), sizes,
                                variant=variant if defended else "reference")  # fmt: skip
        with open(HERE / f"{encoder}_cells.jsonl", "a") as out:
            out.write(json.dumps(dataclasses.asdict(cell)) + "\n")
        print("CELL", spec, cell.cacc, cell.asr, flush=True)


if __name__ == "__main__":
    main()
