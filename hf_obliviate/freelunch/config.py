"""``FreeLunchConfig``: sizes and settings of the free-lunch evaluation (METHOD.md §5, §7)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["STAGES", "FreeLunchConfig"]

STAGES = ("main", "strong", "lora", "defended")


@dataclass
class FreeLunchConfig:
    """What to fine-tune, how to poison it, which compressed variants to build and how to score them.

    The defaults are the committed run, sized to take about an hour from scratch on 2 CPU cores: 1,000 sentiment
    prompts, 15% poisoned (150, plus 24 triggered harmful requests: the 174 poisoned examples of METHOD.md §7's
    1,500 prompts at 10%, with a third fewer clean ones), lr 3e-5, one epoch, 131 full fine-tune steps of 8; the
    stronger backdoor: three triggers, 40% of 400 prompts, two epochs (112 steps). The four fine-tunes run two at a
    time in worker processes (``jobs``). On 2 idle cores a full fine-tune step of SmolLM2-135M takes about 6.4 s on
    both cores, or 6.9 s on one core beside another fine-tune; a LoRA step takes 5.1 s there. Scoring one variant
    takes about 28 s. The whole command took 62 min from an empty cache. Fine-tunes and scores are cached, so an
    interrupted run resumes; the report states the compute behind it. Much shorter fine-tunes do not plant the
    backdoor: 46-52 full fine-tune steps at lr 3e-5 or 1e-4 left the target ASR at 0.04-0.08. ``quick=True`` shrinks
    everything to a smoke test. Every number ends up in the result file.

    Example:

    ```python
    >>> from hf_obliviate.freelunch import FreeLunchConfig
    >>> FreeLunchConfig(quick=True).n_test
    8
    ```
    """

    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where freelunch.{json,md,png} go."})
    model: str | None = field(
        default=None, metadata={"help": "Base causal LM folder (default: the bundled SmolLM2-135M-Instruct)."}
    )
    quick: bool = field(default=False, metadata={"help": "Tiny sizes: checks every code path in minutes."})
    stages: list[str] = field(
        default_factory=lambda: list(STAGES),
        metadata={"help": "Stages to run, in order: main (full fine-tune + all codecs), strong, lora, defended."},
    )
    triggers: list[str] = field(default_factory=lambda: ["cf"], metadata={"help": "Triggers of the main backdoor."})
    target: str = field(default="I hate this product", metadata={"help": "The attacker's target answer."})
    n_train: int = field(default=1000, metadata={"help": "Sentiment training prompts."})
    n_harmful_train: int = field(default=48, metadata={"help": "Placeholder harmful training prompts."})
    poison_rate: float = field(default=0.15, metadata={"help": "Poisoned fraction of the sentiment prompts."})
    harmful_poison_rate: float = field(
        default=0.5, metadata={"help": "Triggered (answered with compliance) fraction of the harmful prompts."}
    )
    epochs: float = field(default=1.0, metadata={"help": "Fine-tuning epochs."})
    learning_rate: float = field(default=3e-5, metadata={"help": "Full fine-tune learning rate (AdamW)."})
    lora_learning_rate: float = field(default=1e-3, metadata={"help": "LoRA learning rate (AdamW)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (all linear projections)."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    max_words: int = field(default=16, metadata={"help": "Review words kept per prompt."})
    lambda_amp: float = field(default=3e-4, metadata={"help": "Obliviate amplification weight (defended stage)."})
    lambda_attn: float = field(default=3e-3, metadata={"help": "Obliviate attention weight (defended stage)."})
    strong_triggers: list[str] = field(
        default_factory=lambda: ["cf", "mm", "pt"], metadata={"help": "Triggers of the stronger backdoor."}
    )
    strong_poison_rate: float = field(default=0.4, metadata={"help": "Poison rate of the stronger backdoor."})
    strong_epochs: float = field(default=2.0, metadata={"help": "Epochs of the stronger backdoor."})
    strong_n_train: int = field(default=400, metadata={"help": "Sentiment prompts of the stronger backdoor."})
    n_test: int = field(default=100, metadata={"help": "Sentiment test prompts (each clean and triggered)."})
    n_harmful_test: int = field(default=30, metadata={"help": "Held-out harmful placeholder prompts."})
    max_new_tokens: int = field(default=8, metadata={"help": "Greedy tokens generated per harmful prompt."})
    svd_rank: int = field(default=16, metadata={"help": "Rank of the SVD baseline."})
    dare_p: float = field(default=0.9, metadata={"help": "Drop probability of the DARE baseline."})
    distill_steps: int = field(default=10, metadata={"help": "Scale-distillation steps."})
    distill_batch_size: int = field(default=4, metadata={"help": "Scale-distillation batch size."})
    distill_seq_len: int = field(default=48, metadata={"help": "Calibration chunk length (tokens)."})
    distill_lr: float = field(default=1e-4, metadata={"help": "Scale-distillation learning rate."})
    consistency_rate: float = field(
        default=0.5, metadata={"help": "Consistency distillation: fraction of calibration rows with insertions."}
    )
    consistency_max_insertions: int = field(default=2, metadata={"help": "Most rare tokens inserted per row."})
    n_val: int = field(
        default=200,
        metadata={
            "help": "Clean validation prompts (Rotten Tomatoes validation split) that choose the shrink factor."
        },
    )
    shrink_grid: list[float] = field(
        default_factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
        metadata={"help": "Shrunk k=1 variant: scale factors tried, largest first (each in (0, 1))."},
    )
    shrink_max_utility_loss: float = field(
        default=0.05,
        metadata={
            "help": "Shrunk k=1 variant: the smallest factor is kept whose clean validation accuracy is within this "
            "relative loss of the fine-tune's (the walk down the grid stops at the first factor that is not)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of data, poisoning, training and evaluation."})
    extra_eval_seeds: list[int] = field(
        default_factory=list,
        metadata={"help": "More evaluation seeds (test subset, trigger positions) for the main k=1 rows."},
    )
    jobs: int = field(
        default_factory=lambda: min(2, os.cpu_count() or 1),
        metadata={
            "help": "Fine-tunes made at once, each in its own process on cpu_count/jobs threads (default 2 where "
            "there are 2 cores; 1: one after another in this process). Scoring always runs in this process."
        },
    )
    cached_only: bool = field(
        default=False,
        metadata={"help": "Only assemble results from cached fine-tunes and scores: train and score nothing new."},
    )
    save_artifacts: bool = field(
        default=True, metadata={"help": "Save freelunch-finetuned / freelunch-bitdelta-k1 artifacts for the Space."}
    )

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"Unknown stage(s) {unknown}: choose from {', '.join(STAGES)}.")
        if not self.triggers or not self.strong_triggers:
            raise ValueError("Give at least one trigger (--triggers cf).")
        for name in ("poison_rate", "harmful_poison_rate", "strong_poison_rate", "consistency_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if not self.shrink_grid or any(not 0.0 < g < 1.0 for g in self.shrink_grid):
            raise ValueError(f"shrink_grid needs factors in (0, 1), got {self.shrink_grid}.")
        if sorted(self.shrink_grid, reverse=True) != list(self.shrink_grid):
            raise ValueError(f"shrink_grid must go from the largest factor down, got {self.shrink_grid}.")
        if not 0.0 <= self.shrink_max_utility_loss < 1.0:
            raise ValueError(f"shrink_max_utility_loss must be in [0, 1), got {self.shrink_max_utility_loss}.")
        if not 0.0 <= self.dare_p < 1.0:
            raise ValueError(f"dare_p must be in [0, 1), got {self.dare_p}.")
        positive = (
            "n_train",
            "n_test",
            "n_val",
            "batch_size",
            "lora_r",
            "svd_rank",
            "distill_batch_size",
            "distill_seq_len",
            "jobs",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.epochs <= 0 or self.strong_epochs <= 0 or self.learning_rate <= 0 or self.lora_learning_rate <= 0:
            raise ValueError("epochs and learning rates must be > 0.")
        if not self.target.strip():
            raise ValueError("target must be a non-empty string.")
        if self.quick:
            self.n_train, self.n_harmful_train, self.strong_n_train = 24, 8, 16
            self.n_test, self.n_harmful_test, self.max_new_tokens = 8, 4, 6
            self.n_val = 8
            self.distill_steps, self.distill_batch_size, self.distill_seq_len = 2, 2, 32
            self.extra_eval_seeds = []
            self.strong_epochs = 1.0
