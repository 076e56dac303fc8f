"""``hf-obliviate``: a thin command line over the library. Each subcommand parses dataclasses with
``HfArgumentParser`` (so every field has a ``--flag`` and ``--help`` text) and calls one library function.

    hf-obliviate train    --train_file data.csv --peft lora --output_dir out [--lambda_attn 3e-3 ...]
    hf-obliviate attack   --attack por --output_dir backdoored/       (plant a backdoor on our own machine)
    hf-obliviate eval     --model out/ --base backdoored/             (CACC / ASR table, JSON and Markdown)
    hf-obliviate compress --base BASE --finetuned FT --output_dir delta/
    hf-obliviate push     --model FT --base BASE --repo_id user/name
    hf-obliviate pull     --base BASE --repo_id user/name --output_dir rebuilt/
    hf-obliviate hub serve --root hub-data/ [--port 8765] [--token T]   (local Hub endpoint for development)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TrainConfig", "main", "train_main"]


@dataclass
class TrainConfig:
    """What to fine-tune on which data (the training hyper-parameters are ``ObliviateTrainingArguments``)."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a .csv or .jsonl file with text and label columns, or a `datasets` folder "
            "saved with save_to_disk. Default: the bundled Rotten Tomatoes training sentences."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Name of the text column."})
    label_column: str = field(default="label", metadata={"help": "Name of the integer label column."})
    model: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id (default: the bundled MiniLM-L6)."}
    )
    peft: str = field(default="lora", metadata={"help": "PEFT type: lora, dora, prefix, ia3 or adapter."})
    r: int = field(default=16, metadata={"help": "LoRA rank (adapters: bottleneck width is 4r)."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per example."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Keep a seeded subset of this size."})

    def __post_init__(self):
        from .models import PEFT_TYPES

        if self.peft not in PEFT_TYPES:
            raise ValueError(f"Unknown --peft {self.peft!r}: choose one of {', '.join(PEFT_TYPES)}.")
        if self.train_file is not None and not Path(self.train_file).exists():
            raise ValueError(f"--train_file {self.train_file} does not exist.")


def load_examples(
    path: str | None, text_column: str = "text", label_column: str = "label", n: int | None = None, seed: int = 0
) -> list[dict]:
    """Read ``[{"text", "label"}]`` from a CSV, a JSONL file or a saved ``datasets`` folder (default: bundled)."""
    import random

    if path is None:
        from .data import load_movie_reviews

        return load_movie_reviews("train", n=n, seed=seed)
    file = Path(path)
    if file.is_dir():
        from datasets import load_from_disk

        rows = list(load_from_disk(str(file)))
    elif file.suffix == ".csv":
        import csv

        with open(file, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif file.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"Cannot read {file}: use .csv, .jsonl or a `datasets` folder saved with save_to_disk.")
    missing = {text_column, label_column} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{file} lacks the column(s) {sorted(missing)}; set --text_column / --label_column.")
    examples = [{"text": str(r[text_column]), "label": int(r[label_column])} for r in rows]
    if n is not None and n < len(examples):
        examples = random.Random(seed).sample(examples, n)
    return examples


_RUN_FILE = "obliviate_run.json"
_VOLATILE = {"output_dir", "logging_dir", "run_name", "report_to", "disable_tqdm", "logging_steps", "push_to_hub"}


def _run_hash(config: TrainConfig, args) -> str:
    from dataclasses import asdict

    from .artifacts import settings_hash

    settings = {k: v for k, v in args.to_dict().items() if k not in _VOLATILE}
    return settings_hash({"data": asdict(config), "args": settings})


