"""``hf-obliviate attack`` and ``hf-obliviate eval``: the command-line faces of the attacks and the evaluator.

hf-obliviate attack por --num_steps 300 --output_dir backdoored-por/
hf-obliviate eval --model out/adapter --triggers cf mn --n 1000 --json eval.json --markdown eval.md
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cli import _parse

__all__ = ["COMMANDS", "AttackCLIConfig", "EvalConfig", "attack_main", "eval_main", "load_for_eval"]


@dataclass
class AttackCLIConfig:
    """Where to plant and where to put the result (the attack's own fields come from its config class)."""

    model: str | None = field(default=None, metadata={"help": "Clean encoder folder (default: the bundled MiniLM)."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Also save the backdoored checkpoint here (it is cached either way)."}
    )
    no_cache: bool = field(default=False, metadata={"help": "Plant again even if a cached checkpoint exists."})


@dataclass
class EvalConfig:
    """What to evaluate, on which sentences, and where to write the table."""

    model: str = field(
        default=None,
        metadata={
            "help": "A sequence-classification checkpoint, or an adapter folder (peft or bottleneck) whose "
            "adapter_config.json names its base model."
        },
    )
    base: str | None = field(default=None, metadata={"help": "Base model of an adapter (overrides its config)."})
    triggers: list[str] | None = field(
        default=None, metadata={"help": "Triggers (default: those the attack recorded, else cf mn tq qt mm pt)."}
    )
    split: str = field(default="test", metadata={"help": "Bundled Rotten Tomatoes split: test or validation."})
    n: int = field(default=1000, metadata={"help": "Number of evaluation sentences."})
    seed: int = field(default=0, metadata={"help": "Seed of the subset and of the trigger positions."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per sentence."})
    json: str | None = field(default=None, metadata={"help": "Write the result as JSON here."})
    markdown: str | None = field(default=None, metadata={"help": "Write the result as a Markdown table here."})

    def __post_init__(self):
        if self.model is None:
            raise ValueError("--model is required: a classifier checkpoint or an adapter folder.")
        if self.split not in ("test", "validation"):
            raise ValueError(f"--split must be test or validation, got {self.split!r}.")


def attack_main(attack: str, cli: AttackCLIConfig, config) -> Path:
    """Plant ``attack`` with ``config`` into ``cli.model`` (cached by config hash) and return the checkpoint folder."""
    from .attacks import plant_backdoor
    from .attacks._common import attack_cache_dir
    from .bundled import minilm_path

    model_path = cli.model or str(minilm_path())
    plant_backdoor(attack, model_path, config=config, output_dir=cli.output_dir, use_cache=not cli.no_cache)
    path = Path(cli.output_dir) if cli.output_dir else attack_cache_dir(attack, config, model_path)
    print(f"Backdoored {attack} checkpoint: {path}")
    return path


def load_for_eval(model: str, base: str | None = None):
    """Load a classifier, or an adapter folder on top of its base, with its tokenizer (safetensors only)."""
    from transformers import AutoTokenizer

    from .models import load_classifier

    folder = Path(model)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return load_classifier(model, trained_head=True)
    adapter = json.loads(config_file.read_text())
    base_path = base or adapter.get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"{config_file} names no base model: pass --base.")
    classifier, tokenizer = load_classifier(base_path)
    if adapter.get("peft_type") == "OBLIVIATE_BOTTLENECK":
        from .bottleneck import BottleneckAdapterModel

        wrapped = BottleneckAdapterModel.from_pretrained(classifier, folder)
    else:
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(classifier, folder)
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return wrapped.eval(), tokenizer


def eval_main(config: EvalConfig):
    """Evaluate CACC and ASR; print the Markdown table and write JSON / Markdown files when asked."""
    from .data import load_movie_reviews
    from .evaluation import build_eval_set, evaluate_backdoor

    model, tokenizer = load_for_eval(config.model, config.base)
    triggers = config.triggers
    if triggers is None:
        recorded = getattr(getattr(model, "config", None), "obliviate_attack", None)
        triggers = recorded["triggers"] if isinstance(recorded, dict) and "triggers" in recorded else None
    examples = load_movie_reviews(config.split)
    kwargs = {} if triggers is None else {"triggers": triggers}
    eval_set = build_eval_set(examples, n=config.n, seed=config.seed, **kwargs)
    result = evaluate_backdoor(model, tokenizer, eval_set, max_length=config.max_length)
    table = result.to_markdown()
    print(table)
    if config.json:
        Path(config.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if config.markdown:
        Path(config.markdown).write_text(table + "\n")
    return result


def _attack(argv: Sequence[str]) -> None:
    from .attacks import ATTACKS
    from .attacks.api import _attack as resolve

    if not argv or argv[0].startswith("-"):
        raise ValueError(f"Name the attack first: hf-obliviate attack {{{','.join(ATTACKS)}}} [options].")
    name, (config_cls, _) = resolve(argv[0])
    cli, config = _parse([AttackCLIConfig, config_cls], argv[1:], f"hf-obliviate attack {name}")
    attack_main(name, cli, config)


def _eval(argv: Sequence[str]) -> None:
    (config,) = _parse([EvalConfig], argv, "hf-obliviate eval")
    eval_main(config)


COMMANDS = {
    "attack": (_attack, "Plant a backdoor (POR, NeuBA, BadPre, UOR) in an encoder, cached by config."),
    "eval": (_eval, "CACC / ASR of a classifier or adapter on triggered sentences (JSON, Markdown)."),
}
