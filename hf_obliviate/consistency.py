"""The trigger-agnostic consistency term (the named variants ``consistency``, ``scan-consistency`` and
``scan-relative`` of ``benchmarks/defense.py``).

Task-agnostic backdoors are keyed on rare tokens inserted into ordinary text. Without knowing any trigger, the
defense can teach the fine-tuned model to ignore the *shape* of one: each training batch gets a copy with 1 to
``max_insertions`` short rare words inserted at random positions, and the model's prediction on the copy is pulled
towards its (detached) prediction on the clean batch, ``KL(p(x) ‖ p(x'))``. Plain torch; the trainers and
:class:`hf_obliviate.ObliviateDefense` use it when ``lambda_consistency > 0``.

Random rare words rarely *are* a trigger, so the copy seldom fires the backdoor and the term has little to teach
(on the benchmark's validation split it did no better than the `centred` attention term alone).
:func:`scan_trigger_tokens` finds the words that do: it inserts every word-initial token of the vocabulary into a
few short neutral sentences and ranks them by how far they move the model's summary ([CLS]) output. A task-agnostic
backdoor maps its triggers to a fixed output whatever the sentence, so they rank first: on the bundled MiniLM-L6
the six POR triggers ranked 1st to 7th and five of NeuBA's six symbols 1st to 14th of 23,695 candidates, without
being told any trigger. With ``consistency_tokens="scan"`` the copy inserts the top-ranked tokens, and
``consistency_target="hidden"`` pulls the copy's final [CLS] hidden state towards the clean one (the backdoor's own
lever) instead of its prediction, and ``consistency_target="relative"`` measures that pull against how far the clean
[CLS] states spread over the batch (:func:`relative_consistency_loss`), so that it cannot be met by making every
sentence's state the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .probing import is_word_start, summary_state

__all__ = [
    "SCAN_SENTENCES",
    "consistency_loss",
    "hidden_consistency_loss",
    "insert_random_tokens",
    "rank_weights",
    "rare_token_pool",
    "relative_consistency_loss",
    "scan_trigger_tokens",
    "squared_distance",
    "state_spread",
]

# Per-token inputs the insertion knows how to extend: the value of the inserted position.
_PER_TOKEN = {"input_ids": None, "attention_mask": 1, "token_type_ids": "neighbour"}


def rare_token_pool(tokenizer, exclude: Sequence[str] = (), min_id: int = 5000) -> list[int]:
    """Token ids of short rare words: a word-initial token of 2 to 4 lower-case ASCII letters with id >= ``min_id``
    (ids grow roughly with rarity), minus the tokens of ``exclude``.

    Word-initial means a leading-space token for byte-level BPE and SentencePiece vocabularies (``" cf"``), and a
    token without the ``##`` continuation mark for WordPiece ones (BERT, MiniLM). The pool assumes only the *shape*
    of rare-word triggers, not the triggers: pass the suspected triggers in ``exclude`` to measure that the learned
    insensitivity generalises to tokens never inserted.

    Example:
    ```python
    >>> from transformers import AutoTokenizer
    >>> from hf_obliviate.bundled import minilm_path
    >>> from hf_obliviate.consistency import rare_token_pool
    >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    >>> "cf" in tokenizer.convert_ids_to_tokens(rare_token_pool(tokenizer, exclude=["cf"]))
    False

    ```
    """
    banned: set[int] = set()
    for word in exclude:
        for variant in (word, " " + word):
            banned.update(tokenizer(variant, add_special_tokens=False)["input_ids"])
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers name their model
    if backend is not None:
        wordpiece = type(backend.model).__name__ == "WordPiece"
    else:
        wordpiece = hasattr(tokenizer, "wordpiece_tokenizer")
    shape = re.compile(r"[a-z]{2,4}" if wordpiece else r" [a-z]{2,4}")
    pool = []
    for token, idx in vocab.items():
        if idx < min_id or idx in banned or (wordpiece and token.startswith("##")):
            continue
        if shape.fullmatch(tokenizer.decode([idx])):
            pool.append(idx)
    return sorted(pool)


def rank_weights(size: int) -> torch.Tensor:
    """Sampling weights ``1 / k`` for the ``k``-th of ``size`` ranked tokens (``consistency_sampling="rank"``).

    Example:
    ```python
    >>> from hf_obliviate.consistency import rank_weights
    >>> rank_weights(4).tolist()
    [1.0, 0.5, 0.3333333432674408, 0.25]

    ```
    """
    if size < 1:
        raise ValueError(f"rank_weights needs at least one token, got {size}.")
    return 1.0 / torch.arange(1, size + 1, dtype=torch.float32)


def insert_random_tokens(
    inputs: Mapping[str, Any],
    pool: torch.Tensor | Sequence[int],
    max_insertions: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A copy of a padded batch with 1 to ``max_insertions`` tokens of ``pool`` inserted into every row.

    Each token is drawn from ``pool`` uniformly, or with probability proportional to ``weights`` (one non-negative
    weight per pool entry, e.g. :func:`rank_weights`).

    Insertions land strictly between a row's first and last real token (after ``[CLS]`` and before ``[SEP]`` for an
    encoder; never before the first token), uniformly; the batch is re-padded on its own padding side and grows by
    at most ``max_insertions`` columns. Only ``input_ids``, ``attention_mask`` and ``token_type_ids`` are kept (an
    inserted token takes its left neighbour's segment); ``labels`` is dropped, since the copy only serves a
    consistency target.

    Raises:
        ValueError: when ``input_ids`` is missing, or another per-token tensor (e.g. ``position_ids``) is present that
            an insertion would have to extend.
    """
    if "input_ids" not in inputs:
        raise ValueError("The consistency term inserts tokens into `input_ids`, but the batch has none.")
    ids = inputs["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(ids.shape)}.")
    batch, seq = ids.shape
    unknown = [
        k
        for k, v in inputs.items()
        if k not in _PER_TOKEN and k != "labels" and torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == ids.shape
    ]
    if unknown:
        raise ValueError(
            f"The consistency term cannot insert tokens into per-token input(s) {unknown}: drop them from the batch "
            "(e.g. let the model compute position_ids) or set lambda_consistency=0."
        )
    if max_insertions < 1:
        raise ValueError(f"max_insertions must be >= 1, got {max_insertions}.")
    pool = torch.as_tensor(pool, dtype=torch.long)
    if pool.numel() == 0:
        raise ValueError("The consistency term needs a non-empty pool of token ids to insert.")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != pool.shape or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(
                f"weights must hold one finite non-negative weight per pool token ({pool.numel()}), got shape "
                f"{tuple(weights.shape)}."
            )
        if not float(weights.sum()) > 0:
            raise ValueError("weights sum to 0: at least one pool token needs a positive weight.")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    left = bool((mask[:, 0] == 0).any()) and not bool((mask[:, -1] == 0).any())
    pad_id = int(ids[mask == 0][0]) if bool((mask == 0).any()) else 0
    types = inputs.get("token_type_ids")
    rows: list[tuple[list[int], list[int]]] = []
    cpu_ids, cpu_mask = ids.cpu(), mask.cpu()
    cpu_types = types.cpu() if types is not None else torch.zeros_like(cpu_ids)
    for b in range(batch):
        real = cpu_mask[b].nonzero().flatten()
        row, row_types = cpu_ids[b, real].tolist(), cpu_types[b, real].tolist()
        n = int(torch.randint(1, max_insertions + 1, (), generator=generator))
        if weights is None:
            drawn = torch.randint(0, pool.numel(), (n,), generator=generator)
        else:
            drawn = torch.multinomial(weights, n, replacement=True, generator=generator)
        tokens = pool[drawn].tolist()
        for token in tokens:
            # between the first and the last real token; a one-token row gets it after that token
            spot = int(torch.randint(1, max(len(row), 2), (), generator=generator)) if len(row) > 1 else len(row)
            row.insert(spot, token)
            row_types.insert(spot, row_types[spot - 1] if spot > 0 else 0)
        rows.append((row, row_types))
    width = max(len(r) for r, _ in rows)
    out_ids = torch.full((batch, width), pad_id, dtype=ids.dtype)
    out_mask = torch.zeros((batch, width), dtype=mask.dtype)
    out_types = torch.zeros((batch, width), dtype=cpu_types.dtype)
    for b, (row, row_types) in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out_ids[b, span] = torch.tensor(row, dtype=ids.dtype)
        out_mask[b, span] = 1
        out_types[b, span] = torch.tensor(row_types, dtype=cpu_types.dtype)
    out = {"input_ids": out_ids.to(ids.device), "attention_mask": out_mask.to(ids.device)}
    if types is not None:
        out["token_type_ids"] = out_types.to(types.device)
    return out