def train_main(config: TrainConfig, args) -> Path:
    """Fine-tune ``config.model`` with ``config.peft`` (defended unless ``--obliviate False``) and save the adapter.

    The run is cached by the hash of its settings: if ``output_dir`` already holds the adapter of the same settings,
    nothing is trained again.
    """
    from .models import load_classifier, wrap_peft
    from .trainer import fine_tune

    out = Path(args.output_dir)
    digest = _run_hash(config, args)
    run_file = out / _RUN_FILE
    if run_file.is_file() and json.loads(run_file.read_text()).get("hash") == digest:
        if any(out.glob("adapter_model.safetensors")):
            print(f"{out} already holds this run (settings hash {digest}); nothing to do.")
            return out

    examples = load_examples(
        config.train_file, config.text_column, config.label_column, config.max_train_examples, args.seed
    )
    num_labels = max(e["label"] for e in examples) + 1
    model, tokenizer = load_classifier(config.model, num_labels=num_labels)
    model = wrap_peft(model, config.peft, r=config.r)
    trainer = fine_tune(model, tokenizer, examples, args, max_length=config.max_length)
    if getattr(trainer, "obliviate_scan_tokens", None):
        print(f"Trigger scan, most suspicious first: {' '.join(trainer.obliviate_scan_tokens)}")
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        run_file.write_text(json.dumps({"hash": digest, "peft": config.peft, "obliviate": args.obliviate}) + "\n")
    print(f"Saved the {'defended' if args.obliviate else 'plain'} {config.peft} adapter to {args.output_dir}")
    return out


def _parse(dataclasses: Sequence[type], argv: Sequence[str], prog: str):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclasses), prog=prog)
    return parser.parse_args_into_dataclasses(args=list(argv))


def _train(argv: Sequence[str]) -> None:
    from .trainer import ObliviateTrainingArguments

    argv = list(argv)
    if "--output_dir" not in argv:
        argv += ["--output_dir", "obliviate-out"]
    if "--report_to" not in argv:
        argv += ["--report_to", "none"]
    config, args = _parse([TrainConfig, ObliviateTrainingArguments], argv, "hf-obliviate train")
    train_main(config, args)


def _delta(name: str) -> Callable[[Sequence[str]], None]:
    def run(argv: Sequence[str]) -> None:
        from .hub import cli as hub_cli

        config_cls, func = {
            "compress": (hub_cli.CompressConfig, hub_cli.compress_main),
            "push": (hub_cli.PushConfig, hub_cli.push_main),
            "pull": (hub_cli.PullConfig, hub_cli.pull_main),
        }[name]
        (config,) = _parse([config_cls], argv, f"hf-obliviate {name}")
        result = func(config)
        if result is not None:
            print(result)

    return run


_HUB_USAGE = "usage: hf-obliviate hub serve --root DIR [--port 8765] [--host 127.0.0.1] [--token T] [--help]"


def _hub(argv: Sequence[str]) -> None:
    """``hf-obliviate hub serve``: the local Hub-compatible endpoint (development and tests, not a Hub)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_HUB_USAGE)
        return
    if argv[0] != "serve":
        raise ValueError(f"unknown hub subcommand {argv[0]!r}; {_HUB_USAGE}")
    from .hub import cli as hub_cli

    (config,) = _parse([hub_cli.ServeConfig], argv[1:], "hf-obliviate hub serve")
    hub_cli.serve_main(config)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "train": (_train, "Fine-tune a PEFT classifier with (or without) the Obliviate defense."),
    "compress": (_delta("compress"), "Compress a fine-tuning delta (BitDelta and baselines) from two checkpoints."),
    "push": (_delta("push"), "Compress a fine-tune's delta and push it to the Hub in one commit, with a card."),
    "pull": (_delta("pull"), "Download a compressed delta, verify its base and rebuild the model."),
    "hub": (_hub, "`hub serve`: a local Hub-compatible endpoint for development and tests."),
}


def _usage() -> str:
    lines = ["usage: hf-obliviate <command> [--help] [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-obliviate`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_optional_commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-obliviate: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        COMMANDS[name][0](rest)
    except (ValueError, FileNotFoundError) as err:
        print(f"hf-obliviate {name}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _load_optional_commands() -> None:
    """The attack and evaluation commands live in their own module."""
    from hf_obliviate.cli_attacks import COMMANDS as attack_commands

    for name, entry in attack_commands.items():
        COMMANDS.setdefault(name, entry)
    from hf_obliviate.cli_freelunch import COMMANDS as freelunch_commands
    from hf_obliviate.cli_lens import COMMANDS as lens_commands

    for name, entry in {**lens_commands, **freelunch_commands}.items():
        COMMANDS.setdefault(name, entry)
    from hf_obliviate.cli_space import COMMANDS as space_commands

    for name, entry in space_commands.items():
        COMMANDS.setdefault(name, entry)


if __name__ == "__main__":
    raise SystemExit(main())
