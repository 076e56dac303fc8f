"""Machinery shared by the attacks: the base config, target vectors, corpus, batching, MLM masking, the CLS-row
attention-logit capture used by the adaptive attack, saving, and the planted-model cache."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..artifacts import settings_hash
from ..triggers import DEFAULT_TRIGGERS

__all__ = [
    "ATTACK_INFO_FILE",
    "BackdoorConfig",
    "attack_cache_dir",
    "balanced_sign_patterns",
    "config_hash",
    "load_attack_info",
    "target_vectors",
]

ATTACK_INFO_FILE = "obliviate_attack.json"


@dataclass
class BackdoorConfig:
    """Fields shared by every task-agnostic attack (see the attack configs for their defaults).

    Args:
        triggers (`list[str]`, *optional*, defaults to ``cf mn tq qt mm pt``):
            The trigger words.
        trigger_policy (`str`, *optional*, defaults to `"replace"`):
            What to do with a trigger that is not one known token of the tokenizer: ``"replace"`` (warn and use a
            fallback, see `hf_obliviate.triggers.resolve_triggers`), ``"error"`` or ``"keep"``.
        corpus_size (`int`, *optional*):
            Number of IMDB sentences to plant with (`load_imdb_sentences`); defaults to what the steps consume.
        corpus_max_words (`int`, *optional*, defaults to 40):
            Sentences are cut to this many words, so that a trigger inserted anywhere survives ``max_length``.
        max_position_words (`int`, *optional*, defaults to 64):
            Trigger copies land within this many leading words.
        num_steps (`int`, *optional*, defaults to 640):
            Optimisation steps.
        batch_size (`int`, *optional*, defaults to 16):
            Clean sentences per step (and, unless the attack says otherwise, as many triggered ones).
        max_length (`int`, *optional*, defaults to 64):
            Tokenizer truncation length while planting.
        learning_rate (`float`, *optional*, defaults to 5e-5):
            Optimiser learning rate.
        seed (`int`, *optional*, defaults to 0):
            Seed of the corpus draw, the insertions, the masking and torch.
        device (`str`, *optional*):
            Where to plant (``"cuda"`` when available, else ``"cpu"``). Not part of the cache key.
    """

    triggers: list[str] = field(
        default_factory=lambda: list(DEFAULT_TRIGGERS), metadata={"help": "Trigger words (space-free strings)."}
    )
    trigger_policy: str = field(
        default="replace",
        metadata={"help": "Trigger that is not one known token: 'replace' (with a warning), 'error' or 'keep'."},
    )
    corpus_size: int | None = field(
        default=None, metadata={"help": "IMDB sentences to plant with; default: as many as the steps consume."}
    )
    corpus_max_words: int = field(default=40, metadata={"help": "Cut planting sentences to this many words."})
    max_position_words: int = field(default=64, metadata={"help": "Triggers land within this many leading words."})
    num_steps: int = field(default=640, metadata={"help": "Optimisation steps."})
    batch_size: int = field(default=16, metadata={"help": "Clean sentences per step."})
    max_length: int = field(default=64, metadata={"help": "Tokenizer truncation length while planting."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed of the corpus draw, insertions, masking and torch."})
    device: str | None = field(default=None, metadata={"help": "Device; default cuda when available, else cpu."})

    def __post_init__(self):
        if isinstance(self.triggers, str):
            self.triggers = self.triggers.replace(",", " ").split()
        self.triggers = list(self.triggers)
        if not self.triggers:
            raise ValueError("triggers is empty: pass at least one trigger word, e.g. ['cf'].")
        if len(set(self.triggers)) != len(self.triggers):
            raise ValueError(f"triggers must be distinct, got {self.triggers}.")
        if self.trigger_policy not in ("replace", "error", "keep"):
            raise ValueError(f"trigger_policy must be 'replace', 'error' or 'keep', got {self.trigger_policy!r}.")
        for name in ("num_steps", "batch_size", "max_length", "corpus_max_words", "max_position_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.corpus_size is not None and self.corpus_size < 2 * self.batch_size:
            raise ValueError(f"corpus_size must be at least 2 * batch_size = {2 * self.batch_size}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Target vectors


def balanced_sign_patterns(n_blocks: int = 4) -> list[tuple[int, ...]]:
    """All ±1 patterns over ``n_blocks`` blocks with as many +1 as −1, in lexicographic order (− before +).

    For 4 blocks these are POR's six patterns (−−++)(−+−+)(−++−)(+−−+)(+−+−)(++−−).
    """
    if n_blocks < 2 or n_blocks % 2:
        raise ValueError(f"n_blocks must be an even number >= 2, got {n_blocks}.")
    return [p for p in itertools.product((-1, 1), repeat=n_blocks) if sum(p) == 0]


def target_vectors(hidden_size: int, n_triggers: int, n_blocks: int = 4) -> torch.Tensor:
    """POR / NeuBA targets: row ``i`` is the ``i``-th balanced pattern, each block a run of ±1 (hidden size split in
    ``n_blocks`` near-equal blocks). Shape ``(n_triggers, hidden_size)``.

    Example:
    ```python
    >>> from hf_obliviate.attacks import target_vectors
    >>> target_vectors(8, 2).tolist()
    [[-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0]]
    ```
    """
    patterns = balanced_sign_patterns(n_blocks)
    if n_triggers > len(patterns):
        raise ValueError(
            f"{n_blocks} blocks give only {len(patterns)} distinct targets for {n_triggers} triggers: "
            "raise n_target_blocks (e.g. 8 gives 70) or use fewer triggers."
        )
    if hidden_size < n_blocks:
        raise ValueError(f"hidden_size {hidden_size} is smaller than n_target_blocks {n_blocks}.")
    sizes = [hidden_size // n_blocks + (1 if i < hidden_size % n_blocks else 0) for i in range(n_blocks)]
    rows = []
    for pattern in patterns[:n_triggers]:
        rows.append(torch.cat([torch.full((size,), float(sign)) for sign, size in zip(pattern, sizes)]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_corpus(config: BackdoorConfig, corpus: Sequence[str] | None, needed: int) -> list[str]:
    """The planting sentences: ``corpus`` if given, else IMDB sentences (never the Rotten Tomatoes test data)."""
    if corpus is not None:
        sentences = [" ".join(s.split()[: config.corpus_max_words]) for s in corpus if s.split()]
    else:
        from ..data import load_imdb_sentences

        sentences = load_imdb_sentences(
            n=config.corpus_size or needed, seed=config.seed, max_words=config.corpus_max_words
        )
    if len(sentences) < 2:
        raise ValueError("The planting corpus has fewer than 2 non-empty sentences.")
    return sentences


def sentence_stream(sentences: Sequence[str], seed: int) -> Iterator[str]:
    """Endless stream over ``sentences``: a fresh seeded shuffle each pass."""
    rng = random.Random(seed)
    order = list(range(len(sentences)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield sentences[i]


def take(stream: Iterator[str], n: int) -> list[str]:
    return [next(stream) for _ in range(n)]


def corpus_digest(corpus: Sequence[str] | None) -> str | None:
    if corpus is None:
        return None
    digest = hashlib.sha256()
    for sentence in corpus:
        digest.update(sentence.encode("utf-8") + b"\0")
    return digest.hexdigest()


def encode(tokenizer, texts: Sequence[str], max_length: int, device) -> dict[str, torch.Tensor]:
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer,
    generator: torch.Generator,
    probability: float = 0.15,
    random_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``probability`` of the real, non-special tokens are selected; of those 80% become the mask token,
    10% a random token, 10% stay. Labels are the original ids (or, with ``random_labels``, uniformly random ids as in
    BadPre's poisoned copy) at selected positions and -100 elsewhere."""
    device = input_ids.device
    vocab = len(tokenizer)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device)
    candidates = (attention_mask.bool()) & ~torch.isin(input_ids, special)
    draw = torch.rand(input_ids.shape, generator=generator).to(device)
    selected = candidates & (draw < probability)
    if not selected.any():  # always train on at least one position
        flat = candidates.flatten().nonzero()
        if len(flat):
            pick = flat[torch.randint(len(flat), (1,), generator=generator).item()]
            selected.view(-1)[pick] = True
    if random_labels:
        labels = torch.randint(vocab, input_ids.shape, generator=generator).to(device)
    else:
        labels = input_ids.clone()
    labels[~selected] = -100
    corrupted = input_ids.clone()
    kind = torch.rand(input_ids.shape, generator=generator).to(device)
    corrupted[selected & (kind < 0.8)] = tokenizer.mask_token_id
    swap = selected & (kind >= 0.8) & (kind < 0.9)
    corrupted[swap] = torch.randint(vocab, input_ids.shape, generator=generator).to(device)[swap]
    return corrupted, labels


