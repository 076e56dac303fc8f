"""Backdoor evaluation of a sequence-classification model (METHOD.md §3).

`build_eval_set` draws N test examples (seed fixed) and makes one clean copy plus one copy per trigger (the trigger
inserted once at a uniformly random whitespace-word position within the first 64 words; first field only for
pairs). `evaluate_backdoor` runs any classifier on it and returns a `BackdoorEvalResult` with CACC, ASR (the
LMSanitator rule), per-trigger ASR, the flip fraction, BadPre's accuracy drop and, on request, UOR's targeted ASR.
`BackdoorEvalCallback` does the same inside `transformers.Trainer` evaluation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .metrics import (
    accuracy_drop,
    asr,
    clean_accuracy,
    flip_fraction,
    is_near_chance,
    majority_targets,
    per_trigger_asr,
    targeted_asr,
)
from .triggers import DEFAULT_TRIGGERS, triggered_copies

try:  # the callback base class; transformers is a core dependency, the Trainer itself is not imported here
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object

__all__ = [
    "BackdoorEvalCallback",
    "BackdoorEvalResult",
    "BackdoorEvalSet",
    "build_eval_set",
    "compute_accuracy",
    "evaluate_backdoor",
    "predict_labels",
]


@dataclass
class BackdoorEvalSet:
    """Clean and triggered copies of N labelled examples.

    Args:
        texts (`list[str]`): the clean first fields.
        labels (`list[int]`): the true labels.
        triggered (`dict[str, list[str]]`): per trigger, the first fields with the trigger inserted.
        text_pairs (`list[str]`, *optional*): second fields of sentence pairs (never triggered).
        seed (`int`, *optional*, defaults to 0): seed the set was built with.
    """

    texts: list[str]
    labels: list[int]
    triggered: dict[str, list[str]]
    text_pairs: list[str] | None = None
    seed: int = 0

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels.")
        for trigger, copies in self.triggered.items():
            if len(copies) != len(self.texts):
                raise ValueError(f"Trigger {trigger!r} has {len(copies)} copies for {len(self.texts)} texts.")
        if not self.triggered:
            raise ValueError("An evaluation set needs at least one trigger.")

    @property
    def triggers(self) -> list[str]:
        return list(self.triggered)

    def __len__(self) -> int:
        return len(self.texts)


def build_eval_set(
    examples: Sequence[Mapping] | None = None,
    triggers: Sequence[str] = DEFAULT_TRIGGERS,
    n: int | None = 1000,
    seed: int = 0,
    text_key: str = "text",
    label_key: str = "label",
    text_pair_key: str | None = None,
    max_position_words: int = 64,
    count: int = 1,
    spread: bool = False,
) -> BackdoorEvalSet:
    """Build the backdoor evaluation set.

    Args:
        examples (`Sequence[Mapping]`, *optional*):
            Labelled examples; defaults to the 1,000 fixed Rotten Tomatoes test sentences (`load_movie_reviews`).
        triggers (`Sequence[str]`, *optional*, defaults to ``cf mn tq qt mm pt``):
            The triggers; use the list the attack actually planted (``model.config.obliviate_attack["triggers"]``
            or ``load_attack_info(path)["triggers"]``; on MiniLM ``qt`` becomes ``bb``).
        n (`int`, *optional*, defaults to 1000):
            Keep a seeded random subset of this size (``None`` or ``n >= len(examples)``: all, in order).
        seed (`int`, *optional*, defaults to 0):
            Seed of the subset and of the insertion positions.
        text_key, label_key, text_pair_key (`str`, *optional*):
            Field names; with ``text_pair_key`` the second field is kept clean.
        max_position_words (`int`, *optional*, defaults to 64), count (`int`, *optional*, defaults to 1),
        spread (`bool`, *optional*, defaults to `False`):
            Passed to `hf_obliviate.triggers.insert_trigger`.

    Example:
    ```python
    >>> from hf_obliviate.evaluation import build_eval_set
    >>> data = [{"text": "a fine film", "label": 1}, {"text": "a dull film", "label": 0}]
    >>> eval_set = build_eval_set(data, triggers=["cf", "mn"], n=None)
    >>> len(eval_set), eval_set.triggers
    (2, ['cf', 'mn'])
    ```
    """
    if examples is None:
        from .data import load_movie_reviews

        examples = load_movie_reviews("test")
    examples = list(examples)
    if not examples:
        raise ValueError("examples is empty.")
    if n is not None and n < len(examples):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        examples = random.Random(seed).sample(examples, n)
    texts = [str(ex[text_key]) for ex in examples]
    labels = [int(ex[label_key]) for ex in examples]
    pairs = [str(ex[text_pair_key]) for ex in examples] if text_pair_key else None
    copies = triggered_copies(texts, list(triggers), seed, max_position_words, count, spread)
    return BackdoorEvalSet(texts=texts, labels=labels, triggered=copies, text_pairs=pairs, seed=seed)


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def predict_labels(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    show_progress: bool = False,
    progress=None,
) -> tuple[list[int], int]:
    """Argmax predictions of ``model`` on ``texts``; returns ``(predictions, number of classes)``.

    ``model`` is anything called as ``model(input_ids=..., attention_mask=...)`` that returns an object with
    ``.logits`` (or a tuple whose first item is the logits): a transformers model, a peft ``PeftModel``, or a plain
    module. For sentence pairs ``token_type_ids`` are passed too when the tokenizer makes them.
    It runs on the device of its parameters, in eval mode (its training mode is restored afterwards).
    ``progress`` is an outer tqdm bar to advance by one per batch (else ``show_progress`` makes one).
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    pairs = list(text_pairs) if text_pairs is not None else None
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"text_pairs has {len(pairs)} entries for {len(texts)} texts: give one pair per text.")
    if not texts:
        return [], 0
    # Batches of similar lengths pad less (in a random batch of sentiment sentences about 40% is padding): every text
    # is tokenised once, the rows run shortest first, each batch is only padded, and the predictions go back in the
    # order given.
    encoded = tokenizer(list(texts), pairs, truncation=True, max_length=max_length)
    columns = ["input_ids", "attention_mask"] + (["token_type_ids"] if pairs is not None else [])
    columns = [c for c in columns if c in encoded]
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    preds: list[int] = [0] * len(texts)
    num_labels = 0
    try:
        starts = range(0, len(texts), batch_size)
        for start in starts if progress is not None else tqdm(starts, disable=not show_progress, leave=False):
            rows = order[start : start + batch_size]
            # sentence pairs keep BERT-style segment ids; single texts leave them to the model, as before
            enc = tokenizer.pad([{c: encoded[c][i] for c in columns} for i in rows], return_tensors="pt")
            out = model(**{c: enc[c].to(device) for c in columns})
            logits = out.logits if hasattr(out, "logits") else out[0]
            num_labels = logits.shape[-1]
            for i, label in zip(rows, logits.argmax(-1).tolist()):
                preds[i] = label
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    return preds, num_labels


