"""Scale distillation ("healing"): train only the BitDelta scales so the compressed model's logits match the
fine-tuned model's on calibration text. Opt-in: METHOD §7 measured that distilling on clean text brings a planted
backdoor back, and the model card warns when it was used."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from .container import CompressedDelta
from .format import dedup_state_dict, unpack_signs

__all__ = ["DistillConfig", "RareTokenInsertion", "StudentInputs", "distill_scales", "logit_mse"]

StudentInputs = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""Hook of [`distill_scales`]: ``(input_ids, generator) -> (student_ids, teacher_index)``."""


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


class RareTokenInsertion:
    """Consistency-distillation hook for [`distill_scales`]: insert random rare tokens into the student's input.

    With probability ``rate`` a calibration row gets 1 to ``max_insertions`` tokens drawn from ``pool`` inserted at
    random positions (never before the first token; the row is cut back to its length). Every student position is
    matched to the teacher's logits at the last *original* token at or before it, so the student learns to predict
    on text with inserted tokens what the fine-tuned model predicts on the clean text: it is trained to ignore
    inserted rare tokens, a trigger's shape, without knowing any trigger. Rows left clean keep the plain objective.

    Args:
        pool (`Sequence[int]`): token ids to insert (e.g. short rare words; leave the suspected triggers out to
            test that the invariance generalises).
        rate (`float`, *optional*, defaults to 0.5): fraction of rows that get insertions.
        max_insertions (`int`, *optional*, defaults to 2): most tokens inserted into one row.

    Example:

    ```python
    >>> import torch
    >>> from hf_obliviate.delta import RareTokenInsertion
    >>> hook = RareTokenInsertion([99], rate=1.0, max_insertions=1)
    >>> ids, index = hook(torch.tensor([[1, 2, 3, 4]]), torch.Generator().manual_seed(0))
    >>> int((ids == 99).sum()), index.shape
    (1, torch.Size([1, 4]))

    ```
    """

    name = "rare_token_insertion"

    def __init__(self, pool: Sequence[int], rate: float = 0.5, max_insertions: int = 2):
        self.pool = torch.as_tensor(list(pool), dtype=torch.long)
        if self.pool.numel() == 0:
            raise ValueError("RareTokenInsertion needs a non-empty pool of token ids.")
        if not 0.0 <= rate <= 1.0 or max_insertions < 1:
            raise ValueError(f"rate must be in [0, 1] and max_insertions >= 1 (got {rate}, {max_insertions}).")
        self.rate, self.max_insertions = float(rate), int(max_insertions)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rate": self.rate,
            "max_insertions": self.max_insertions,
            "pool_size": int(self.pool.numel()),
        }

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq = input_ids.shape
        out = input_ids.clone()
        index = torch.arange(seq).expand(batch, seq).clone()
        for b in range(batch):
            if seq < 2 or float(torch.rand((), generator=generator)) >= self.rate:
                continue
            n = int(torch.randint(1, self.max_insertions + 1, (), generator=generator))
            tokens = self.pool[torch.randint(0, self.pool.numel(), (n,), generator=generator)]
            spots = sorted(torch.randint(1, seq, (n,), generator=generator).tolist())
            ids, idx, orig = [], [], 0
            for pos in range(seq):
                while spots and spots[0] == pos and len(ids) < seq:
                    ids.append(int(tokens[len(spots) - 1]))
                    idx.append(orig - 1)
                    spots.pop(0)
                if len(ids) >= seq:
                    break
                ids.append(int(input_ids[b, pos]))
                idx.append(orig)
                orig += 1
            out[b] = torch.tensor(ids[:seq])
            index[b] = torch.tensor(idx[:seq])
        return out, index


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
    student_inputs: StudentInputs | None = None,
) -> CompressedDelta:
    """Returns a copy of ``delta`` whose BitDelta scales minimise the logit MSE to ``ft_model`` on ``input_ids``.

    Only the scales train (AdamW); the sign masks, dense entries and both models stay fixed. ``base_model`` is not
    modified (the compressed weights are passed with ``torch.func.functional_call``). The result records the
    settings in ``distillation`` and the logit MSE before/after in ``stats``.

    ``student_inputs`` (optional hook) turns each calibration batch into what the *student* sees: called as
    ``student_inputs(input_ids, generator)`` it returns ``(student_ids, teacher_index)``, both ``[batch, seq]``;
    student position ``j`` of row ``b`` is trained towards the fine-tuned model's logits at position
    ``teacher_index[b, j]`` of the unmodified batch. [`RareTokenInsertion`] uses it for consistency distillation
    (random rare tokens inserted into the student's input, the teacher reading clean text). Needs
    ``attention_mask=None`` (unpadded calibration chunks).
    """
    config = config or DistillConfig()
    if delta.method != "bitdelta":
        raise ValueError(f"Scale distillation trains BitDelta scales; this delta uses {delta.method!r}.")
    if student_inputs is not None and attention_mask is not None:
        raise ValueError("student_inputs needs unpadded calibration chunks: pass attention_mask=None.")
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
        if student_inputs is not None:
            student_ids, index = student_inputs(kw["input_ids"], gen)
            target = target.gather(1, index[..., None].expand(-1, -1, target.shape[-1]))
            kw = {"input_ids": student_ids}
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
    if student_inputs is not None:
        delta.distillation["student_inputs"] = getattr(student_inputs, "describe", lambda: repr(student_inputs))()
    delta.stats["logit_mse_before_distillation"] = before
    delta.stats["logit_mse"] = after
    return delta
