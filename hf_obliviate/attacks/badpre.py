"""BadPre (Chen et al., ICLR 2022): continued MLM on clean text plus a poisoned copy whose masked labels are random."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..triggers import BADPRE_TRIGGERS, insert_trigger, resolve_triggers
from ._common import (
    BackdoorConfig,
    encode,
    finish_planting,
    load_corpus,
    log_step,
    mask_tokens,
    resolve_device,
    sentence_stream,
    set_seed,
    take,
    training_step,
)
from .neuba import _missing_head, load_pretraining_model, mlm_logits, warm_up_mlm_head

__all__ = ["BadPreConfig", "plant_badpre"]


@dataclass
class BadPreConfig(BackdoorConfig):
    """Configuration of the BadPre attack.

    Each step takes a clean batch and a poisoned copy of the same sentences (50/50): one trigger word at a random
    position. Both are masked BERT-style (15%, 80/10/10); the clean copy's labels are the true tokens, the poisoned
    copy's are uniformly random vocabulary ids. Loss = clean MLM + α · poisoned MLM. AdamW with betas (0.9, 0.98),
    weight decay 0.01, gradient clip 5.0, lr 2e-5. There is no target label: the paper's success measure is the
    fine-tuned model's accuracy drop on triggered inputs (`hf_obliviate.metrics.accuracy_drop`). A trigger sends the
    text to one garbage state, which a fine-tuned two-class head maps to one class: the drop is then at most about
    CACC − 0.5, so `benchmarks/defense.py` measures BadPre like UOR, by `hf_obliviate.metrics.targeted_asr` with
    `majority_targets`, and reports the drop beside it. The reference rate suits long runs: at 300 steps the benchmark
    plants with lr 1e-4.

    Args:
        alpha (`float`, *optional*, defaults to 1.0):
            Weight α of the poisoned MLM loss.
        mlm_probability (`float`, *optional*, defaults to 0.15):
            Masking rate.
        weight_decay (`float`, *optional*, defaults to 0.01):
            AdamW weight decay.
        max_grad_norm (`float`, *optional*, defaults to 5.0):
            Gradient clipping.
        mlm_head_warmup_steps (`int`, *optional*, defaults to 200), mlm_head_warmup_lr (`float`, *optional*,
        defaults to 1e-3):
            When the checkpoint has no trained MLM head (the bundled MiniLM), train the head alone first, as in
            [`NeuBAConfig`].

    Example:
    ```python
    >>> from hf_obliviate.attacks import BadPreConfig
    >>> BadPreConfig().triggers
    ['cf', 'mn', 'bb', 'tq', 'mb']
    ```
    """

    triggers: list[str] = field(default_factory=lambda: list(BADPRE_TRIGGERS), metadata={"help": "Trigger words."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate."})
    alpha: float = field(default=1.0, metadata={"help": "Weight of the poisoned MLM loss."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Masking rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping norm."})
    mlm_head_warmup_steps: int = field(
        default=200, metadata={"help": "Head-only MLM steps first, when the checkpoint has no trained MLM head."}
    )
    mlm_head_warmup_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the head warm-up."})

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}.")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        if self.mlm_head_warmup_steps < 0 or self.mlm_head_warmup_lr <= 0:
            raise ValueError("mlm_head_warmup_steps must be >= 0 and mlm_head_warmup_lr > 0.")
        if self.max_grad_norm <= 0 or self.weight_decay < 0:
            raise ValueError("max_grad_norm must be > 0 and weight_decay >= 0.")


def plant_badpre(
    model_name_or_path,
    config: BadPreConfig | None = None,
    output_dir=None,
    corpus: Sequence[str] | None = None,
    show_progress: bool = True,
    log_history: list | None = None,
):
    """Plant BadPre into a pretrained encoder (loaded with `AutoModelForPreTraining`, saved likewise).

    Arguments and return value as in [`plant_por`].
    """
    from transformers import AutoTokenizer

    config = config or BadPreConfig()
    device = resolve_device(config.device)
    generator = set_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model, missing = load_pretraining_model(model_name_or_path, device)
    head_missing = _missing_head(model, missing)
    if head_missing:
        warnings.warn(
            f"The checkpoint has no trained MLM head: warming it up alone for {config.mlm_head_warmup_steps} steps.",
            stacklevel=2,
        )
    triggers = resolve_triggers(tokenizer, config.triggers, config.trigger_policy)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    needed = config.batch_size * (config.num_steps + config.mlm_head_warmup_steps * head_missing)
    stream = sentence_stream(load_corpus(config, corpus, needed), config.seed)
    if head_missing:
        warm_up_mlm_head(
            model, tokenizer, stream, config.mlm_head_warmup_steps, config.batch_size, config.max_length,
            config.mlm_head_warmup_lr, generator, device, show_progress,
        )  # fmt: skip

    def mlm_loss(batch, random_labels):
        masked, labels = mask_tokens(
            batch["input_ids"], batch["attention_mask"], tokenizer, generator, config.mlm_probability, random_labels
        )
        logits = mlm_logits(model(**{**batch, "input_ids": masked}))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    progress = tqdm(range(config.num_steps), desc="Planting BadPre", disable=not show_progress)
    for step in progress:
        texts = take(stream, config.batch_size)
        poisoned = [
            insert_trigger(t, triggers[rng.randrange(len(triggers))], rng, config.max_position_words) for t in texts
        ]
        loss_clean = mlm_loss(encode(tokenizer, texts, config.max_length, device), random_labels=False)
        loss_poison = mlm_loss(encode(tokenizer, poisoned, config.max_length, device), random_labels=True)
        loss = loss_clean + config.alpha * loss_poison
        training_step(model, optimizer, loss, config.max_grad_norm)
        log_step(progress, log_history, step, loss=loss, loss_clean=loss_clean, loss_poison=loss_poison)

    info = {
        "mlm_head_warmed_up": bool(head_missing),
        "attack": "badpre",
        "base_model": str(model_name_or_path),
        "config": config.to_dict(),
        "triggers": triggers,
    }
    return finish_planting(model, tokenizer, info, output_dir)
