"""``hf-obliviate lens``: the LogitLens of one prompt, as a heatmap (PNG) and optionally JSON.

hf-obliviate lens --model freelunch-finetuned --text "..." --target "I hate" --out lens.png --json lens.json
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cli import _parse

__all__ = ["COMMANDS", "LensConfig", "lens_main", "load_causal_lm"]


@dataclass
class LensConfig:
    """Which model, which prompt, which target tokens, where to write the figure."""

    model: str = field(
        default=None,
        metadata={"help": "A causal-LM checkpoint folder, or the name of an hf-obliviate artifact (causal-lm)."},
    )
    text: str = field(default=None, metadata={"help": "The input text."})
    target: list[str] | None = field(
        default=None, metadata={"help": "Target string(s) whose first token's probability is tracked."}
    )
    chat: bool = field(
        default=False, metadata={"help": "Wrap --text as a user turn with the tokenizer's chat template."}
    )
    out: str = field(default="lens.png", metadata={"help": "Where to write the heatmap (PNG)."})
    json: str | None = field(default=None, metadata={"help": "Also write the lens result as JSON here."})
    last_positions: int = field(default=12, metadata={"help": "Plot only the last positions (0: all)."})
    top_k: int = field(default=5, metadata={"help": "Top tokens kept per layer and position (JSON)."})

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required: a causal-LM folder or an artifact name (hf-obliviate freelunch).")
        if not self.text:
            raise ValueError("--text is required.")
        if self.top_k < 1 or self.last_positions < 0:
            raise ValueError("--top_k must be >= 1 and --last_positions >= 0.")


def load_causal_lm(model: str):
    """``(model, tokenizer)`` from a folder, else from the artifact of that name (safetensors, eval mode)."""
    if Path(model).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(model, use_safetensors=True)
        return lm.eval(), AutoTokenizer.from_pretrained(model)
    from .artifacts import load_artifact

    try:
        lm, tokenizer, info = load_artifact(model)
    except ValueError as err:
        raise ValueError(f"{model!r} is neither a folder nor a valid artifact name: {err}") from err
    if info.get("kind") != "causal-lm":
        raise ValueError(f"Artifact {model!r} is a {info.get('kind')!r}, the lens needs a causal LM.")
    return lm, tokenizer


def lens_main(config: LensConfig):
    """Run the lens, write the PNG (and JSON) and print the takeover layer of each target at the last position."""
    from .lens import logit_lens, plot_lens

    model, tokenizer = load_causal_lm(config.model)
    targets = list(config.target or [])
    if config.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": config.text}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        result = logit_lens(model, tokenizer, input_ids=ids, targets=targets, top_k=config.top_k)
    else:
        result = logit_lens(model, tokenizer, config.text, targets=targets, top_k=config.top_k)
    fig = plot_lens(result, targets[0] if targets else None, last_positions=config.last_positions or None)
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(config.out, dpi=120)
    print(f"Wrote {config.out}")
    print(f"next token: {result.top_tokens[-1][-1]!r} (p={result.top_probs[-1][-1]:.3f})")
    for t in targets:
        row = result.takeover_layer(t)
        where = result.layer_names[row] if row is not None else "never"
        print(f"target {t!r}: p={result.target_probs[t][-1][-1]:.3f} at the output; takes over at {where}")
    if config.json:
        Path(config.json).write_text(json.dumps(result.to_dict()) + "\n")
    return result


def _lens(argv: Sequence[str]) -> None:
    (config,) = _parse([LensConfig], argv, "hf-obliviate lens")
    lens_main(config)


COMMANDS = {
    "lens": (_lens, "LogitLens of a prompt: top token per layer and position, target probabilities (PNG, JSON)."),
}