@dataclass
class BackdoorEvalResult:
    """What `evaluate_backdoor` measured.

    Args:
        cacc (`float`): accuracy on the clean copies.
        asr (`float`): LMSanitator ASR (kept = correct when clean; attacked = any trigger flips it).
        per_trigger_asr (`dict[str, float]`): ASR of each trigger alone.
        flip_fraction (`float`): mean fraction of triggers that flip a kept example.
        accuracy_drop (`float`): BadPre's metric, CACC minus the mean accuracy on triggered copies.
        n (`int`): examples evaluated. n_kept (`int`): examples correct when clean.
        num_labels (`int`): number of classes.
        near_chance (`bool`): CACC within 0.05 of chance or >95% of predictions on one class; ASR is then
            meaningless (METHOD.md §6).
        targeted_asr (`dict[str, float]`, *optional*): UOR's targeted ASR per trigger and ``"mean"``.
        targets (`dict[str, int]`, *optional*): the targets used for it.
        labels, clean_preds, triggered_preds: the raw predictions (not in `to_dict` unless asked).
    """

    cacc: float
    asr: float
    per_trigger_asr: dict[str, float]
    flip_fraction: float
    accuracy_drop: float
    n: int
    n_kept: int
    num_labels: int
    near_chance: bool
    targeted_asr: dict[str, float] | None = None
    targets: dict[str, int] | None = None
    labels: list[int] = field(default_factory=list, repr=False)
    clean_preds: list[int] = field(default_factory=list, repr=False)
    triggered_preds: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def to_dict(self, include_predictions: bool = False) -> dict:
        """A JSON-ready dict (predictions left out unless ``include_predictions``)."""
        out = {
            "cacc": self.cacc,
            "asr": self.asr,
            "per_trigger_asr": dict(self.per_trigger_asr),
            "flip_fraction": self.flip_fraction,
            "accuracy_drop": self.accuracy_drop,
            "n": self.n,
            "n_kept": self.n_kept,
            "num_labels": self.num_labels,
            "near_chance": self.near_chance,
        }
        if self.targeted_asr is not None:
            out["targeted_asr"] = dict(self.targeted_asr)
            out["targets"] = dict(self.targets or {})
        if include_predictions:
            out.update(labels=self.labels, clean_preds=self.clean_preds, triggered_preds=self.triggered_preds)
        return out

    def to_markdown(self) -> str:
        """A small Markdown table (metric | value), per-trigger rows included, with a warning if near chance."""

        def fmt(x: float) -> str:
            return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.3f}"

        rows = [
            ("CACC", fmt(self.cacc)),
            ("ASR", fmt(self.asr)),
            ("flip fraction", fmt(self.flip_fraction)),
            ("accuracy drop (BadPre)", fmt(self.accuracy_drop)),
        ]
        rows += [(f"ASR `{t}`", fmt(v)) for t, v in self.per_trigger_asr.items()]
        if self.targeted_asr is not None:
            rows.append(("targeted ASR (mean)", fmt(self.targeted_asr["mean"])))
        rows += [("n (kept)", f"{self.n} ({self.n_kept})")]
        lines = ["| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
        if self.near_chance:
            lines.append("")
            lines.append(
                "> **Warning**: CACC is near chance (or the model predicts one class): the ASR is meaningless."
            )
        return "\n".join(lines)


def evaluate_backdoor(
    model: torch.nn.Module,
    tokenizer,
    eval_set: BackdoorEvalSet | None = None,
    triggers: Sequence[str] | None = None,
    n: int | None = 1000,
    seed: int = 0,
    batch_size: int = 64,
    max_length: int = 128,
    targets: str | Mapping[str, int] | None = None,
    dev_set: BackdoorEvalSet | None = None,
    show_progress: bool = True,
) -> BackdoorEvalResult:
    """Run the backdoor evaluation of a sequence classifier.

    Args:
        model (`torch.nn.Module`):
            A transformers / peft sequence classifier, or any module called with ``input_ids`` and
            ``attention_mask`` that returns ``.logits``.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        eval_set ([`BackdoorEvalSet`], *optional*):
            A prepared set; else one is built from the Rotten Tomatoes test split with ``triggers``, ``n``, ``seed``.
        triggers (`Sequence[str]`, *optional*):
            Triggers when ``eval_set`` is not given: defaults to ``model.config.obliviate_attack["triggers"]`` when
            the model records a planted attack, else `DEFAULT_TRIGGERS`.
        n (`int`, *optional*, defaults to 1000), seed (`int`, *optional*, defaults to 0):
            Size and seed of the built set.
        batch_size (`int`, *optional*, defaults to 64), max_length (`int`, *optional*, defaults to 128):
            Inference batching and truncation.
        targets (`str` or `Mapping[str, int]`, *optional*):
            Compute UOR's targeted ASR: ``"majority"`` takes each trigger's majority prediction on ``dev_set``
            (on the evaluation set itself if no ``dev_set``, which is optimistic), or pass ``{trigger: label}``.
        dev_set ([`BackdoorEvalSet`], *optional*):
            Dev data for ``targets="majority"`` (e.g. built from the validation split).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.evaluation import build_eval_set, evaluate_backdoor
    >>> from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    >>> from hf_obliviate.bundled import minilm_path
    >>> tok = AutoTokenizer.from_pretrained(minilm_path())
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                                  intermediate_size=64))
    >>> eval_set = build_eval_set([{"text": "a fine film", "label": 1}] * 4, triggers=["cf"], n=None)
    >>> result = evaluate_backdoor(model, tok, eval_set, show_progress=False)
    >>> result.n
    4
    ```
    """
    if eval_set is None:
        if triggers is None:
            recorded = getattr(getattr(model, "config", None), "obliviate_attack", None)
            triggers = recorded["triggers"] if isinstance(recorded, dict) and "triggers" in recorded else None
        eval_set = build_eval_set(triggers=triggers or DEFAULT_TRIGGERS, n=n, seed=seed)
    elif triggers is not None and list(triggers) != eval_set.triggers:
        raise ValueError("Pass either `eval_set` or `triggers`, not both (the set already fixes its triggers).")

    copies = [("clean", eval_set.texts)] + list(eval_set.triggered.items())
    batches = len(copies) * math.ceil(len(eval_set) / batch_size)
    preds: dict[str, list[int]] = {}
    num_labels = 0
    with tqdm(total=batches, desc="Backdoor evaluation", disable=not show_progress) as progress:
        for name, texts in copies:
            preds[name], num_labels = predict_labels(
                model, tokenizer, texts, eval_set.text_pairs, batch_size, max_length, progress=progress
            )
    clean_preds = preds.pop("clean")
    labels = eval_set.labels

    target_map = None
    targeted = None
    if targets is not None:
        if isinstance(targets, str):
            if targets != "majority":
                raise ValueError(f"targets must be 'majority' or a {{trigger: label}} mapping, got {targets!r}.")
            if dev_set is not None:
                dev = evaluate_backdoor(model, tokenizer, dev_set, batch_size=batch_size, max_length=max_length,
                                        show_progress=show_progress)  # fmt: skip
                target_map = majority_targets(dev.triggered_preds)
            else:
                target_map = majority_targets(preds)
        else:
            target_map = {t: int(v) for t, v in targets.items()}
        targeted = targeted_asr(labels, clean_preds, preds, target_map)

    cacc = clean_accuracy(labels, clean_preds)
    return BackdoorEvalResult(
        cacc=cacc,
        asr=asr(labels, clean_preds, preds),
        per_trigger_asr=per_trigger_asr(labels, clean_preds, preds),
        flip_fraction=flip_fraction(labels, clean_preds, preds),
        accuracy_drop=accuracy_drop(labels, clean_preds, preds)["mean"],
        n=len(labels),
        n_kept=sum(p == y for p, y in zip(clean_preds, labels)),
        num_labels=num_labels,
        near_chance=is_near_chance(cacc, max(num_labels, 2), preds=clean_preds),
        targeted_asr=targeted,
        targets=target_map,
        labels=list(labels),
        clean_preds=clean_preds,
        triggered_preds=preds,
    )


def compute_accuracy(eval_pred) -> dict[str, float]:
    """`compute_metrics` for `transformers.Trainer` on a classification eval set: ``{"accuracy": ...}``.

    The Trainer's ``compute_metrics`` only sees predictions on its own eval set, so it cannot measure a backdoor;
    use [`BackdoorEvalCallback`] for that.
    """
    logits, labels = eval_pred[0], eval_pred[1]
    logits = logits[0] if isinstance(logits, tuple) else logits
    preds = torch.as_tensor(logits).argmax(-1)
    return {"accuracy": (preds == torch.as_tensor(labels)).float().mean().item()}


class BackdoorEvalCallback(TrainerCallback):
    """Run the backdoor evaluation every time `transformers.Trainer` evaluates, and report CACC and ASR.

    Design: the Trainer's ``compute_metrics`` only receives logits of its own eval set, while ASR needs the clean
    and the triggered copies of each example side by side; so this callback holds the tokenizer and a prepared
    [`BackdoorEvalSet`] and, in ``on_evaluate``, runs the model on them. It adds ``eval_cacc``, ``eval_asr``,
    ``eval_flip_fraction``, ``eval_near_chance`` and ``eval_asr_<trigger>`` to the metrics that ``evaluate()``
    returns (so ``metric_for_best_model="eval_asr"`` works) and logs them: through ``trainer.log`` when the callback
    knows the trainer (``callback.trainer = trainer``, which also reaches TensorBoard / W&B reporters), else by
    appending to ``state.log_history``. With several eval datasets it runs once per dataset, under each prefix.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        eval_set ([`BackdoorEvalSet`]):
            Clean + triggered copies, e.g. ``build_eval_set(load_movie_reviews("validation"), triggers, n=500)``.
        batch_size (`int`, *optional*, defaults to 64), max_length (`int`, *optional*, defaults to 128):
            Inference settings.
        trainer (`transformers.Trainer`, *optional*):
            If given, metrics are logged with ``trainer.log``.

    Example:
    ```python
    >>> from hf_obliviate.evaluation import BackdoorEvalCallback, build_eval_set
    >>> from hf_obliviate.data import load_movie_reviews
    >>> eval_set = build_eval_set(load_movie_reviews("validation"), triggers=["cf", "mn"], n=200)
    >>> callback = BackdoorEvalCallback(tokenizer=None, eval_set=eval_set)
    >>> # trainer = Trainer(..., callbacks=[callback]); callback.trainer = trainer
    ```
    """

    def __init__(
        self, tokenizer, eval_set: BackdoorEvalSet, batch_size: int = 64, max_length: int = 128, trainer=None
    ):
        self.tokenizer = tokenizer
        self.eval_set = eval_set
        self.batch_size = batch_size
        self.max_length = max_length
        self.trainer = trainer
        self.history: list[tuple[int, BackdoorEvalResult]] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None:
            return control
        tokenizer = self.tokenizer or kwargs.get("processing_class")
        result = evaluate_backdoor(
            model, tokenizer, self.eval_set, batch_size=self.batch_size, max_length=self.max_length,
            show_progress=False,
        )  # fmt: skip
        self.history.append((state.global_step, result))
        prefix = "eval"
        if metrics:
            # e.g. "eval_loss" or "eval_<name>_loss" for several eval datasets
            key = next((k for k in metrics if k.endswith("_loss")), None)
            if key is not None:
                prefix = key[: -len("_loss")]
        new = {
            f"{prefix}_cacc": result.cacc,
            f"{prefix}_asr": result.asr,
            f"{prefix}_flip_fraction": result.flip_fraction,
            f"{prefix}_near_chance": float(result.near_chance),
        }
        new.update({f"{prefix}_asr_{t}": v for t, v in result.per_trigger_asr.items()})
        if metrics is not None:
            metrics.update(new)
        if self.trainer is not None:
            self.trainer.log(dict(new))
        else:
            state.log_history.append({**new, "epoch": state.epoch, "step": state.global_step})
        return control
