"""Model card of a compressed-delta repo: what was compressed, how small it is, how faithful, and what to watch."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["build_model_card"]


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _looks_like_repo_id(name: str | None) -> bool:
    if not name or os.path.isdir(name) or name.startswith((".", "/", "~")):
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def _table(d: dict[str, Any]) -> str:
    rows = ["| key | value |", "|---|---|"]
    for key, value in d.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        rows.append(f"| {key} | {value} |")
    return "\n".join(rows)


def build_model_card(
    meta: dict[str, Any],
    *,
    repo_id: str | None = None,
    defense: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    library_name: str = "hf-obliviate",
):
    """Builds a ``huggingface_hub.ModelCard`` from a delta's ``obliviate_delta.json`` content.

    The YAML header holds ``base_model`` (when it is a Hub id), ``library_name`` and the tags ``obliviate`` and
    ``bitdelta`` (or the baseline's name). The body states the compression, sizes (compressed vs a dense fp16 delta),
    fidelity (relative reconstruction error per matrix, logit MSE when measured), and the ``defense`` settings and
    ``evaluation`` results when given. It warns when k > 1 or scale distillation was used (METHOD §7: both brought a
    planted backdoor back).
    """
    from huggingface_hub import ModelCard, ModelCardData

    method = meta.get("method", "bitdelta")
    k = meta.get("k")
    distill = meta.get("distillation")
    size = meta.get("size") or {}
    rel = (meta.get("stats") or {}).get("rel_error") or {}
    base = meta.get("base_model")
    tags = ["obliviate", "bitdelta" if method == "bitdelta" else method, "compressed-delta"]
    data = ModelCardData(
        library_name=library_name,
        tags=tags,
        base_model=base if _looks_like_repo_id(base) else None,
    )
    lines = [f"# {repo_id or 'Compressed fine-tuning delta'}", ""]
    lines.append(
        f"A compressed fine-tuning delta made with hf-obliviate "
        f"(format version {meta.get('format_version')}, tool {meta.get('tool_version')}). It applies only to the base "
        f"model `{base}` (revision `{meta.get('base_revision')}`) whose weights have the fingerprint "
        f"`{meta.get('base_fingerprint')}`; the loader refuses any other base."
    )
    lines += ["", "```python", "from hf_obliviate.hub import load_compressed", ""]
    lines += [f'model = load_compressed("{base}", "{repo_id or "<this repo>"}")', "```", ""]

    warnings = []
    if method == "bitdelta" and k and k > 1:
        warnings.append(
            f"This delta uses **k = {k} masks**. Extra masks bring the model closer to the fine-tuned weights and, in "
            "our measurements, brought a planted backdoor back (METHOD §7). Prefer k = 1 when the fine-tuning data "
            "is not fully trusted."
        )
    if distill:
        warnings.append(
            "The scales were **distilled** on calibration text "
            f"({distill}). Distillation on clean text restored a planted backdoor in our measurements (METHOD §7)."
        )
    if method in ("svd", "dare", "magnitude"):
        warnings.append(f"`{method}` is a comparison baseline: it kept planted backdoors whole in our measurements.")
    if warnings:
        lines += ["## ⚠️ Warnings", ""] + [f"- {w}" for w in warnings] + [""]

    lines += ["## Compression", ""]
    desc = {
        "bitdelta": "BitDelta: per `nn.Linear` weight, Δ = W_ft − W_base is stored as α·sign(Δ) "
        "(α = mean|Δ| in fp32, sign(0) = +1), signs packed 8 per byte",
        "lora_factors": "the LoRA adapter stored as is (raw fp16/fp32 factors)",
    }.get(method, f"baseline `{method}`")
    lines.append(f"- Method: {desc}; settings `{meta.get('method_config')}`.")
    lines.append(f"- Other changed parameters (embeddings, norms, heads): `{meta.get('non_linear')}`.")
    factor = (meta.get("extra") or {}).get("scale_factor")
    if factor is not None and factor != 1.0:
        lines.append(
            f"- **Shrunk ×{factor:g}**: the stored delta is {factor:g} times the compressed one, so the model sits "
            "that fraction of the way from the base to the fine-tune. In our free-lunch evaluation a shrunk 1-bit "
            "delta stripped more of a poisoned fine-tune's backdoor at a small cost in task accuracy "
            "(`benchmarks/results/freelunch.md`)."
        )
    if meta.get("reverted"):
        lines.append(f"- Reverted to base: {len(meta['reverted'])} parameters.")
    lines.append(f"- Compressed matrices: {len(meta.get('modules') or [])}.")
    lines += ["", "## Size", ""]
    lines.append(
        _table(
            {
                "compressed payload": _fmt_bytes(size.get("compressed_bytes")),
                "dense fp16 delta of the same parameters": _fmt_bytes(size.get("dense_fp16_bytes")),
                "ratio (dense fp16 / compressed)": size.get("ratio_vs_dense_fp16"),
                "bits per compressed Linear weight": size.get("bits_per_linear_weight"),
            }
        )
    )
    tradeoff = (meta.get("extra") or {}).get("lora_tradeoff")
    if tradeoff:
        verdict = "smaller" if tradeoff.get("bitdelta_smaller") else "larger"
        lines += [
            "",
            f"LoRA trade-off: the fp16 adapter takes {_fmt_bytes(tradeoff['adapter_fp16_bytes'])}; a dense 1-bit copy "
            f"of B·A would take {_fmt_bytes(tradeoff['bitdelta_bytes'])} ({verdict}). {tradeoff.get('note', '')}.",
        ]
    lines += ["", "## Fidelity", ""]
    fidelity = {f"relative error ‖Δ−Δ̂‖/‖Δ‖ ({key})": v for key, v in rel.items() if key != "worst_matrix"}
    if rel.get("worst_matrix"):
        fidelity["worst matrix"] = f"`{rel['worst_matrix']}`"
    stats = meta.get("stats") or {}
    if "logit_mse" in stats:
        fidelity["logit MSE vs fine-tuned (calibration text)"] = stats["logit_mse"]
    if "logit_mse_before_distillation" in stats:
        fidelity["logit MSE before distillation"] = stats["logit_mse_before_distillation"]
    lines.append(_table(fidelity) if fidelity else "Not measured.")
    if defense:
        lines += ["", "## Defense settings", "", _table(defense)]
    if evaluation:
        lines += ["", "## Evaluation", "", _table(evaluation)]
    lines.append("")
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines))
