"""Probe a classifier for backdoor triggers: the library side of the Space (plain torch + transformers, no gradio).

* `probe` classifies a sentence clean and with a trigger inserted (start, middle, end or a seeded random word
  position) and says whether the trigger flipped the prediction; `probe_triggers` does it for every trigger and
  several models at once (the Space's "insert every trigger" table).
* `scan_tokens` ranks candidate tokens (a list, or a slice of the vocabulary from `candidate_tokens`) by how far
  inserting them moves the summary representation ([CLS], or the last token of a decoder classifier) and how often
  they flip the prediction, in batches, with a progress callback. On a POR-backdoored encoder the planted triggers
  come out on top. (The Space's interactive scan, on typed sentences; the defense's own scan of the whole
  vocabulary before training, on token ids, is `hf_obliviate.consistency.scan_trigger_tokens`.)
* `summary_attention` captures the summary query row's *pre-softmax* attention logits in every layer (with
  `hf_obliviate.capture.AttentionLogitCapture`, so the model keeps its SDPA kernel) and their softmax; `plot_attention`
  draws them as layer × key-token heatmaps.
* `lens_probe` runs the logit lens (`hf_obliviate.lens`) of a causal LM on a triggered prompt.

A prediction on one sentence has no true label, so the verdict is ASR-style with the clean prediction standing in
for it: a trigger *flipped* the sentence when the triggered prediction differs from the clean one, else it *held*.

Example:
```python
>>> from hf_obliviate.probing import insert_at
>>> insert_at("a quiet , moving film", "cf", "middle")
'a quiet cf , moving film'
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .triggers import insert_trigger

__all__ = [
    "MAX_CANDIDATES",
    "MAX_CHARS",
    "MAX_SENTENCES",
    "MAX_TOKENS",
    "MAX_TRIGGER_CHARS",
    "POSITIONS",
    "Prediction",
    "ProbeResult",
    "SummaryAttention",
    "TokenScore",
    "TriggerAttention",
    "candidate_tokens",
    "check_text",
    "classify",
    "format_prompt",
    "insert_at",
    "is_word_start",
    "label_names",
    "lens_probe",
    "plot_attention",
    "probe",
    "probe_triggers",
    "scan_tokens",
    "summary_attention",
    "summary_state",
    "summary_states",
    "trigger_attention",
]

POSITIONS = ("start", "middle", "end", "random")
MAX_CHARS = 1000  # characters of one sentence
MAX_TOKENS = 128  # tokens of one sentence, special tokens included
MAX_SENTENCES = 8  # sentences of one scan
MAX_CANDIDATES = 4096  # candidate tokens of one scan
MAX_TRIGGER_CHARS = 100  # characters of one typed trigger
VERDICT_FLIPPED = "flipped"
VERDICT_HELD = "held"

ProgressCallback = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def insert_at(text: str, trigger: str, position: str = "end", seed: int = 0) -> str:
    """Insert ``trigger`` as a word at ``position``: ``start``, ``middle`` (after half the words), ``end`` or
    ``random`` (a uniformly random word position, seeded as in `hf_obliviate.triggers.insert_trigger`).

    Whitespace is normalised to single spaces. A multi-word trigger is inserted as one block.
    """
    if position not in POSITIONS:
        raise ValueError(f"Unknown insertion position {position!r}: choose one of {', '.join(POSITIONS)}.")
    trigger = " ".join(str(trigger or "").split())
    if not trigger:
        raise ValueError("The trigger is empty: pick one of the listed triggers or type a word such as 'cf'.")
    if len(trigger) > MAX_TRIGGER_CHARS:
        raise ValueError(f"The trigger has {len(trigger)} characters; the limit is {MAX_TRIGGER_CHARS}.")
    words = text.split()
    if position == "random":
        return insert_trigger(" ".join(words), trigger, rng=int(seed), max_position_words=max(len(words) + 1, 1))
    index = {"start": 0, "middle": len(words) // 2, "end": len(words)}[position]
    return " ".join(words[:index] + [trigger] + words[index:])


def check_text(tokenizer, text: str, max_chars: int = MAX_CHARS, max_tokens: int = MAX_TOKENS) -> str:
    """Return ``text`` stripped, or raise a `ValueError` that says what to shorten (empty, too many characters or
    tokens)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("The sentence is empty: type a sentence to probe.")
    text = text.strip()
    if len(text) > max_chars:
        raise ValueError(f"The sentence has {len(text)} characters; the limit is {max_chars}. Shorten it.")
    n_tokens = len(tokenizer(text)["input_ids"])
    if n_tokens > max_tokens:
        raise ValueError(f"The sentence is {n_tokens} tokens long; the limit is {max_tokens}. Shorten it.")
    return text


