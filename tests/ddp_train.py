"""Train both trainers for a few steps; run under ``torch.distributed.run`` by tests/test_distributed.py.

``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train.py OUT PER_DEVICE_BATCH STEPS``: each process
trains ObliviateTrainer (tiny Llama classifier, LoRA) and ObliviateSFTTrainer (tiny causal Llama, LoRA) on CPU with
gloo; the main process writes the trained adapter tensors (safetensors) and the logged losses (JSON) to OUT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import PadCollator, quiet_training_kwargs  # noqa: E402

N_EXAMPLES = 8  # one optimizer step sees every example (global batch 8): data order cannot matter


def _common(out: Path, batch: int, steps: int) -> dict:
    return quiet_training_kwargs(
        out,
        learning_rate=1e-2,
        max_steps=steps,
        per_device_train_batch_size=batch,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def _trained(trainer) -> tuple[dict[str, torch.Tensor], list[float]]:
    tensors = {n: p.detach().float().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    terms = [e.get("loss_attn") for e in trainer.state.log_history if "loss" in e]
    return tensors, losses + terms


def _classifier_and_rows():
    """A tiny LoRA Llama classifier (seeded) and the N_EXAMPLES token-id rows both classification runs train on."""
    from tiny_models import tiny_peft_model

    torch.manual_seed(0)
    model = tiny_peft_model("llama", "lora")
    gen = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, 100, (4 + (i * 5) % 9,), generator=gen).tolist(), "labels": i % 2}
        for i in range(N_EXAMPLES)
    ]
    return model, rows


def run_cls(out: Path, batch: int, steps: int):
    from hf_obliviate import ObliviateTrainer, ObliviateTrainingArguments

    model, rows = _classifier_and_rows()
    args = ObliviateTrainingArguments(**_common(out / "cls", batch, steps))
    trainer = ObliviateTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=PadCollator()
    )
    trainer.train()
    return trainer


def run_sft(out: Path, batch: int, steps: int):
    from peft import LoraConfig
    from tiny_models import sft_tokenizer, tiny_causal_lm

    from hf_obliviate import ObliviateSFTConfig, ObliviateSFTTrainer

    tokenizer = sft_tokenizer()
    model = tiny_causal_lm(len(tokenizer))
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Review {i}: {'fine ' * (i % 3)}film."}],
            "completion": [{"role": "assistant", "content": "positive" if i % 2 else "negative, " + "so " * i}],
        }
        for i in range(N_EXAMPLES)
    ]
    args = ObliviateSFTConfig(**_common(out / "sft", batch, steps), bf16=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0)
    trainer = ObliviateSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    trainer.train()
    return trainer


def check_sharded_amplification(out: Path) -> None:
    """FSDP2-style ``DTensor`` shards: the amplification term and its gradient equal those of the whole tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_obliviate.losses import amplification_loss

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(8, 6, generator=gen), torch.randn(6, 8, generator=gen), torch.zeros(4, 6)]
    whole = [t.clone().requires_grad_(True) for t in full]
    amplification_loss(whole).backward()
    sharded = [distribute_tensor(t.clone(), mesh, [Shard(0)]).requires_grad_(True) for t in full]
    loss = amplification_loss(sharded)
    loss.backward()
    torch.testing.assert_close(loss.detach(), -sum(torch.linalg.vector_norm(t) for t in full))
    for shard, reference in zip(sharded, whole):
        torch.testing.assert_close(shard.grad.full_tensor(), reference.grad)
    if dist.get_rank() == 0:
        (out / "dtensor.ok").write_text(f"{loss.item()}")
    # Both ranks leave together: tearing gloo down while the peer still talks can abort the process.
    dist.barrier()
    dist.destroy_process_group()


def run_fsdp2(steps: int, defended: bool = True) -> dict[str, torch.Tensor]:
    """A plain-torch defended loop (``ObliviateDefense``, no Trainer: accelerate enables FSDP on GPUs only) on a
    tiny LoRA Llama classifier. Under ``torch.distributed.run`` every decoder layer and the root are sharded with
    FSDP2 (``fully_shard``, gloo, CPU) and each process takes its half of the global batch of 8; in one process the
    model stays whole and takes all 8. Returns the whole trained LoRA tensors."""
    import torch.distributed as dist

    from hf_obliviate import ObliviateDefense

    model, rows = _classifier_and_rows()
    batch = PadCollator()(rows)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        rank, per_rank = dist.get_rank(), N_EXAMPLES // world
        batch = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
    # large coefficients: the terms must visibly move the weights (compared with defended=False in the test)
    defense = ObliviateDefense(model, lambda_amp=1e-2, lambda_attn=1e-1) if defended else None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        if defense is None:
            model(**batch).loss.backward()
        else:
            with defense.track(attention_mask=batch["attention_mask"]) as step:
                out = model(**batch)
            (out.loss + step.penalty()).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            trained[name] = whole.detach().float().contiguous()
    if world > 1:
        assert any(hasattr(p, "full_tensor") for p in model.parameters() if p.requires_grad), "not sharded"
        dist.barrier()
        dist.destroy_process_group()
    return trained


def main() -> None:
    if sys.argv[2] == "dtensor":
        check_sharded_amplification(Path(sys.argv[1]))
        return
    if sys.argv[2] == "fsdp2":
        trained = run_fsdp2(int(sys.argv[3]))
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(trained, str(Path(sys.argv[1]) / "fsdp2.safetensors"), metadata={"format": "pt"})
        return
    out, batch, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for name, run in (("cls", run_cls), ("sft", run_sft)):
        trainer = run(out, batch, steps)
        tensors, logged = _trained(trainer)
        world = trainer.accelerator.num_processes
        trainer.save_model()  # the Trainer writes from the main process only
        if trainer.is_world_process_zero():
            save_file(tensors, str(out / f"{name}.safetensors"), metadata={"format": "pt"})
            (out / f"{name}.json").write_text(json.dumps({"logged": logged, "world_size": world}))


if __name__ == "__main__":
    main()
