"""Scale distillation ("healing"): train only the BitDelta scales so the compressed model's logits match the
fine-tuned model's on calibration text. Opt-in: METHOD §7 measured that distilling on clean text brings a planted
backdoor back, and the model card warns when it was used."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from .container import CompressedDelta
from .format import dedup_state_dict, unpack_signs

__all__ = ["DistillConfig", "distill_scales", "logit_mse"]


@dataclass
class DistillConfig:
    """Scale-distillation settings (METHOD §4 reference values as defaults).

    Args:
        steps (`int`, *optional*, defaults to 200): optimisation steps.
        batch_size (`int`, *optional*, defaults to 4): sequences per step.
        lr (`float`, *optional*, defaults to 1e-4): AdamW learning rate on the scales.
        num_sequences (`int`, *optional*, defaults to 800): calibration sequences used (the first ones given).
        seq_len (`int`, *optional*, defaults to 128): tokens per calibration sequence.
        seed (`int`, *optional*, defaults to 0): batch-sampling seed.

    Example:

    ```python
    >>> from hf_obliviate.delta import DistillConfig
    >>> DistillConfig(steps=30).batch_size
    4

    ```
    """

    steps: int = field(default=200, metadata={"help": "Scale-distillation steps (0 disables it)."})
    batch_size: int = field(default=4, metadata={"help": "Calibration sequences per step."})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate on the scales."})
    num_sequences: int = field(default=800, metadata={"help": "Calibration sequences used."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per calibration sequence."})
    seed: int = field(default=0, metadata={"help": "Batch-sampling seed."})

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0 (got {self.steps}); use 0 to skip distillation.")
        if self.batch_size < 1 or self.num_sequences < 1 or self.seq_len < 1:
            raise ValueError("batch_size, num_sequences and seq_len must all be >= 1.")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0 (got {self.lr}).")


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def logit_mse(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
) -> float:
    """Mean squared difference of the two models' logits on ``input_ids`` (batched, eval mode)."""
    total, count = 0.0, 0
    for i in range(0, input_ids.shape[0], batch_size):
        kw = {"input_ids": input_ids[i : i + batch_size]}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask[i : i + batch_size]
        a, b = _logits(model_a(**kw)).float(), _logits(model_b(**kw)).float()
        total += float(((a - b) ** 2).sum())
        count += a.numel()
    return total / max(count, 1)


def distill_scales(
    delta: CompressedDelta,
    base_model: torch.nn.Module,
    ft_model: torch.nn.Module,
    input_ids: torch.Tensor,
    config: DistillConfig | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> CompressedDelta:
    """Returns a copy of ``delta`` whose BitDelta scales minimise the logit MSE to ``ft_model`` on ``input_ids``.

    Only the scales train (AdamW); the sign masks, dense entries and both models stay fixed. ``base_model`` is not
    modified (the compressed weights are passed with ``torch.func.functional_call``). The result records the
    settings in ``distillation`` and the logit MSE before/after in ``stats``.
    """
    config = config or DistillConfig()
    if delta.method != "bitdelta":
        raise ValueError(f"Scale distillation trains BitDelta scales; this delta uses {delta.method!r}.")
    input_ids = input_ids[: config.num_sequences, : config.seq_len]
    if attention_mask is not None:
        attention_mask = attention_mask[: config.num_sequences, : config.seq_len]
    delta = copy.deepcopy(delta)
    base_state = dedup_state_dict(dict(base_model.named_parameters()))
    params: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.nn.Parameter] = {}
    signs: dict[str, torch.Tensor] = {}
    for name, entry in delta.entries.items():
        if name not in base_state:
            continue
        if entry.kind == "bitdelta":
            scales[name] = torch.nn.Parameter(entry.tensors["alpha"].clone().float())
            signs[name] = torch.stack([unpack_signs(s, entry.shape) for s in entry.tensors["signs"]])
        else:
            params[name] = (base_state[name].detach().float() + entry.decode()).to(base_state[name].dtype)

    def student_params() -> dict[str, torch.Tensor]:
        out = dict(params)
        for name, alpha in scales.items():
            base = base_state[name].detach()
            out[name] = (base.float() + torch.einsum("k,k...->...", alpha, signs[name])).to(base.dtype)
        return out

    was_training = (base_model.training, ft_model.training)
    base_model.eval()
    ft_model.eval()
    requires_grad = [p.requires_grad for p in base_model.parameters()]
    for p in base_model.parameters():
        p.requires_grad_(False)

    def mse_now() -> float:
        with torch.no_grad():
            sp = student_params()
            total, count = 0.0, 0
            for i in range(0, input_ids.shape[0], config.batch_size):
                kw = {"input_ids": input_ids[i : i + config.batch_size]}
                if attention_mask is not None:
                    kw["attention_mask"] = attention_mask[i : i + config.batch_size]
                a = _logits(functional_call(base_model, sp, args=(), kwargs=kw)).float()
                b = _logits(ft_model(**kw)).float()
                total += float(((a - b) ** 2).sum())
                count += a.numel()
            return total / max(count, 1)

    before = mse_now()
    opt = torch.optim.AdamW(list(scales.values()), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc="Distilling scales", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, input_ids.shape[0], (config.batch_size,), generator=gen)
        kw = {"input_ids": input_ids[idx]}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask[idx]
        with torch.no_grad():
            target = _logits(ft_model(**kw)).float()
        pred = _logits(functional_call(base_model, student_params(), args=(), kwargs=kw)).float()
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3g}")
    after = mse_now() if config.steps else before
    for name, alpha in scales.items():
        delta.entries[name].tensors["alpha"] = alpha.detach().float().contiguous()
    for p, flag in zip(base_model.parameters(), requires_grad):
        p.requires_grad_(flag)
    base_model.train(was_training[0])
    ft_model.train(was_training[1])
    delta.distillation = asdict(config)
    delta.stats["logit_mse_before_distillation"] = before
    delta.stats["logit_mse"] = after
    return delta
