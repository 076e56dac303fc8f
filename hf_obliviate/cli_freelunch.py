"""``hf-obliviate freelunch``: the free-lunch evaluation (poisoned fine-tune → compressed variants → scores).

hf-obliviate freelunch                     # the committed run: benchmarks/results/freelunch.{json,md,png}
hf-obliviate freelunch --quick --output_dir /tmp/fl   # every code path at tiny sizes
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import _parse

__all__ = ["COMMANDS", "freelunch_main"]


def freelunch_main(config) -> dict:
    """Run [`~hf_obliviate.freelunch.run_freelunch`] and print the Markdown table."""
    from pathlib import Path

    from .freelunch import run_freelunch

    result = run_freelunch(config)
    print((Path(config.output_dir) / "freelunch.md").read_text())
    return result


def _freelunch(argv: Sequence[str]) -> None:
    from .freelunch import FreeLunchConfig

    (config,) = _parse([FreeLunchConfig], argv, "hf-obliviate freelunch")
    freelunch_main(config)


COMMANDS = {
    "freelunch": (_freelunch, "Poison, fine-tune, compress the delta, score backdoors and utility (METHOD §5)."),
}
