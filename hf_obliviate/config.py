"""The Obliviate defense settings, defined once and shared by the core, the trainers and the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .capture import QUERY_MODES, VIRTUAL_KEY_MODES

CONSISTENCY_TOKENS = ("rare", "scan")
CONSISTENCY_TARGETS = ("logits", "hidden", "relative")
CONSISTENCY_SAMPLING = ("uniform", "rank")
# The targets that compare summary hidden states (read from the main forward pass when it keeps its hidden states).
HIDDEN_TARGETS = ("hidden", "relative")

__all__ = [
    "CLASSIFIER_DEFAULTS",
    "DEFAULT_LAMBDA_AMP",
    "DEFAULT_LAMBDA_ATTN",
    "SCAN_CONSISTENCY",
    "SCAN_KL",
    "SCAN_RELATIVE",
    "ObliviateConfig",
]

# METHOD.md's coefficients as chosen on the validation split of the attack benchmark (benchmarks/defense.py: POR and
# NeuBA planted in the bundled MiniLM-L6, LoRA; `chosen_lambdas` of benchmarks/results/defense.json, checked by
# tests/test_defense_benchmark.py): the paper's RoBERTa-base coefficients (3e-3, 3e-2) collapse MiniLM to one class
# (METHOD.md §6); λ_attn = 3e-3 keeps clean accuracy. λ_amp = 3e-4 won over 0 by 0.01 of mean validation ASR (NeuBA
# at 1.000 either way); with random batches it had lost, so the term barely matters at this scale.
DEFAULT_LAMBDA_AMP = 3e-4
DEFAULT_LAMBDA_ATTN = 3e-3

# The `scan-consistency` recipe (a named variant of benchmarks/defense.py): the consistency copy inserts one of the 32
# tokens that a vocabulary scan of the model (before training) finds moving its summary output most, and its final
# summary hidden state is pulled to the clean one. No trigger is given to it. Weight 0.03: on the benchmark's
# validation split 0.01 left NeuBA at ASR 0.80, and 0.1 with the attention term collapsed NeuBA to chance.
SCAN_CONSISTENCY = {
    "lambda_consistency": 0.03,
    "consistency_insertions": 1,
    "consistency_tokens": "scan",
    "consistency_target": "hidden",
}
# The `scan-relative` recipe: the same copies, the squared distance divided by the clean batch's spread of summary
# states, with gradients (`consistency_target="relative"`), so that making every sentence's state the same does not
# meet it (under `scan-consistency` the defended adapters' [CLS] states spread 35-45 times less than undefended).
# Weight 0.003: in a side run on the validation split 0.01 cost NeuBA + LoRA 4.8 points of CACC and defended less.
SCAN_RELATIVE = {**SCAN_CONSISTENCY, "lambda_consistency": 0.003, "consistency_target": "relative"}
# The `scan-kl` recipe: the same copies, pulled to the clean batch's *predictions* (KL, weight 1, the `consistency`
# variant's) instead of its summary state. What a trigger must move to flip a prediction is the state along the
# head's direction, which a squared distance does not single out: with POR planted for 640 steps and 200 fine-tuning
# steps, `scan-relative` left triggered [CLS] states 125-198 (squared distance) from clean ones at ASR 0.69, while
# under `scan-ranked` one trigger 87 away flipped 0.18 and another 47 away 0.16
# (benchmarks/results/history/scan-ranked/). It lost the 100-step validation race on NeuBA, and at 200 steps it cost
# NeuBA more than `scan-relative` (one adapter run at chance): not a default.
SCAN_KL = {**SCAN_CONSISTENCY, "lambda_consistency": 1.0, "consistency_target": "logits"}
# `ObliviateTrainer`'s (`ObliviateTrainingArguments`') defaults, for sequence classification: the LoRA / adapter
# recipe the validation split of benchmarks/defense.py chose (`lora_variant` and `lora_variant_lambdas` of
# benchmarks/results/defense.json; tests/test_defense_benchmark.py checks that they agree). `ObliviateConfig` itself
# and `ObliviateSFTConfig` keep METHOD.md's terms at the coefficients above: the consistency term compares
# sequence-classification outputs, and it was not validated for causal LMs. The choice: `scan-relative` plus the
# attention term at METHOD.md's weight, λ_amp 0 (validation, CACC on all 500 sentences, 2026-11-25).
# Six validation seeds later (a side run, benchmarks/results/history/consistency-shapes/) cut the validation ASR by
# 72% with it and 84% with `SCAN_CONSISTENCY`: two seeds cannot rank the two; the benchmark's own choice stands here.
CLASSIFIER_DEFAULTS = {**SCAN_RELATIVE, "lambda_amp": 0.0, "lambda_attn": DEFAULT_LAMBDA_ATTN}


@dataclass
class ObliviateConfig:
    """Settings of the Obliviate defense: ``L = L_task + λ_amp · L_amp + λ_attn · L_attn`` (METHOD.md §1).

    Used as is by :class:`hf_obliviate.ObliviateDefense` in a plain torch loop, and mixed into
    :class:`hf_obliviate.ObliviateTrainingArguments` and :class:`hf_obliviate.ObliviateSFTConfig`.

    Args:
        obliviate (`bool`, *optional*, defaults to `True`):
            Turn the defense on. With `False` training is plain PEFT training.
        lambda_amp (`float`, *optional*, defaults to 3e-4):
            Weight of the amplification term ``−Σ‖θ‖₂`` over the PEFT tensors. The paper uses 3e-3 on
            RoBERTa-base; that collapses the small MiniLM-L6 (METHOD.md §6); 3e-4 is the validation split's choice
            (MiniLM-L6 + LoRA, POR and NeuBA). ``ObliviateTrainingArguments`` defaults to 0 (`CLASSIFIER_DEFAULTS`).
        lambda_attn (`float`, *optional*, defaults to 3e-3):
            Weight of the pre-softmax attention-logit penalty on the summary query rows (paper: 3e-2).
            ``ObliviateTrainingArguments`` too (`CLASSIFIER_DEFAULTS`).
        amp_norm_cap (`float`, *optional*):
            Stop pushing a PEFT tensor once its norm exceeds this cap (bounds the amplification term).
        attn_query (`str`, *optional*, defaults to `"auto"`):
            Query rows penalised: `"auto"` (position 0 for encoders, the last non-pad token for causal models,
            completion tokens in SFT), `"first"`, `"last"` or `"rows"` (SFT: the completion tokens; a classifier
            under `ObliviateTrainer`: every non-pad token's row).
        attn_layer_weights (`list[float]`, *optional*):
            One weight (>= 0) per attention layer, first layer first: the attention term becomes the weighted mean
            ``Σ_ℓ w_ℓ n_ℓ / Σ_ℓ w_ℓ`` of the layers' row norms. `None` (default) is METHOD.md's plain mean. The
            named variant `late-layers` of `benchmarks/defense.py` weighs only the last half of MiniLM's layers,
            where a POR trigger draws the [CLS] row's attention.
        attn_virtual_keys (`str`, *optional*, defaults to `"count"`):
            Prefix tuning's virtual keys in the penalised row norm: `"count"` (METHOD.md §1, the reference recipe)
            or `"skip"` (the named variant for prefix tuning: the prefix keys are its only lever on the model, and
            penalising them collapsed it to chance in `benchmarks/defense.py`). Other PEFT types have no virtual keys.
        attn_centre (`bool`, *optional*, defaults to `False`):
            Penalise the *centred* logit row ``‖S − mean S‖₂`` (the named variant `centred`): softmax ignores a
            row's mean, so the reference norm (`False`, the default, METHOD.md §1) also spends its pull on a shift
            that changes no attention weight. `None`: centred where the penalised query is one summary row per
            example (encoders, sequence classification), the reference norm for SFT completion rows. `True` with
            completion rows raises. On the validation split of `benchmarks/defense.py` it helped POR and not
            NeuBA, so it is not the default.
        lambda_consistency (`float`, *optional*, defaults to 0.0; ``ObliviateTrainingArguments``: 0.003):
            Weight of the trigger-agnostic consistency term (see :mod:`hf_obliviate.consistency`): the model's output
            on a batch against its output on a copy with words inserted (``consistency_tokens``), the clean side
            detached: ``KL(p(x) ‖ p(x'))``, the summary hidden states' mean squared difference, or that difference
            relative to the clean batch's spread (``consistency_target``). One extra forward and backward pass per
            step. Sequence classification only (``ObliviateTrainer``); 0 switches it off.
            ``ObliviateTrainingArguments`` defaults to the named variant `scan-relative` (`SCAN_RELATIVE`) with the
            attention term, the recipe the defense benchmark's validation split chose.
        consistency_insertions (`int`, *optional*, defaults to 1):
            Most rare words inserted per row of the consistency copy (1 to this many, uniformly).
        consistency_tokens (`str`, *optional*, defaults to `"rare"`):
            The words the consistency copy inserts: `"rare"` (random short rare words,
            :func:`hf_obliviate.consistency.rare_token_pool`) or `"scan"` (the ``consistency_scan_top_k`` tokens that
            move the model's [CLS] output most, found before training by
            :func:`hf_obliviate.consistency.scan_trigger_tokens`; the named variant `scan-consistency`). A
            ``consistency_pool`` given to the trainer overrides both.
        consistency_scan_top_k (`int`, *optional*, defaults to 32):
            How many scanned tokens the copy draws from (``consistency_tokens="scan"``).
        consistency_sampling (`str`, *optional*, defaults to `"uniform"`):
            How the copy draws each inserted word from its pool: `"uniform"`, or `"rank"` (the pool's ``k``-th token
            with probability proportional to ``1 / k``, so the scan's most suspicious tokens are inserted most often;
            needs an ordered pool, most suspicious first: ``consistency_tokens="scan"`` or a ``consistency_pool``
            given in that order). The named variant `scan-ranked` of ``benchmarks/defense.py``: with POR planted for
            640 steps and 200 fine-tuning steps it removed more of the backdoor than uniform draws and cost more clean
            accuracy (``benchmarks/results/history/scan-ranked/``), so it is not a default.
        consistency_target (`str`, *optional*, defaults to `"logits"`):
            What the copy is pulled towards: `"logits"` (``KL(p(x) ‖ p(x'))`` between predictions), `"hidden"`
            (the mean squared difference of the last layer's summary hidden states, [CLS] for encoders and the last
            real token for decoder classifiers) or `"relative"` (that squared distance divided by the clean batch's
            spread of summary states, with gradients through the spread, so that the term cannot be met by making
            every sentence's state the same: :func:`hf_obliviate.consistency.relative_consistency_loss`). The
            trainers read the clean states from their own forward pass; a plain loop without hidden states in its
            outputs pays an extra forward pass of the clean batch (without gradients for `"hidden"`, with them for
            `"relative"`).
        peft_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the PEFT modules' outputs during defended training only. The reference implementation used
            0.01 in its defense runs; it is off by default here.

    Example:
    ```python
    >>> from hf_obliviate import ObliviateConfig
    >>> ObliviateConfig(lambda_amp=1e-3, lambda_attn=1e-2).lambda_attn
    0.01
    ```
    """

    obliviate: bool = field(default=True, metadata={"help": "Turn the Obliviate defense on (False: plain PEFT)."})
    lambda_amp: float = field(
        default=DEFAULT_LAMBDA_AMP,
        metadata={
            "help": "Weight of the amplification term -sum ||theta||_2 over the PEFT tensors (paper: 3e-3; 3e-4: "
            "chosen on the MiniLM validation split)."
        },
    )
    lambda_attn: float = field(
        default=DEFAULT_LAMBDA_ATTN,
        metadata={
            "help": "Weight of the pre-softmax attention-logit penalty on the summary query rows (paper: 3e-2)."
        },
    )
    amp_norm_cap: float | None = field(
        default=None, metadata={"help": "Stop pushing a PEFT tensor once its norm exceeds this cap."}
    )
    attn_query: str = field(
        default="auto",
        metadata={
            "help": "Query rows penalised: auto, first, last or rows (SFT: completion tokens; classifiers: every "
            "real token)."
        },
    )
    attn_layer_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per attention layer (first layer first) for the attention term: a weighted mean of "
            "the layers' row norms instead of the plain mean (None: the plain mean, METHOD.md)."
        },
    )
    attn_virtual_keys: str = field(
        default="count",
        metadata={"help": "Prefix tuning's virtual keys in the attention penalty: count (reference) or skip."},
    )
    attn_centre: bool | None = field(
        default=False,
        metadata={
            "help": "Penalise the centred logit row ||S - mean S|| (softmax ignores the mean; default False: the "
            "reference norm). None: centred for one summary row per example (encoders), else the reference norm."
        },
    )
    lambda_consistency: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the trigger-agnostic consistency term: the model's output on a batch against a copy "
            "with words inserted (see consistency_tokens, consistency_target; 0: off; sequence classification only)."
        },
    )
    consistency_insertions: int = field(
        default=1, metadata={"help": "Most rare words inserted per row of the consistency copy."}
    )
    consistency_tokens: str = field(
        default="rare",
        metadata={"help": "Words the consistency copy inserts: rare (random short rare words) or scan (the tokens "
                  "that move the [CLS] output most, found by a vocabulary scan before training)."},
    )  # fmt: skip
    consistency_scan_top_k: int = field(
        default=32, metadata={"help": "How many scanned tokens the consistency copy draws from (tokens=scan)."}
    )
    consistency_sampling: str = field(
        default="uniform",
        metadata={"help": "How the consistency copy draws its words from the pool: uniform, or rank (the k-th "
                  "token of the pool, most suspicious first, with probability proportional to 1/k; tokens=scan)."},
    )  # fmt: skip
    consistency_target: str = field(
        default="logits",
        metadata={"help": "What the consistency copy is pulled towards: logits (KL between predictions), hidden "
                  "(the last layer's summary hidden state: [CLS] for encoders) or relative (that distance divided by "
                  "the clean batch's spread of summary states)."},
    )  # fmt: skip
    peft_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on PEFT module outputs in defended training (reference: 0.01)."}
    )

    def __post_init__(self):
        self._validate_obliviate()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def _validate_obliviate(self) -> None:
        for name in ("lambda_amp", "lambda_attn", "lambda_consistency"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{name} must be a finite number >= 0, got {value!r}. Use 0 to switch the term off; the "
                    "defense minimises the terms, so a negative weight would reward the backdoor path."
                )
        if self.obliviate and self.lambda_amp == 0 and self.lambda_attn == 0 and self.lambda_consistency == 0:
            raise ValueError(
                "obliviate=True but lambda_amp, lambda_attn and lambda_consistency are all 0: give at least one term "
                "a positive weight, or set obliviate=False for plain PEFT training."
            )
        for name in ("consistency_insertions", "consistency_scan_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        choices = {
            "consistency_tokens": CONSISTENCY_TOKENS,
            "consistency_target": CONSISTENCY_TARGETS,
            "consistency_sampling": CONSISTENCY_SAMPLING,
            "attn_query": QUERY_MODES,
            "attn_virtual_keys": VIRTUAL_KEY_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}.")
        if self.consistency_sampling == "rank" and self.consistency_tokens != "scan":
            raise ValueError(
                "consistency_sampling='rank' draws the pool's tokens by their rank, which needs a ranked pool: set "
                "consistency_tokens='scan' (a consistency_pool given to the trainer is then taken in its order, most "
                "suspicious first), or consistency_sampling='uniform'."
            )
        if self.amp_norm_cap is not None and not self.amp_norm_cap > 0:
            raise ValueError(f"amp_norm_cap must be positive (or None for no cap), got {self.amp_norm_cap!r}.")
        if self.attn_layer_weights is not None:
            weights = list(self.attn_layer_weights)
            if (
                not weights
                or any(not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights)
                or not any(w > 0 for w in weights)
            ):
                raise ValueError(
                    f"attn_layer_weights must be finite numbers >= 0, one per attention layer and not all 0, got "
                    f"{self.attn_layer_weights!r} (None weighs every layer alike)."
                )
            self.attn_layer_weights = [float(w) for w in weights]
        if self.attn_centre not in (True, False, None):
            raise ValueError(f"attn_centre must be True, False or None (auto), got {self.attn_centre!r}.")
        if not 0.0 <= self.peft_dropout < 1.0:
            raise ValueError(f"peft_dropout must be in [0, 1), got {self.peft_dropout!r}.")

    def obliviate_config(self) -> ObliviateConfig:
        """The defense settings alone, as a plain :class:`ObliviateConfig` (also from a trainer config)."""
        return ObliviateConfig(**{f.name: getattr(self, f.name) for f in fields(ObliviateConfig)})