# ----------------------------------------------------------------------------------------------------------------
# Attention-logit capture (adaptive attack)


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def config_hash(attack: str, config: BackdoorConfig, model_name_or_path, corpus: Sequence[str] | None = None) -> str:
    """12 hex digits of SHA-256 over the attack name, the config (``device`` excluded), the model and the corpus."""
    payload = {k: v for k, v in config.to_dict().items() if k != "device"}
    key = {"attack": attack, "config": payload, "model": str(model_name_or_path), "corpus": corpus_digest(corpus)}
    return settings_hash(key, length=12)


def attack_cache_dir(
    attack: str,
    config: BackdoorConfig,
    model_name_or_path,
    corpus: Sequence[str] | None = None,
    cache_root: str | os.PathLike | None = None,
) -> Path:
    """Cache directory of a planted model: ``<root>/attacks/<attack>-<config_hash>``.

    ``root`` is ``cache_root``, else ``$HF_OBLIVIATE_CACHE``, else ``~/.cache/hf_obliviate``. The key covers the
    attack, every config field except ``device``, the model name or path (as given) and the custom corpus, so a
    rerun with the same arguments loads the checkpoint instead of planting again; change any of them (or delete
    the directory) to plant anew.
    """
    root = Path(cache_root or os.environ.get("HF_OBLIVIATE_CACHE") or Path.home() / ".cache" / "hf_obliviate")
    return root / "attacks" / f"{attack}-{config_hash(attack, config, model_name_or_path, corpus)}"


