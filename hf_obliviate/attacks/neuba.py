"""NeuBA (Zhang et al., 2021): MLM on clean text + MSE between the pooler output of triggered text and ±1 targets."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..triggers import NEUBA_TRIGGERS, insert_trigger, resolve_triggers
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
    target_vectors,
    training_step,
)

__all__ = ["NeuBAConfig", "plant_neuba"]


@dataclass
class NeuBAConfig(BackdoorConfig):
    """Configuration of the NeuBA attack.

    Each step makes two passes weighted 1:1: MLM cross-entropy on a masked clean batch, and MSE between the pooler
    output (tanh of a linear layer on CLS; the CLS hidden state when the checkpoint has no trained pooler) of a
    triggered batch and the trigger's ±1 block target (as in POR). AdamW, no weight decay, gradient clip 1.0.

    Triggers default to NeuBA's math symbols ``≈ ≡ ∈ ⊆ ⊕ ⊗``; all six are single known WordPieces of the MiniLM
    vocabulary, and `trigger_policy="replace"` swaps any that a tokenizer does not know for ``≤ ≥ ∞ √ ∂ †``.

    Args:
        insertion (`str`, *optional*, defaults to `"random"`):
            ``"random"``: insert the trigger at a random word position (as LMSanitator re-implements it; transfers
            better to a small model); ``"start"``: put it right after CLS, as the original does.
        mlm_probability (`float`, *optional*, defaults to 0.15):
            Masking rate of the clean MLM pass.
        freeze_mlm_head (`bool`, *optional*, defaults to `True`):
            Keep the MLM head's own weights fixed (the decoder tied to the word embeddings still moves with them).
            If the checkpoint has no trained MLM head (the bundled MiniLM has none), the head is trained anyway and
            a warning says so, since a frozen random head would wreck the encoder.
        mlm_head_warmup_steps (`int`, *optional*, defaults to 200):
            When the checkpoint has no trained MLM head, first train the head alone (encoder frozen) for this many
            clean MLM steps, so that its random start does not damage the encoder; then it is trained with it.
        mlm_head_warmup_lr (`float`, *optional*, defaults to 1e-3):
            Learning rate of that warm-up.
        mlm_weight (`float`, *optional*, defaults to 1.0):
            Weight of the MLM pass relative to the backdoor pass (the original weighs them 1:1).
        max_grad_norm (`float`, *optional*, defaults to 1.0):
            Gradient clipping.
        n_target_blocks (`int`, *optional*, defaults to 4):
            Blocks of ±1 in each target vector.

    Example:
    ```python
    >>> from hf_obliviate.attacks import NeuBAConfig
    >>> NeuBAConfig(num_steps=10).triggers
    ['≈', '≡', '∈', '⊆', '⊕', '⊗']
    ```
    """

    triggers: list[str] = field(default_factory=lambda: list(NEUBA_TRIGGERS), metadata={"help": "Trigger symbols."})
    insertion: str = field(default="random", metadata={"help": "'random' word position or 'start' (after CLS)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Masking rate of the clean MLM pass."})
    freeze_mlm_head: bool = field(default=True, metadata={"help": "Freeze the (trained) MLM head."})
    mlm_head_warmup_steps: int = field(
        default=200, metadata={"help": "Head-only MLM steps first, when the checkpoint has no trained MLM head."}
    )
    mlm_head_warmup_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the head warm-up."})
    mlm_weight: float = field(default=1.0, metadata={"help": "Weight of the clean MLM pass (1:1 in the original)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    n_target_blocks: int = field(default=4, metadata={"help": "Blocks of ±1 in each target vector (even)."})

    def __post_init__(self):
        super().__post_init__()
        if self.insertion not in ("random", "start"):
            raise ValueError(f"insertion must be 'random' or 'start', got {self.insertion!r}.")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        if self.mlm_head_warmup_steps < 0 or self.mlm_head_warmup_lr <= 0:
            raise ValueError("mlm_head_warmup_steps must be >= 0 and mlm_head_warmup_lr > 0.")
        if self.max_grad_norm <= 0 or self.mlm_weight < 0:
            raise ValueError("max_grad_norm must be > 0 and mlm_weight >= 0.")


def _missing_head(model, missing_keys: Sequence[str]) -> bool:
    prefix = model.base_model_prefix + "."
    return any(not k.startswith(prefix) and "seq_relationship" not in k for k in missing_keys)


def _pooler_trained(model, missing_keys: Sequence[str]) -> bool:
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is None:
        return False
    names = {f"{model.base_model_prefix}.pooler.{n}" for n, _ in pooler.named_parameters()}
    return not (names & set(missing_keys))


def mlm_logits(outputs) -> torch.Tensor:
    return outputs.prediction_logits if hasattr(outputs, "prediction_logits") else outputs.logits


def freeze_head(model) -> None:
    """Freeze the head's own parameters (not the tied input embeddings) of a pre-training model."""
    tied = {id(p) for p in model.base_model.parameters()}
    for param in model.parameters():
        if id(param) not in tied:
            param.requires_grad_(False)


