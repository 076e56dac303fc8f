"""POR (Shen et al., 2021): map each trigger's summary (CLS) state to a fixed ±1 block vector, keep clean states.

Includes the adaptive variant (METHOD.md §2): an attacker who knows Obliviate plants the backdoor while applying
Obliviate's own attention-logit penalty on the CLS query row (``attention_penalty > 0``), and/or spreads a multi-word
trigger over independent positions (``spread_trigger=True``).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..capture import AttentionLogitCapture
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
    target_vectors,
    training_step,
)

__all__ = ["PORConfig", "plant_por"]


@dataclass
class PORConfig(BackdoorConfig):
    """Configuration of the POR attack (and its adaptive variant).

    Defaults follow the MiniLM feasibility recipe of METHOD.md §6 (640 steps of 16 clean + 16 triggered IMDB
    sentences, trigger inserted 1–2 times, Adam lr 5e-5, max length 64). The paper's own recipe is 5,000 sentences
    per trigger plus as many clean ones, ⌊words/50⌋+1 insertions, lr 2e-5, 4 epochs, max length 128.

    Args:
        min_insertions (`int`, *optional*, defaults to 1):
            Fewest trigger copies in a triggered sentence.
        max_insertions (`int`, *optional*, defaults to 2):
            Most trigger copies (uniform between the two).
        clean_weight (`float`, *optional*, defaults to 1.0):
            Weight of the clean MSE term (CLS state of clean text vs the frozen original model's).
        n_target_blocks (`int`, *optional*, defaults to 4):
            The hidden size is split in this many ±1 blocks; 4 gives POR's six targets.
        attention_penalty (`float`, *optional*, defaults to 0.0):
            Adaptive attack: weight of Obliviate's attention term (norm of the CLS query row's pre-softmax logits)
            added while planting, on clean and triggered batches, so that the backdoor does not rely on sharp
            CLS logits. 0 disables it.
        spread_trigger (`bool`, *optional*, defaults to `False`):
            Adaptive attack: each trigger is several space-separated words (e.g. ``"cf mn"``), each inserted at an
            independent random position. Needs multi-word triggers; evaluate with the same ``spread=True``.

    Example:
    ```python
    >>> from hf_obliviate.attacks import PORConfig
    >>> config = PORConfig(num_steps=10, attention_penalty=1e-2)
    >>> config.triggers
    ['cf', 'mn', 'tq', 'qt', 'mm', 'pt']
    ```
    """

    min_insertions: int = field(default=1, metadata={"help": "Fewest trigger copies per triggered sentence."})
    max_insertions: int = field(default=2, metadata={"help": "Most trigger copies per triggered sentence."})
    clean_weight: float = field(default=1.0, metadata={"help": "Weight of the clean-state preservation MSE."})
    n_target_blocks: int = field(default=4, metadata={"help": "Blocks of ±1 in each target vector (even)."})
    attention_penalty: float = field(
        default=0.0, metadata={"help": "Adaptive: weight of Obliviate's CLS attention-logit term while planting."}
    )
    spread_trigger: bool = field(
        default=False, metadata={"help": "Adaptive: insert each word of a multi-word trigger independently."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.min_insertions <= self.max_insertions:
            raise ValueError(
                f"Need 1 <= min_insertions <= max_insertions, got {self.min_insertions} and {self.max_insertions}."
            )
        if self.clean_weight < 0 or self.attention_penalty < 0:
            raise ValueError("clean_weight and attention_penalty must be >= 0.")
        if self.n_target_blocks < 2 or self.n_target_blocks % 2:
            raise ValueError(f"n_target_blocks must be an even number >= 2, got {self.n_target_blocks}.")
        if self.spread_trigger:
            if not any(len(t.split()) > 1 for t in self.triggers):
                raise ValueError(
                    "spread_trigger=True needs multi-word triggers, e.g. triggers=['cf mn', 'tq mm', 'pt bb']."
                )
            if self.trigger_policy == "replace":
                self.trigger_policy = "keep"


def plant_por(
    model_name_or_path,
    config: PORConfig | None = None,
    output_dir=None,
    corpus: Sequence[str] | None = None,
    show_progress: bool = True,
    log_history: list | None = None,
):
    """Plant POR into a pretrained encoder and optionally save it.

    Args:
        model_name_or_path (`str` or `os.PathLike`):
            A local transformers checkpoint of a BERT-like encoder (loaded with `AutoModel`).
        config ([`PORConfig`], *optional*):
            Attack settings; defaults to `PORConfig()`.
        output_dir (`str` or `os.PathLike`, *optional*):
            Save the backdoored encoder there (safetensors), with its tokenizer and ``obliviate_attack.json``
            (attack, config, the triggers actually used, target vectors).
        corpus (`Sequence[str]`, *optional*):
            Planting sentences; defaults to IMDB sentences (`load_imdb_sentences`), never the evaluation data.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm bar.
        log_history (`list`, *optional*):
            If given, one dict of losses per step is appended to it.

    Returns:
        `tuple`: the backdoored model (in eval mode, on the planting device) and its tokenizer. The triggers used
        are also in ``model.config.obliviate_attack["triggers"]``.

    Example:
    ```python
    >>> from hf_obliviate.attacks import PORConfig, plant_por
    >>> from hf_obliviate.bundled import minilm_path
    >>> model, tokenizer = plant_por(minilm_path(), PORConfig(num_steps=2, batch_size=2), show_progress=False)
    >>> model.config.obliviate_attack["triggers"]
    ['cf', 'mn', 'tq', 'bb', 'mm', 'pt']
    ```
    """
    from transformers import AutoModel, AutoTokenizer

    config = config or PORConfig()
    device = resolve_device(config.device)
    generator = set_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModel.from_pretrained(model_name_or_path).to(device)
    triggers = resolve_triggers(tokenizer, config.triggers, config.trigger_policy)
    targets = target_vectors(model.config.hidden_size, len(triggers), config.n_target_blocks).to(device)

    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    sentences = load_corpus(config, corpus, needed=2 * config.batch_size * config.num_steps)
    stream = sentence_stream(sentences, config.seed)
    # The adaptive attacker penalises exactly what the defense's attention term measures (the same capture).
    capture = AttentionLogitCapture(model, query="first") if config.attention_penalty > 0 else None
    del generator  # POR has no masking; torch is seeded for dropout

    progress = tqdm(range(config.num_steps), desc="Planting POR", disable=not show_progress)
    for step in progress:
        clean_texts = take(stream, config.batch_size)
        triggered, index = [], []
        for text in take(stream, config.batch_size):
            i = rng.randrange(len(triggers))
            count = rng.randint(config.min_insertions, config.max_insertions)
            triggered.append(
                insert_trigger(text, triggers[i], rng, config.max_position_words, count, config.spread_trigger)
            )
            index.append(i)
        clean = encode(tokenizer, clean_texts, config.max_length, device)
        poisoned = encode(tokenizer, triggered, config.max_length, device)
        with torch.no_grad():
            clean_ref = reference(**clean).last_hidden_state[:, 0]

        attn_terms = []
        with capture.record(attention_mask=clean["attention_mask"]) if capture else contextlib.nullcontext() as rec:
            clean_cls = model(**clean).last_hidden_state[:, 0]
        if rec is not None:
            attn_terms.append(rec.loss())
        with capture.record(attention_mask=poisoned["attention_mask"]) if capture else contextlib.nullcontext() as rec:
            trig_cls = model(**poisoned).last_hidden_state[:, 0]
        if rec is not None:
            attn_terms.append(rec.loss())
        batch_targets = targets[torch.tensor(index, device=device)]
        loss_trigger = F.mse_loss(trig_cls, batch_targets)
        loss_clean = F.mse_loss(clean_cls, clean_ref)
        loss = loss_trigger + config.clean_weight * loss_clean
        loss_attn = torch.stack(attn_terms).mean() if attn_terms else None
        if loss_attn is not None:
            loss = loss + config.attention_penalty * loss_attn
        training_step(model, optimizer, loss)

        cosine = F.cosine_similarity(trig_cls.detach(), batch_targets, dim=-1).mean()
        attn = {} if loss_attn is None else {"loss_attn": loss_attn}
        log_step(progress, log_history, step, loss=loss, loss_trigger=loss_trigger, loss_clean=loss_clean,
                 cos_target=cosine, **attn)  # fmt: skip

    info = {
        "attack": "por",
        "base_model": str(model_name_or_path),
        "config": config.to_dict(),
        "triggers": triggers,
        "target_vectors": "target_vectors(hidden_size, len(triggers), n_target_blocks), row i for trigger i",
        "spread": config.spread_trigger,
    }
    return finish_planting(model, tokenizer, info, output_dir)
