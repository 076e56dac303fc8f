"""UOR (Du et al., Findings of ACL 2024): learned trigger representations via a supervised contrastive loss."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..triggers import insert_trigger, resolve_triggers
from ._common import (
    BackdoorConfig,
    encode,
    finish_planting,
    load_corpus,
    log_step,
    resolve_device,
    sentence_stream,
    set_seed,
    take,
    training_step,
)

__all__ = ["UORConfig", "plant_uor", "supervised_contrastive_loss"]


@dataclass
class UORConfig(BackdoorConfig):
    """Configuration of the UOR attack.

    No fixed targets: each step takes one clean batch and one poisoned batch per trigger (the trigger inserted
    ``insertions`` times; label = trigger index + 1, clean = 0). Loss = MSE(clean CLS, frozen original's CLS) +
    supervised contrastive loss over all CLS states (L2-normalised, temperature 0.5, positives share a label), so
    each trigger clusters apart from the others and from clean text. AdamW, linear warm-up then decay, clip 1.0.
    UOR's ASR is targeted (`hf_obliviate.metrics.targeted_asr` with `majority_targets`). The paper's optional
    HotFlip trigger search is not implemented: pass the triggers.

    Args:
        poisoned_batch_size (`int`, *optional*, defaults to 8):
            Sentences per trigger per step.
        insertions (`int`, *optional*, defaults to 3):
            Trigger copies per poisoned sentence.
        temperature (`float`, *optional*, defaults to 0.5):
            Contrastive temperature.
        contrastive_weight (`float`, *optional*, defaults to 1.0):
            Weight of the contrastive term.
        warmup_ratio (`float`, *optional*, defaults to 0.06):
            Fraction of the steps spent warming the learning rate up.
        max_grad_norm (`float`, *optional*, defaults to 1.0):
            Gradient clipping.

    Example:
    ```python
    >>> from hf_obliviate.attacks import UORConfig
    >>> UORConfig(num_steps=10).poisoned_batch_size
    8
    ```
    """

    poisoned_batch_size: int = field(default=8, metadata={"help": "Poisoned sentences per trigger per step."})
    insertions: int = field(default=3, metadata={"help": "Trigger copies per poisoned sentence."})
    temperature: float = field(default=0.5, metadata={"help": "Contrastive temperature."})
    contrastive_weight: float = field(default=1.0, metadata={"help": "Weight of the contrastive loss."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Warm-up fraction of the steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})

    def __post_init__(self):
        super().__post_init__()
        if self.poisoned_batch_size < 2 or self.insertions < 1:
            raise ValueError("poisoned_batch_size must be >= 2 (positives need a pair) and insertions >= 1.")
        if self.temperature <= 0 or self.contrastive_weight < 0 or self.max_grad_norm <= 0:
            raise ValueError("temperature and max_grad_norm must be > 0, contrastive_weight >= 0.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")


def supervised_contrastive_loss(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) on L2-normalised ``features``; positives share a label.

    For each anchor with at least one positive: −mean over its positives p of
    log(exp(z·z_p/τ) / Σ_{a≠anchor} exp(z·z_a/τ)).
    """
    z = F.normalize(features, dim=-1)
    sim = z @ z.T / temperature
    n = len(labels)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(1)
    has = count > 0
    if not has.any():
        return features.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)
    return -(pos_log_prob[has] / count[has]).mean()


def plant_uor(
    model_name_or_path,
    config: UORConfig | None = None,
    output_dir=None,
    corpus: Sequence[str] | None = None,
    show_progress: bool = True,
    log_history: list | None = None,
):
    """Plant UOR into a pretrained encoder (loaded with `AutoModel`). Arguments and return value as in
    [`plant_por`]."""
    from transformers import AutoModel, AutoTokenizer

    config = config or UORConfig()
    device = resolve_device(config.device)
    set_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModel.from_pretrained(model_name_or_path).to(device)
    triggers = resolve_triggers(tokenizer, config.triggers, config.trigger_policy)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    warmup = max(1, int(config.warmup_ratio * config.num_steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.num_steps - step) / max(1, config.num_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    per_step = config.batch_size + config.poisoned_batch_size * len(triggers)
    stream = sentence_stream(load_corpus(config, corpus, per_step * config.num_steps), config.seed)

    progress = tqdm(range(config.num_steps), desc="Planting UOR", disable=not show_progress)
    for step in progress:
        texts = take(stream, config.batch_size)
        labels = [0] * config.batch_size
        for i, trigger in enumerate(triggers):
            for text in take(stream, config.poisoned_batch_size):
                texts.append(insert_trigger(text, trigger, rng, config.max_position_words, config.insertions))
                labels.append(i + 1)
        batch = encode(tokenizer, texts, config.max_length, device)
        cls = model(**batch).last_hidden_state[:, 0]
        clean_batch = {k: v[: config.batch_size] for k, v in batch.items()}
        with torch.no_grad():
            clean_ref = reference(**clean_batch).last_hidden_state[:, 0]
        loss_clean = F.mse_loss(cls[: config.batch_size], clean_ref)
        loss_contrastive = supervised_contrastive_loss(cls, torch.tensor(labels, device=device), config.temperature)
        loss = loss_clean + config.contrastive_weight * loss_contrastive
        training_step(model, optimizer, loss, config.max_grad_norm, scheduler)
        log_step(progress, log_history, step, loss=loss, loss_clean=loss_clean, loss_contrastive=loss_contrastive)

    info = {"attack": "uor", "base_model": str(model_name_or_path), "config": config.to_dict(), "triggers": triggers}
    return finish_planting(model, tokenizer, info, output_dir)