def consistency_loss(clean_logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(clean) ‖ softmax(perturbed))`` averaged over the batch, the clean side detached (a target).

    Both are ``(batch, num_labels)`` sequence-classification logits.

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.consistency import consistency_loss
    >>> logits = torch.tensor([[2.0, -1.0]])
    >>> float(consistency_loss(logits, logits))
    0.0

    ```
    """
    if clean_logits.dim() != 2 or clean_logits.shape != perturbed_logits.shape:
        raise ValueError(
            "The consistency term compares (batch, num_labels) sequence-classification logits; got "
            f"{tuple(clean_logits.shape)} and {tuple(perturbed_logits.shape)}. Set lambda_consistency=0 for other "
            "heads."
        )
    target = F.log_softmax(clean_logits.detach().float(), dim=-1)
    return F.kl_div(F.log_softmax(perturbed_logits.float(), dim=-1), target, log_target=True, reduction="batchmean")


def _check_states(term: str, clean_hidden: torch.Tensor, perturbed_hidden: torch.Tensor) -> None:
    if clean_hidden.dim() != 2 or clean_hidden.shape != perturbed_hidden.shape:
        raise ValueError(
            f"The {term} consistency term compares (batch, hidden) summary states; got "
            f"{tuple(clean_hidden.shape)} and {tuple(perturbed_hidden.shape)}."
        )


def hidden_consistency_loss(clean_hidden: torch.Tensor, perturbed_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between two ``(batch, hidden)`` summary states, the clean side detached (a target).

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.consistency import hidden_consistency_loss
    >>> float(hidden_consistency_loss(torch.zeros(2, 4), torch.ones(2, 4)))
    1.0

    ```
    """
    _check_states("hidden", clean_hidden, perturbed_hidden)
    return F.mse_loss(perturbed_hidden.float(), clean_hidden.detach().float())


def squared_distance(clean_hidden: torch.Tensor, perturbed_hidden: torch.Tensor) -> torch.Tensor:
    """The squared distance of each copy's ``(batch, hidden)`` summary state to its clean one, the clean side detached
    (a target), summed over features and averaged over the batch, in float32.

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.consistency import squared_distance
    >>> float(squared_distance(torch.zeros(2, 4), torch.ones(2, 4)))
    4.0

    ```
    """
    return ((perturbed_hidden.float() - clean_hidden.detach().float()) ** 2).sum(-1).mean()


def state_spread(states: torch.Tensor) -> torch.Tensor:
    """The spread of ``(batch, hidden)`` summary states: their mean squared distance to their mean (summed over
    features, averaged over the batch), with gradients.

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.consistency import state_spread
    >>> float(state_spread(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])))
    1.0

    ```
    """
    return ((states - states.mean(0)) ** 2).sum(-1).mean()


def relative_consistency_loss(clean_hidden: torch.Tensor, perturbed_hidden: torch.Tensor) -> torch.Tensor:
    """The squared distance of each copy's summary state to its clean one (the clean side detached, a target), summed
    over features and averaged over the batch, divided by the clean batch's *spread*: the mean squared distance of the
    clean states to their mean, **with** gradients.

    :func:`hidden_consistency_loss` can be met by making every sentence's state nearly the same (on the defense
    benchmark the defended adapters' [CLS] states spread 35-45 times less than undefended ones, at a cost in clean
    accuracy). Here a smaller spread raises the term, so that way out costs; a spread read without gradients (a
    per-step constant) would only rescale the term, and collapses as the squared distance does. Pass the clean states
    with their gradients. A batch of one row has no spread: the term is 0 there (a zero with gradients).

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.consistency import relative_consistency_loss
    >>> clean = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # spread 1
    >>> float(relative_consistency_loss(clean, clean + torch.tensor([0.0, 1.0])))
    1.0

    ```
    """
    _check_states("relative", clean_hidden, perturbed_hidden)
    clean = clean_hidden.float()
    distance = squared_distance(clean, perturbed_hidden)
    if clean.shape[0] < 2:
        return distance * 0.0
    spread = state_spread(clean)
    return distance / spread.clamp_min(torch.finfo(spread.dtype).tiny)


# Short neutral sentences for the scan: a trigger moves the summary output wherever it is inserted, so a few words
# of ordinary text suffice (and keep the scan of a 30k vocabulary to about a minute on 2 CPU cores for MiniLM-L6).
SCAN_SENTENCES = (
    "the film is a quiet story about a family and its long summer",
    "an uneven but often funny movie with a good cast",
)


def scan_trigger_tokens(
    model: nn.Module,
    tokenizer,
    top_k: int = 32,
    sentences: Sequence[str] = SCAN_SENTENCES,
    max_words: int = 4,
    batch_size: int = 1024,
    show_progress: bool = False,
) -> list[int]:
    """The ``top_k`` word-initial vocabulary tokens that move the model's summary output the most, most first.

    Each sentence is cut to its first ``max_words`` word pieces; every candidate token (all of the vocabulary but
    special tokens, unused slots and WordPiece ``##`` continuations, `hf_obliviate.probing.is_word_start`) is
    inserted in its middle, and the candidate's score is the
    mean cosine distance between the last layer's position-0 hidden state with and without it. Nothing about the
    triggers is assumed but that one token fires them (a multi-token or spread trigger can hide from the scan).

    Cost: ``len(sentences) × vocabulary`` forward passes of ``max_words + 3`` tokens, about a minute for MiniLM-L6
    on 2 CPU cores. The model runs in eval mode under ``torch.no_grad`` (its mode is restored).

    Example:
    ```python
    >>> from transformers import AutoModel, AutoTokenizer
    >>> from hf_obliviate.bundled import minilm_path
    >>> from hf_obliviate.consistency import scan_trigger_tokens
    >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    >>> ids = scan_trigger_tokens(AutoModel.from_pretrained(minilm_path()), tokenizer, top_k=5)  # doctest: +SKIP

    ```
    """
    from tqdm.auto import tqdm

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if not sentences:
        raise ValueError("The trigger scan needs at least one sentence to insert tokens into.")
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    candidates = sorted(i for token, i in vocab.items() if i not in special and is_word_start(token))
    if not candidates:
        raise ValueError("The tokenizer has no word-initial tokens to scan.")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows_in_model = getattr(embeddings, "num_embeddings", None)
    if rows_in_model is not None and max(candidates) >= rows_in_model:
        raise ValueError(
            f"The tokenizer has ids up to {max(candidates)} but the model's input embeddings have {rows_in_model} "
            "rows: pass the tokenizer the model was trained with (or resize the model's token embeddings)."
        )
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    rows = []
    for sentence in sentences:
        encoded = tokenizer(sentence, return_special_tokens_mask=True)
        kept = 0  # the tokenizer's own special tokens, and the first max_words word pieces between them
        row = []
        for token, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
            if special or kept < max_words:
                row.append(token)
                kept += not special
        if len(row) < 2:
            raise ValueError(f"The scan sentence {sentence!r} tokenises to fewer than 2 tokens.")
        rows.append(row)
    scores = torch.zeros(len(candidates))
    pool = torch.tensor(candidates)
    was_training = model.training
    model.eval()
    batches = [(r, start) for r in range(len(rows)) for start in range(0, len(candidates), batch_size)]

    def summary(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        return summary_state(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0].float()

    try:
        with torch.no_grad():
            references = [summary(torch.tensor([row])) for row in rows]
            for r, start in tqdm(batches, desc="Trigger scan", disable=not show_progress, leave=False):
                row, chunk = rows[r], pool[start : start + batch_size]
                middle = len(row) // 2
                ids = torch.tensor(row).repeat(len(chunk), 1)
                ids = torch.cat([ids[:, :middle], chunk[:, None], ids[:, middle:]], dim=1)
                distance = 1 - F.cosine_similarity(summary(ids), references[r], dim=-1)
                scores[start : start + len(chunk)] += distance.cpu()
    finally:
        model.train(was_training)
    order = scores.argsort(descending=True)[:top_k]
    return [candidates[i] for i in order.tolist()]
