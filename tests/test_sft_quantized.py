"""QLoRA: a defended LoRA on 4-bit and 8-bit bitsandbytes bases (bitsandbytes >= 0.46 runs these on CPU)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tiny_models import sft_tokenizer, tiny_causal_lm
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_obliviate import ObliviateSFTConfig, ObliviateSFTTrainer

bnb = pytest.importorskip("bitsandbytes")


def _quantization(bits: int) -> BitsAndBytesConfig:
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def _train(model, tokenizer, tmp_path, steps: int = 2, batch: int = 4, **kwargs) -> ObliviateSFTTrainer:
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"Is review {i} positive?"}],
                "completion": [{"role": "assistant", "content": "yes" if i % 2 else "no, it is not"}],
            }
            for i in range(8)
        ]
    )
    args = ObliviateSFTConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_steps=steps,
        per_device_train_batch_size=batch, logging_steps=1, save_strategy="no", disable_tqdm=True,
        learning_rate=1e-3, lambda_amp=1e-2, lambda_attn=1e-1, **kwargs,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0)
    trainer = ObliviateSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and all(not torch.equal(before[n], after[n].detach()) for n in before)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == steps
    for entry in logs:
        assert all(torch.isfinite(torch.tensor(entry[k])) for k in ("loss", "loss_task", "loss_amp", "loss_attn"))
        assert entry["loss_attn"] > 0 > entry["loss_amp"]
    return trainer


@pytest.mark.parametrize("bits", [4, 8])
def test_defended_lora_on_a_quantized_tiny_llama(tmp_path, bits):
    tokenizer = sft_tokenizer()
    tiny_causal_lm(len(tokenizer)).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=_quantization(bits), device_map="cpu", dtype=torch.float32
    )
    linear = model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    trainer = _train(model, tokenizer, tmp_path / "out")
    # The capture wraps the quantized model's attention too: both layers were recorded.
    assert trainer.obliviate_defense.capture is not None


@pytest.mark.slow
def test_defended_qlora_on_the_bundled_smollm2_4bit(tmp_path):
    from hf_obliviate.smollm import smollm2_path

    path = smollm2_path()
    tokenizer = sft_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=_quantization(4), device_map="cpu", dtype=torch.float32
    )
    _train(model, tokenizer, tmp_path / "out", steps=1, batch=2, max_length=64)
