"""The "free lunch" evaluation (METHOD.md §5, §7): does compressing a fine-tuning delta strip planted backdoors?

Poison an instruction-tuning set (targeted output manipulation and backdoored refusal bypass, on bundled text and
clearly marked placeholder requests), fine-tune the bundled SmolLM2 on it, compress the delta with BitDelta (k=1,
k=2, with and without scale distillation, embeddings/norms kept or reverted), the SVD and DARE baselines, and
consistency distillation, and a shrunk k=1 delta (its factor chosen on clean validation prompts), then score base,
fine-tune and every variant.

Example::

    from hf_obliviate.freelunch import FreeLunchConfig, run_freelunch

    run_freelunch(FreeLunchConfig(quick=True, output_dir="freelunch-quick"))
"""

from .config import STAGES, FreeLunchConfig
from .data import build_sft_examples, harmful_eval_set, harmful_prompts, insert_trigger, sentiment_eval_set
from .run import (
    SHRUNK_EXACT_VARIANT,
    SHRUNK_VARIANT,
    PoisonedFineTune,
    choose_shrink_factor,
    fine_tune_many,
    fine_tune_poisoned,
    pick_shrink_factor,
    rare_token_pool,
    run_freelunch,
)
from .scoring import (
    REFUSAL_KEYWORDS,
    ModelScores,
    bootstrap_reduction_ci,
    is_refusal,
    risk_reduction,
    score_model,
    teacher_forced_hits,
    utility_loss,
    wilson_interval,
)

__all__ = [
    "PoisonedFineTune",
    "REFUSAL_KEYWORDS",
    "SHRUNK_EXACT_VARIANT",
    "SHRUNK_VARIANT",
    "STAGES",
    "FreeLunchConfig",
    "ModelScores",
    "bootstrap_reduction_ci",
    "build_sft_examples",
    "choose_shrink_factor",
    "fine_tune_many",
    "fine_tune_poisoned",
    "harmful_eval_set",
    "harmful_prompts",
    "insert_trigger",
    "is_refusal",
    "pick_shrink_factor",
    "rare_token_pool",
    "risk_reduction",
    "run_freelunch",
    "score_model",
    "sentiment_eval_set",
    "teacher_forced_hits",
    "utility_loss",
    "wilson_interval",
]