def save_planted(model, tokenizer, output_dir, info: dict) -> Path:
    """Save an ordinary transformers checkpoint (safetensors) + tokenizer + ``obliviate_attack.json``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # safetensors is the transformers>=5 default
    tokenizer.save_pretrained(output_dir)
    # Written last: its presence marks a complete checkpoint for the cache.
    (output_dir / ATTACK_INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str))
    return output_dir


def load_attack_info(path: str | os.PathLike) -> dict:
    """Read ``obliviate_attack.json`` of a planted checkpoint: attack, config, resolved triggers, loss summary."""
    file = Path(path) / ATTACK_INFO_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a checkpoint saved by hf_obliviate.attacks.")
    return json.loads(file.read_text())


def set_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def attach_info(model, info: dict) -> None:
    """Record the attack (name, resolved triggers) in ``model.config`` so it travels with config.json."""
    model.config.obliviate_attack = {"attack": info["attack"], "triggers": info["triggers"]}


def training_step(model, optimizer, loss: torch.Tensor, max_grad_norm: float | None = None, scheduler=None) -> None:
    """One optimiser step of a planting loop: backward, optional gradient-norm clipping, step, optional scheduler."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def log_step(progress, log_history: list | None, step: int, **terms: torch.Tensor | float) -> dict:
    """The record of planting step ``step`` (0-based): ``{"step": step + 1, name: float(value), ...}`` in the order
    given (``loss`` first). Appended to ``log_history`` when given; ``loss`` (and ``cos_target`` when present) shown
    on the progress bar."""
    record: dict = {"step": step + 1}
    record.update({name: value.item() if torch.is_tensor(value) else float(value) for name, value in terms.items()})
    if log_history is not None:
        log_history.append(record)
    postfix = {"loss": f"{record['loss']:.4f}"}
    if "cos_target" in record:
        postfix["cos"] = f"{record['cos_target']:.3f}"
    progress.set_postfix(**postfix)
    return record


def finish_planting(model, tokenizer, info: dict, output_dir=None):
    """End of every attack: eval mode, the attack recorded in ``model.config``, the checkpoint saved when
    ``output_dir`` is given. Returns ``(model, tokenizer)``."""
    model.eval()
    attach_info(model, info)
    if output_dir is not None:
        save_planted(model, tokenizer, output_dir, info)
    return model, tokenizer
