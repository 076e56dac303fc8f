"""Tiny random models of each supported family, and the PEFT configs the tests wrap them with."""

from __future__ import annotations

import os

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    TrainerCallback,
)

from hf_obliviate.bottleneck import BottleneckConfig, get_bottleneck_model
from hf_obliviate.tuners import prepare_prefix_tuning

FAMILIES = ("bert", "roberta", "llama")
TUNERS = ("lora", "dora", "prefix", "ia3", "bottleneck")
VOCAB = 100


def tiny_model(family: str, attn_implementation: str = "sdpa", dropout: float = 0.0):
    """A 2-layer random sequence classifier (2 labels) of ``family``."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_labels=2, attn_implementation=attn_implementation)
    if family == "bert":
        config = BertConfig(
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            **common,
        )
        return BertForSequenceClassification(config)
    if family == "roberta":
        config = RobertaConfig(
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=70,
            pad_token_id=1,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            **common,
        )
        return RobertaForSequenceClassification(config)
    if family == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            max_position_embeddings=64,
            attention_dropout=dropout,
            **common,
        )
        return LlamaForSequenceClassification(config)
    raise ValueError(family)


def _targets(family: str) -> tuple[list[str], list[str]]:
    if family == "llama":
        return ["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"]
    return ["query", "value"], ["key", "value", "output.dense"]


def tiny_peft_model(
    family: str, tuner: str, attn_implementation: str = "sdpa", dropout: float = 0.0, prepare: bool = True
):
    """A tiny random ``family`` classifier with ``tuner``; prefix tuning as hf-obliviate prepares it (unless not
    ``prepare``: `hf_obliviate.tuners.prepare_prefix_tuning`, which the trainers and the defense call)."""
    base = tiny_model(family, attn_implementation, dropout)
    lora_targets, ia3_targets = _targets(family)
    if tuner in ("lora", "dora"):
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules=lora_targets,
            use_dora=tuner == "dora",
            task_type="SEQ_CLS",
        )
        return get_peft_model(base, config)
    if tuner == "prefix":
        model = get_peft_model(
            base,
            PrefixTuningConfig(
                num_virtual_tokens=4, task_type="SEQ_CLS", prefix_projection=True, encoder_hidden_size=16
            ),
        )
        if prepare:
            prepare_prefix_tuning(model)
        return model
    if tuner == "ia3":
        ff = ["down_proj"] if family == "llama" else ["output.dense"]
        return get_peft_model(base, IA3Config(target_modules=ia3_targets, feedforward_modules=ff, task_type="SEQ_CLS"))
    if tuner == "bottleneck":
        return get_bottleneck_model(base, BottleneckConfig(bottleneck_size=8))
    raise ValueError(tuner)


def tiny_batch(batch: int = 4, length: int = 10, seed: int = 0, pad_id: int = 0, family: str = "bert"):
    """Random ids with right padding of varying length; position 0 holds a CLS-like id."""
    gen = torch.Generator().manual_seed(seed)
    pad_id = 1 if family == "roberta" else pad_id
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        keep = max(3, length - 2 * row)
        mask[row, keep:] = 0
        ids[row, keep:] = pad_id
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_tokenizer():
    """The SmolLM2 tokenizer (chat template included) from the converted bundled checkpoint (no network)."""
    from transformers import AutoTokenizer

    from hf_obliviate.smollm import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def tiny_causal_lm(vocab_size: int, attn_implementation: str = "sdpa", seed: int = 0):
    """A 2-layer random Llama causal LM (GQA: 4 query heads, 2 key heads) for SFT tests."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config)


def quiet_training_kwargs(output_dir, **overrides) -> dict:
    """Deterministic, quiet training arguments for the trainer tests (defense on, strong coefficients).

    CPU-only, unless ``HF_OBLIVIATE_TEST_DEVICE=cuda`` (a GPU smoke run of the trainer tests: the Trainer then
    places the model on the GPU)."""
    device = os.environ.get("HF_OBLIVIATE_TEST_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"HF_OBLIVIATE_TEST_DEVICE must be 'cpu' or 'cuda', got {device!r}.")
    kwargs = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=device == "cpu",
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        max_grad_norm=0.0,
        lambda_amp=1e-2,
        lambda_attn=1e-1,
        # METHOD.md's two terms, not ObliviateTrainingArguments' classifier defaults (the scan-relative term); the
        # consistency term's tests turn it on, with ObliviateConfig's own token and target settings unless they say
        lambda_consistency=0.0,
        consistency_tokens="rare",
        consistency_target="logits",
    )
    kwargs.update(overrides)
    return kwargs


class GradCatcher(TrainerCallback):
    """Keeps the gradients of the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class PadCollator:
    """Pads to the longest example of each micro-batch (so accumulation micro-batches differ in length)."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        ids = [f["input_ids"] + [self.pad_id] * (length - len(f["input_ids"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor([f["labels"] for f in features]),
        }