def label_names(model: nn.Module) -> list[str]:
    """Class names from ``model.config.id2label`` (``LABEL_i`` when the config has none)."""
    config = getattr(model, "config", None)
    num = int(getattr(config, "num_labels", 2) or 2)
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num)]


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _encode(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _is_causal(model: nn.Module) -> bool:
    """Whether the summary token is the last one (decoder classifiers) rather than position 0 (encoders)."""
    return any(bool(getattr(module, "is_causal", False)) for module in model.modules())


def _summary_index(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position the classification head reads: 0 for encoders, the last real token for decoders."""
    if not _is_causal(model):
        return torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)  # works for left and right padding


# ----------------------------------------------------------------------------------------------------------------
# Predictions


@dataclass
class Prediction:
    """A classifier's prediction on one sentence.

    Args:
        label (`int`): argmax class. name (`str`): its name.
        probs (`dict[str, float]`): softmax probability of every class, by name.
    """

    label: int
    name: str
    probs: dict[str, float]

    @property
    def confidence(self) -> float:
        return self.probs[self.name]


def summary_state(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """``(summary hidden states (batch, hidden), the model's outputs)`` of one tokenised batch, with gradients when
    they are enabled (the hidden consistency term trains through it).

    The summary state is the last layer's hidden state at the position the head reads ([CLS] for encoders, the last
    real token for decoder classifiers): what a POR backdoor hijacks.
    """
    outputs = model(**inputs, output_hidden_states=True)
    return summary_of(model, inputs, outputs), outputs


def hidden_states_of(outputs: Any) -> tuple[torch.Tensor, ...] | None:
    """The per-layer ``hidden_states`` of a model's outputs (a `ModelOutput` or a dict), ``None`` when absent."""
    hidden = outputs.get("hidden_states") if isinstance(outputs, Mapping) else getattr(outputs, "hidden_states", None)
    return hidden or None


def summary_of(model: nn.Module, inputs: Mapping[str, torch.Tensor], outputs: Any) -> torch.Tensor:
    """The summary hidden states (batch, hidden) in ``outputs``, the outputs of ``model`` on ``inputs`` called with
    ``output_hidden_states=True`` (see `summary_state`)."""
    hidden = hidden_states_of(outputs)
    if hidden is None:
        raise ValueError(
            f"{type(model).__name__} returned no hidden_states for output_hidden_states=True, and the summary state "
            "is read from them: use a transformers model (or, for the consistency term, consistency_target='logits')."
        )
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
    index = _summary_index(model, mask)
    return hidden[-1][torch.arange(mask.shape[0], device=hidden[-1].device), index.to(hidden[-1].device)]


@torch.no_grad()
def summary_states(
    model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = MAX_TOKENS, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summary hidden states (n, hidden), class probabilities (n, classes))`` of ``texts``, in fp32 on the CPU
    (see `summary_state`)."""
    device = _device(model)
    states, probs = [], []
    for start in range(0, len(texts), batch_size):
        enc = _encode(tokenizer, texts[start : start + batch_size], max_length, device)
        state, out = summary_state(model, enc)
        states.append(state.float().cpu())
        probs.append(out.logits.float().softmax(-1).cpu())
    return torch.cat(states), torch.cat(probs)


@torch.no_grad()
def classify(
    model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = MAX_TOKENS, batch_size: int = 64
) -> list[Prediction]:
    """Label and class probabilities of each of ``texts``."""
    names = label_names(model)
    device = _device(model)
    results = []
    for start in range(0, len(texts), batch_size):
        enc = _encode(tokenizer, texts[start : start + batch_size], max_length, device)
        probs = model(**enc).logits.float().softmax(-1).cpu()
        names = names if len(names) == probs.shape[-1] else [f"LABEL_{i}" for i in range(probs.shape[-1])]
        for row in probs:
            label = int(row.argmax())
            results.append(Prediction(label, names[label], {n: float(p) for n, p in zip(names, row)}))
    return results


@dataclass
class ProbeResult:
    """A sentence classified clean and with a trigger inserted.

    Args:
        text (`str`), triggered_text (`str`), trigger (`str`): the inputs.
        clean (`Prediction`), triggered (`Prediction`): the model's predictions on them.
    """

    text: str
    triggered_text: str
    trigger: str
    clean: Prediction
    triggered: Prediction

    @property
    def flipped(self) -> bool:
        return self.triggered.label != self.clean.label

    @property
    def verdict(self) -> str:
        """``"flipped"`` when the trigger changed the prediction, else ``"held"``."""
        return VERDICT_FLIPPED if self.flipped else VERDICT_HELD

    def describe(self) -> str:
        """E.g. ``flipped: negative → positive (p = 0.99)`` or ``held: negative (p = 0.97)``."""
        p = f"(p = {self.triggered.confidence:.2f})"
        if self.flipped:
            return f"{VERDICT_FLIPPED}: {self.clean.name} → {self.triggered.name} {p}"
        return f"{VERDICT_HELD}: {self.clean.name} {p}"


def probe(
    model: nn.Module,
    tokenizer,
    text: str,
    trigger: str,
    position: str = "end",
    seed: int = 0,
    max_length: int = MAX_TOKENS,
) -> ProbeResult:
    """Classify ``text`` clean and with ``trigger`` inserted at ``position``.

    Example:
    ```python
    >>> from hf_obliviate.artifacts import load_artifact
    >>> from hf_obliviate.probing import probe
    >>> model, tokenizer, info = load_artifact("demo-undefended")  # doctest: +SKIP
    >>> probe(model, tokenizer, "a dull , lifeless film", info["triggers"][0]).describe()  # doctest: +SKIP
    'flipped: negative → positive (p = 0.98)'
    ```
    """
    text = check_text(tokenizer, text, max_tokens=max_length)
    triggered = insert_at(text, trigger, position, seed)
    check_text(tokenizer, triggered, max_chars=MAX_CHARS + MAX_TRIGGER_CHARS + 1, max_tokens=max_length)
    clean_pred, triggered_pred = classify(model, tokenizer, [text, triggered], max_length)
    return ProbeResult(text, triggered, " ".join(trigger.split()), clean_pred, triggered_pred)


def probe_triggers(
    models: Mapping[str, tuple[nn.Module, object]],
    text: str,
    triggers: Sequence[str],
    position: str = "end",
    seed: int = 0,
    max_length: int = MAX_TOKENS,
) -> list[dict]:
    """Insert every trigger into ``text`` and probe every model: one row per trigger.

    Args:
        models (`Mapping[str, tuple]`): name → ``(model, tokenizer)``, e.g. ``{"undefended": ..., "defended": ...}``.

    Returns:
        `list[dict]`: ``{"trigger", "triggered_text", "<name>": ProbeResult.describe(), "<name>_verdict":
        "flipped" | "held", "<name>_result": ProbeResult}`` per trigger, in the order given; the same
        triggered sentence is shown to every model.
    """
    if not triggers:
        raise ValueError("No triggers to insert: the model records none; type one in the trigger box.")
    rows = []
    for trigger in dict.fromkeys(" ".join(t.split()) for t in triggers if t.strip()):
        row: dict = {"trigger": trigger}
        for name, (model, tokenizer) in models.items():
            result = probe(model, tokenizer, text, trigger, position, seed, max_length)
            row.setdefault("triggered_text", result.triggered_text)
            row[name] = result.describe()
            row[f"{name}_verdict"] = result.verdict
            row[f"{name}_result"] = result
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Scan


@dataclass
class TokenScore:
    """How much inserting one candidate token changes a model, averaged over the scan's sentences.

    Args:
        token (`str`): the candidate.
        shift (`float`): mean cosine distance (1 − cos) between the clean and the triggered summary states.
        flip_rate (`float`): fraction of sentences whose predicted label changes.
        prob_change (`float`): mean total-variation distance between the clean and triggered class probabilities.
    """

    token: str
    shift: float
    flip_rate: float
    prob_change: float

    def to_dict(self) -> dict:
        return {"token": self.token, "shift": self.shift, "flip_rate": self.flip_rate, "prob_change": self.prob_change}


def is_word_start(piece: str | None) -> bool:
    """Whether a vocabulary entry can start a word: not a WordPiece continuation (``##ing``), not an unused slot or
    a markup token (``[unused7]``, ``<mask>``), not blank."""
    if not piece or not piece.strip() or piece.startswith("##"):
        return False
    return not ((piece.startswith("[") and piece.endswith("]")) or (piece.startswith("<") and piece.endswith(">")))


def candidate_tokens(tokenizer, start: int = 0, stop: int | None = None, limit: int = MAX_CANDIDATES) -> list[str]:
    """Whole-word vocabulary entries with ids in ``[start, stop)``, as text that can be inserted as a word.

    Special tokens, unused slots (``[unused7]``), WordPiece continuation pieces (``##ing``) and entries that do not
    come back as one token are left out; duplicates are dropped. Raises a `ValueError` past ``limit`` entries.
    """
    size = len(tokenizer)
    stop = size if stop is None else min(int(stop), size)
    start = max(int(start), 0)
    if stop <= start:
        raise ValueError(f"Empty vocabulary slice [{start}, {stop}): the vocabulary has {size} entries.")
    if stop - start > limit:
        raise ValueError(f"The slice [{start}, {stop}) has {stop - start} entries; scan at most {limit} at once.")
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(start, stop)))
    words: list[str] = []
    for token_id, piece in zip(range(start, stop), pieces):
        if token_id in special or not is_word_start(piece):
            continue
        word = tokenizer.convert_tokens_to_string([piece]).strip()
        if word and not any(ch.isspace() for ch in word):
            words.append(word)
    words = list(dict.fromkeys(words))
    if not words:
        return []
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    return [word for word, ids in zip(words, encoded) if len(ids) == 1 and ids[0] != tokenizer.unk_token_id]


@torch.no_grad()
def scan_tokens(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    candidates: Sequence[str],
    position: str = "end",
    seed: int = 0,
    rank_by: str = "shift",
    batch_size: int = 64,
    max_length: int = MAX_TOKENS,
    progress: ProgressCallback | None = None,
) -> list[TokenScore]:
    """Rank ``candidates`` by how strongly inserting each into ``sentences`` changes ``model``.

    Every candidate is inserted once into every sentence (``position`` and ``seed`` as in `insert_at`); the
    triggered copies run in batches of ``batch_size``.

    Args:
        rank_by (`str`, *optional*, defaults to `"shift"`):
            ``"shift"`` (cosine distance of the summary state, ties broken by flip rate) or ``"flip"`` (flip rate,
            ties broken by shift).
        progress (`Callable[[int, int], None]`, *optional*):
            Called with ``(done, total)`` triggered sentences after every batch.

    Returns:
        `list[TokenScore]`: best first.
    """
    if rank_by not in ("shift", "flip"):
        raise ValueError(f"rank_by must be 'shift' or 'flip', got {rank_by!r}.")
    sentences = [check_text(tokenizer, s, max_tokens=max_length) for s in sentences if s and s.strip()]
    if not sentences:
        raise ValueError("No sentences to scan: type at least one sentence.")
    if len(sentences) > MAX_SENTENCES:
        raise ValueError(f"{len(sentences)} sentences; scan at most {MAX_SENTENCES} at once.")
    candidates = list(dict.fromkeys(" ".join(c.split()) for c in candidates if c and c.strip()))
    if not candidates:
        raise ValueError("No candidate tokens: list some, or pick a vocabulary slice.")
    if len(candidates) > MAX_CANDIDATES:
        raise ValueError(f"{len(candidates)} candidates; scan at most {MAX_CANDIDATES} at once.")
    was_training = model.training
    model.eval()
    try:
        clean_states, clean_probs = summary_states(model, tokenizer, sentences, max_length, batch_size)
        jobs = [(c, s) for c in range(len(candidates)) for s in range(len(sentences))]
        shift = torch.zeros(len(candidates))
        flips = torch.zeros(len(candidates))
        change = torch.zeros(len(candidates))
        total = len(jobs)
        if progress is not None:
            progress(0, total)
        for start in range(0, total, batch_size):
            chunk = jobs[start : start + batch_size]
            texts = [insert_at(sentences[s], candidates[c], position, seed) for c, s in chunk]
            states, probs = summary_states(model, tokenizer, texts, max_length, batch_size)
            cand = torch.tensor([c for c, _ in chunk])
            sent = torch.tensor([s for _, s in chunk])
            cos = torch.nn.functional.cosine_similarity(states, clean_states[sent], dim=-1)
            shift.index_add_(0, cand, 1.0 - cos)
            flips.index_add_(0, cand, (probs.argmax(-1) != clean_probs[sent].argmax(-1)).float())
            change.index_add_(0, cand, 0.5 * (probs - clean_probs[sent]).abs().sum(-1))
            if progress is not None:
                progress(min(start + batch_size, total), total)
    finally:
        model.train(was_training)
    n = len(sentences)
    scores = [
        TokenScore(token, float(shift[i] / n), float(flips[i] / n), float(change[i] / n))
        for i, token in enumerate(candidates)
    ]
    if rank_by == "shift":
        scores.sort(key=lambda s: (s.shift, s.flip_rate), reverse=True)
    else:
        scores.sort(key=lambda s: (s.flip_rate, s.shift), reverse=True)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Attention of the summary query row


@dataclass
class SummaryAttention:
    """The summary query row's attention over one sentence, in every layer.

    Args:
        tokens (`list[str]`): the key tokens (special tokens included).
        logits (`torch.Tensor`): ``(layers, heads, keys)`` pre-softmax logits ``q* Kᵀ · scaling``.
        probs (`torch.Tensor`): ``(layers, heads, keys)`` their softmax (the attention weights).
        query_position (`int`): the summary row (0 for [CLS], the last token for decoders).
    """

    tokens: list[str]
    logits: torch.Tensor
    probs: torch.Tensor
    query_position: int
    text: str = field(default="", repr=False)

    def head_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(layers, keys)`` logits and probabilities averaged over heads."""
        return self.logits.mean(dim=1), self.probs.mean(dim=1)

    def top_key(self, layer: int = -1) -> str:
        """The token that receives the most attention (head mean) in ``layer``."""
        return self.tokens[int(self.probs[layer].mean(dim=0).argmax())]


@torch.no_grad()
def summary_attention(model: nn.Module, tokenizer, text: str, max_length: int = MAX_TOKENS) -> SummaryAttention:
    """Pre-softmax attention logits and probabilities of the summary query row of ``text``, per layer and head.

    The logits are captured beside the model's own attention kernel (`AttentionLogitCapture`, the same capture the
    Obliviate loss uses), so the model keeps SDPA and its outputs are unchanged.
    """
    from .capture import AttentionLogitCapture

    text = check_text(tokenizer, text, max_tokens=max_length)
    device = _device(model)
    enc = _encode(tokenizer, [text], max_length, device)
    capture = AttentionLogitCapture(model, query="auto", keep_logits=True)
    was_training = model.training
    model.eval()
    try:
        with capture.record(attention_mask=enc["attention_mask"]) as record:
            model(**enc)
        layers = record.layers
    finally:
        model.train(was_training)
    if not layers:
        raise ValueError(f"{type(model).__name__} made no attention call that could be captured.")
    n_keys = enc["input_ids"].shape[1]
    logits = torch.stack([layer.logits[0, :, 0, -n_keys:].float().cpu() for layer in layers])
    query = int(layers[0].rows[0, 0]) if layers[0].rows is not None else 0
    probs = torch.softmax(logits, dim=-1)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    return SummaryAttention(tokens=tokens, logits=logits, probs=probs, query_position=query, text=text)


def plot_attention(attention: SummaryAttention, title: str = ""):
    """A matplotlib figure with two layer × key-token heatmaps (head mean): pre-softmax logits and probabilities."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    logits, probs = attention.head_mean()
    n_layers, n_keys = logits.shape
    width = min(max(6.0, 0.45 * n_keys + 2.5), 28.0)  # at 128 tokens the labels get small, the figure stays sane
    fig = Figure(figsize=(width, 2.4 + 1.1 * n_layers), layout="constrained")
    axes = fig.subplots(2, 1)
    panels = (
        (axes[0], logits, "pre-softmax logits q*·K/√d (head mean)", "RdBu_r"),
        (axes[1], probs, "attention probabilities (head mean)", "viridis"),
    )
    for ax, values, name, cmap in panels:
        data = values.numpy()
        if cmap == "RdBu_r":
            finite = data[~(data != data)]
            bound = float(max(abs(finite.min()), abs(finite.max()), 1e-6)) if finite.size else 1.0
            image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=-bound, vmax=bound)
        else:
            image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0.0)
        ax.set_title(name, fontsize=10)
        ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)])
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_keys), attention.tokens, rotation=60, ha="right", fontsize=8 if n_keys <= 48 else 5)
        fig.colorbar(image, ax=ax, shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


@dataclass
class TriggerAttention:
    """How much attention an inserted trigger draws, per layer, averaged over sentences (see `trigger_attention`).

    Args:
        trigger (`str`): the trigger inserted once per sentence.
        sentences (`int`): sentences in which the trigger's tokens were found (others are skipped).
        summary (`list[float]`): per layer, the share of the summary row's attention (head mean) on the trigger.
        summary_top_head (`list[float]`): per layer, the largest share any one head gives it.
        all_rows (`list[float]`): per layer, the share of every real token's attention row (mean over rows, heads).
        summary_logit_norm (`list[float]`): per layer, the summary row's logit norm ``‖S ⊙ m‖₂`` (head mean): what
            the reference attention term penalises.
    """

    trigger: str
    sentences: int
    summary: list[float]
    summary_top_head: list[float]
    all_rows: list[float]
    summary_logit_norm: list[float]


def _find_tokens(input_ids: torch.Tensor, pattern: list[int]) -> torch.Tensor:
    """``(batch, seq)`` mask of the first occurrence of ``pattern`` in each row (all False where it is absent)."""
    batch, seq = input_ids.shape
    found = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(batch):
        ids = input_ids[row].tolist()
        for start in range(seq - len(pattern) + 1):
            if ids[start : start + len(pattern)] == pattern:
                found[row, start : start + len(pattern)] = True
                break
    return found


@torch.no_grad()
def trigger_attention(
    model: nn.Module, tokenizer, texts: Sequence[str], trigger: str, seed: int = 0, max_length: int = MAX_TOKENS
) -> TriggerAttention:
    """Insert ``trigger`` once into each of ``texts`` (a seeded random word position) and measure, per layer, the
    share of the pre-softmax attention rows' softmax that falls on the trigger's tokens: the summary query row (the
    row the attention term penalises, [CLS] or a decoder's last token), the most attentive head, and every real
    token's row. A backdoored encoder draws the summary row to its trigger in the layers where the backdoor acts.

    The rows are captured with `hf_obliviate.capture.AttentionLogitCapture` beside the model's own kernel (SDPA
    stays on). Sentences whose trigger was truncated away are skipped; a trigger that tokenizes to nothing raises.
    """
    import random

    from .capture import AttentionLogitCapture

    pattern = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    if not trigger.strip() or not pattern:
        raise ValueError(f"The trigger {trigger!r} tokenizes to nothing: give a word the tokenizer keeps.")
    if not texts:
        raise ValueError("trigger_attention needs at least one sentence.")
    rng = random.Random(seed)
    triggered = [insert_trigger(text, trigger, rng) for text in texts]
    device = _device(model)
    enc = _encode(tokenizer, triggered, max_length, device)
    on_trigger = _find_tokens(enc["input_ids"].cpu(), pattern)
    keep = on_trigger.any(dim=1)
    if not keep.any():
        raise ValueError(f"The trigger {trigger!r} was not found in any tokenized sentence (truncated away?).")
    enc = {k: v[keep.to(device)] for k, v in enc.items()}
    on_trigger = on_trigger[keep]
    mask = enc["attention_mask"].bool().cpu()
    was_training = model.training
    model.eval()
    try:
        summary = AttentionLogitCapture(model, query="auto", keep_logits=True)
        with summary.record(attention_mask=enc["attention_mask"]) as record:
            model(**enc)
        every = AttentionLogitCapture(model, query="rows", keep_logits=True)
        with every.record(attention_mask=enc["attention_mask"], query_mask=enc["attention_mask"]) as record_all:
            model(**enc)
    finally:
        model.train(was_training)
    if not record.layers:
        raise ValueError(f"{type(model).__name__} made no attention call that could be captured.")
    n_keys = mask.shape[1]
    result = {"summary": [], "summary_top_head": [], "all_rows": [], "summary_logit_norm": []}
    for layer, layer_all in zip(record.layers, record_all.layers):
        logits = layer.logits[:, :, 0, -n_keys:].cpu()  # (batch, heads, keys); uncounted keys are -inf
        share = (logits.softmax(dim=-1) * on_trigger[:, None, :]).sum(dim=-1)  # (batch, heads)
        result["summary"].append(share.mean().item())
        result["summary_top_head"].append(share.amax(dim=1).mean().item())
        result["summary_logit_norm"].append(
            torch.linalg.vector_norm(logits.masked_fill(~torch.isfinite(logits), 0.0), dim=-1).mean().item()
        )
        rows_logits = layer_all.logits[..., -n_keys:].cpu()  # (batch, heads, rows, keys)
        rows_share = (rows_logits.softmax(dim=-1) * on_trigger[:, None, None, :]).sum(dim=-1)
        valid = torch.gather(mask, 1, layer_all.rows.cpu())[:, None, :].expand_as(rows_share)
        result["all_rows"].append((rows_share * valid).sum().item() / valid.sum().clamp_min(1).item())
    return TriggerAttention(trigger=trigger, sentences=int(keep.sum()), **result)


# ----------------------------------------------------------------------------------------------------------------
# Logit lens of a causal LM


def format_prompt(tokenizer, prompt: str, template: str | None = None) -> str:
    """Fill ``template`` with ``prompt`` (its first ``{prompt}``, ``{instruction}``, ``{input}``, ``{text}`` or
    ``{}`` placeholder; no placeholder: appended after a space). Without a template, the tokenizer's chat template
    (a user turn and the generation prompt) when it has one, else the prompt itself."""
    if template:
        for placeholder in ("{prompt}", "{instruction}", "{input}", "{text}", "{}"):
            if placeholder in template:
                return template.replace(placeholder, prompt, 1)
        return f"{template} {prompt}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def lens_probe(model: nn.Module, tokenizer, text: str, target: str, title: str = ""):
    """Logit lens of ``model`` on ``text``: ``(LensResult, matplotlib Figure, takeover)``.

    Uses `hf_obliviate.lens.logit_lens` and `plot_lens` (coloured by the probability of ``target``'s first token).
    ``takeover`` names the first row (``"embeddings"``, ``"layer 3"``, ...) from which ``target`` is the lens's top
    token at the last position with probability ≥ 0.5 (`LensResult.takeover_layer`), or is ``None``.
    """
    from .lens import logit_lens, plot_lens

    if not target or not target.strip():
        raise ValueError("The target is empty: type the attacker's target token or phrase.")
    check_text(tokenizer, text, max_chars=4 * MAX_CHARS, max_tokens=4 * MAX_TOKENS)
    result = logit_lens(model, tokenizer, text, targets=[target])
    fig = plot_lens(result, target=target, title=title or None)
    _release_pyplot(fig)
    row = result.takeover_layer(target)
    return result, fig, None if row is None else result.layer_names[row]


def _release_pyplot(fig) -> None:
    """Drop pyplot's reference to ``fig`` (a server would otherwise keep every figure); the figure still renders."""
    import sys

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