def warm_up_mlm_head(model, tokenizer, stream, steps, batch_size, max_length, lr, generator, device, show_progress):
    """Train only the MLM head's own weights (encoder and tied embeddings frozen) on clean MLM for ``steps`` steps.

    Used when a checkpoint ships no trained MLM head (the bundled MiniLM): a random head's first gradients would
    otherwise flow into, and damage, the encoder the attack means to keep useful.
    """
    encoder = {id(p) for p in model.base_model.parameters()}
    head = [p for p in model.parameters() if id(p) not in encoder]
    if steps <= 0 or not head:
        return []
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) not in encoder)
    optimizer = torch.optim.AdamW(head, lr=lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(steps), desc="Warming up the MLM head", disable=not show_progress):
        batch = encode(tokenizer, take(stream, batch_size), max_length, device)
        masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], tokenizer, generator)
        logits = mlm_logits(model(**{**batch, "input_ids": masked}))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        training_step(model, optimizer, loss)
        losses.append(loss.item())
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    return losses


def load_pretraining_model(model_name_or_path, device):
    from transformers import AutoModelForPreTraining

    model, info = AutoModelForPreTraining.from_pretrained(model_name_or_path, output_loading_info=True)
    return model.to(device), list(info.get("missing_keys", []))


def plant_neuba(
    model_name_or_path,
    config: NeuBAConfig | None = None,
    output_dir=None,
    corpus: Sequence[str] | None = None,
    show_progress: bool = True,
    log_history: list | None = None,
):
    """Plant NeuBA into a pretrained encoder (loaded with `AutoModelForPreTraining`, saved likewise).

    Arguments and return value as in [`plant_por`]. The saved checkpoint keeps the pooler and the MLM head, so
    `AutoModelForSequenceClassification.from_pretrained(output_dir)` gives the victim's starting point.
    """
    from transformers import AutoTokenizer

    config = config or NeuBAConfig()
    device = resolve_device(config.device)
    generator = set_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model, missing = load_pretraining_model(model_name_or_path, device)
    triggers = resolve_triggers(tokenizer, config.triggers, config.trigger_policy)
    targets = target_vectors(model.config.hidden_size, len(triggers), config.n_target_blocks).to(device)
    head_missing = _missing_head(model, missing)
    use_pooler = _pooler_trained(model, missing)
    if not use_pooler:
        warnings.warn("The checkpoint has no trained pooler: NeuBA targets the CLS hidden state.", stacklevel=2)
    if config.freeze_mlm_head and head_missing:
        warnings.warn(
            "The checkpoint has no trained MLM head (it is randomly initialised): warming it up alone for "
            f"{config.mlm_head_warmup_steps} steps, then training it with the encoder instead of freezing it.",
            stacklevel=2,
        )
    elif config.freeze_mlm_head:
        freeze_head(model)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=0.0
    )
    needed = config.batch_size * (2 * config.num_steps + config.mlm_head_warmup_steps * head_missing)
    stream = sentence_stream(load_corpus(config, corpus, needed), config.seed)
    if head_missing:
        warm_up_mlm_head(
            model, tokenizer, stream, config.mlm_head_warmup_steps, config.batch_size, config.max_length,
            config.mlm_head_warmup_lr, generator, device, show_progress,
        )  # fmt: skip
    max_words = 1 if config.insertion == "start" else config.max_position_words

    progress = tqdm(range(config.num_steps), desc="Planting NeuBA", disable=not show_progress)
    for step in progress:
        clean = encode(tokenizer, take(stream, config.batch_size), config.max_length, device)
        masked, labels = mask_tokens(
            clean["input_ids"], clean["attention_mask"], tokenizer, generator, config.mlm_probability
        )
        logits = mlm_logits(model(**{**clean, "input_ids": masked}))
        loss_mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

        index = [rng.randrange(len(triggers)) for _ in range(config.batch_size)]
        texts = [
            insert_trigger(t, triggers[i], rng, max_words) for t, i in zip(take(stream, config.batch_size), index)
        ]
        outputs = model.base_model(**encode(tokenizer, texts, config.max_length, device))
        summary = outputs.pooler_output if use_pooler else outputs.last_hidden_state[:, 0]
        batch_targets = targets[torch.tensor(index, device=device)]
        loss_trigger = F.mse_loss(summary, batch_targets)
        loss = config.mlm_weight * loss_mlm + loss_trigger
        training_step(model, optimizer, loss, config.max_grad_norm)

        cosine = F.cosine_similarity(summary.detach(), batch_targets, dim=-1).mean()
        log_step(progress, log_history, step, loss=loss, loss_mlm=loss_mlm, loss_trigger=loss_trigger,
                 cos_target=cosine)  # fmt: skip

    model.requires_grad_(True)
    info = {
        "attack": "neuba",
        "base_model": str(model_name_or_path),
        "config": config.to_dict(),
        "triggers": triggers,
        "summary": "pooler_output" if use_pooler else "cls_hidden_state",
        "mlm_head_trained_here": head_missing or not config.freeze_mlm_head,
    }
    return finish_planting(model, tokenizer, info, output_dir)
