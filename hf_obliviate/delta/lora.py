"""LoRA deltas: merged (``W + s·B·A``, then diffed and compressed like a full fine-tune) or raw factors (the
adapter stored as is), with the honest size trade-off between the two.

A rank-r adapter on a ``d_out × d_in`` matrix costs ``2·r·(d_in + d_out)`` bytes in fp16; a dense 1-bit copy of
``B·A`` costs ``d_in·d_out / 8`` bytes (plus a 4-byte scale). The 1-bit copy is smaller only when
``r > d_in·d_out / (16·(d_in + d_out))`` (about d/32 for a square matrix). peft is imported lazily.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["is_peft_model", "lora_size_tradeoff", "merge_lora"]


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (without importing peft when it is not loaded)."""
    import sys

    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    """A merged copy of a peft model (``merge_and_unload`` on a deep copy; the input is left untouched)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def lora_size_tradeoff(peft_model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, Any]:
    """Per-module and total sizes of the fp16 LoRA factors vs a dense 1-bit (BitDelta, k=1) copy of ``B·A``.

    Modules are found by type (peft's ``LoraLayer``), not by name. Returns a dict with ``modules`` (one row per
    LoRA layer: ``d_in``, ``d_out``, ``r``, ``adapter_fp16_bytes``, ``bitdelta_bytes``, ``break_even_rank``,
    ``bitdelta_smaller``) and the totals.
    """
    from peft.tuners.lora import LoraLayer

    rows = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [adapter_name] if adapter_name else list(module.r)
        for adapter in adapters:
            if adapter not in module.r or adapter not in getattr(module, "lora_A", {}):
                continue
            d_in, d_out, r = int(module.in_features), int(module.out_features), int(module.r[adapter])
            adapter_bytes = 2 * r * (d_in + d_out)
            bit_bytes = (d_in * d_out + 7) // 8 + 4
            rows.append(
                {
                    "module": name,
                    "adapter": adapter,
                    "d_in": d_in,
                    "d_out": d_out,
                    "r": r,
                    "adapter_fp16_bytes": adapter_bytes,
                    "bitdelta_bytes": bit_bytes,
                    "break_even_rank": d_in * d_out / (16 * (d_in + d_out)),
                    "bitdelta_smaller": bit_bytes < adapter_bytes,
                }
            )
    total_adapter = sum(r["adapter_fp16_bytes"] for r in rows)
    total_bit = sum(r["bitdelta_bytes"] for r in rows)
    return {
        "modules": rows,
        "adapter_fp16_bytes": total_adapter,
        "bitdelta_bytes": total_bit,
        "bitdelta_smaller": total_bit < total_adapter,
        "note": "a dense 1-bit copy of B·A beats the fp16 adapter only when r > d_in·d_out / (16·(d_in + d_out))",
    }
