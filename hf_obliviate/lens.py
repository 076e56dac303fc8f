"""LogitLens: read every layer's hidden state through the model's own final norm and LM head (METHOD.md §5).

For each layer ℓ and position t the lens computes ``softmax(head(norm(h_ℓ[t])))`` and keeps the top tokens, their
probabilities and the probability of tokens of interest (an attacker's target, a refusal). It shows at which layer
a backdoor's target answer takes over a triggered prompt, and whether it still does after the fine-tuning delta was
compressed.

The double-norm pitfall: in transformers the *last* entry of ``output_hidden_states`` is already normalised for
Llama / Mistral / Qwen / Gemma / GPT-2-style models (the final norm is applied before it is stored). Normalising it
again would give a wrong last row. The lens does not guess: it checks, on every call, whether ``head(h_last)`` or
``head(norm(h_last))`` reproduces the model's real logits and uses whichever does (an error if neither does), so
the last row always equals the model's real output distribution.

Example:

```python
>>> from hf_obliviate.lens import logit_lens, plot_lens
>>> from hf_obliviate.smollm import load_smollm2
>>> model, tokenizer = load_smollm2()
>>> result = logit_lens(model, tokenizer, "The capital of France is", targets=[" Paris"])
>>> result.layer_names[-1], result.top_tokens[-1][-1]
('layer 29', ' Paris')
>>> fig = plot_lens(result, target=" Paris")
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["LensError", "LensResult", "find_final_norm", "logit_lens", "plot_lens"]

# Attribute paths of the final norm, relative to the model's backbone (``model.model``, ``model.transformer``, ...).
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f", "final_layernorm", "final_norm")
_BACKBONE_NAMES = ("model", "transformer", "gpt_neox", "backbone", "decoder")


class LensError(ValueError):
    """The lens cannot be applied to this model (an architecture it does not know how to read)."""


@dataclass
class LensResult:
    """What [`logit_lens`] read from every layer.

    Args:
        layer_names (`list[str]`): ``"embeddings"``, ``"layer 0"``, ..., ``"layer N-1"``; the last row is the model's
            real output distribution.
        tokens (`list[str]`): the input tokens, each decoded on its own.
        top_token_ids (`np.ndarray`): ``[n_layers + 1, seq, top_k]`` ids of the most probable next tokens.
        top_tokens (`list[list[str]]`): ``[n_layers + 1][seq]`` the top-1 tokens, decoded.
        top_probs (`np.ndarray`): ``[n_layers + 1, seq]`` probability of the top-1 token.
        target_probs (`dict[str, np.ndarray]`): for each target string, ``[n_layers + 1, seq]`` probability of its
            first token.
        target_token_ids (`dict[str, int]`): the first token id of each target string.
        last_hidden_normed (`bool`): whether the model's last stored hidden state was already normalised (so the
            lens did not normalise it again).
    """

    layer_names: list[str]
    tokens: list[str]
    top_token_ids: np.ndarray
    top_tokens: list[list[str]]
    top_probs: np.ndarray
    target_probs: dict[str, np.ndarray] = field(default_factory=dict)
    target_token_ids: dict[str, int] = field(default_factory=dict)
    last_hidden_normed: bool = True

    def takeover_layer(self, target: str, position: int = -1, threshold: float = 0.5) -> int | None:
        """First row (index into ``layer_names``, 0 = embeddings) where ``target`` is the top-1 token at
        ``position`` with probability at least ``threshold``; ``None`` if it never is.

        ``threshold=0`` asks only for top-1. Only the first token of ``target`` is compared.
        """
        if target not in self.target_probs:
            raise KeyError(f"{target!r} was not among the targets of this lens run: {sorted(self.target_probs)}.")
        tid = self.target_token_ids[target]
        probs = self.target_probs[target][:, position]
        top1 = self.top_token_ids[:, position, 0]
        for row in range(len(self.layer_names)):
            if int(top1[row]) == tid and float(probs[row]) >= threshold:
                return row
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable content (numpy arrays as nested lists)."""
        return {
            "layer_names": list(self.layer_names),
            "tokens": list(self.tokens),
            "top_token_ids": self.top_token_ids.tolist(),
            "top_tokens": [list(row) for row in self.top_tokens],
            "top_probs": self.top_probs.tolist(),
            "target_probs": {k: v.tolist() for k, v in self.target_probs.items()},
            "target_token_ids": dict(self.target_token_ids),
            "last_hidden_normed": self.last_hidden_normed,
        }


def _unwrap(model: nn.Module) -> nn.Module:
    """A peft model's underlying transformers model (the lens reads the merged forward anyway)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def find_final_norm(model: nn.Module) -> nn.Module:
    """The final norm of a causal LM, looked up on its backbone (``model.model.norm``, ``transformer.ln_f``, ...).

    Raises [`LensError`] naming the attributes that were tried when none exists.
    """
    model = _unwrap(model)
    candidates: list[nn.Module] = []
    prefix = getattr(model, "base_model_prefix", None)
    for name in ((prefix,) if prefix else ()) + _BACKBONE_NAMES:
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module) and sub not in candidates:
            candidates.append(sub)
            inner = getattr(sub, "decoder", None)  # OPT: model.decoder.final_layer_norm
            if isinstance(inner, nn.Module):
                candidates.append(inner)
    candidates.append(model)
    for module in candidates:
        for name in _NORM_NAMES:
            norm = getattr(module, name, None)
            if isinstance(norm, nn.Module):
                return norm
    tried = [f"{b}.{n}" for b in ((prefix,) if prefix else ()) + _BACKBONE_NAMES for n in _NORM_NAMES]
    raise LensError(
        f"Cannot find the final norm of {type(model).__name__}: none of the attributes {', '.join(tried[:12])}, ... "
        "exists. The lens supports decoder LMs with a final norm before the LM head (Llama, Mistral, Qwen, Gemma, "
        "GPT-2, GPT-NeoX, OPT, ...)."
    )


def _head(model: nn.Module) -> nn.Module:
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        raise LensError(
            f"{type(_unwrap(model)).__name__}.get_output_embeddings() returned None: the lens needs a causal LM "
            "with an LM head (AutoModelForCausalLM), not a bare backbone or a classifier."
        )
    return head


def _unsupported_config(config: Any) -> None:
    """Architectures whose LM head output is not ``head(norm(h))`` in a way the lens reproduces."""
    if getattr(config, "model_type", None) == "opt" and getattr(config, "word_embed_proj_dim", None) not in (
        None,
        getattr(config, "hidden_size", None),
    ):
        raise LensError(
            "This OPT model projects hidden states (project_out) before the LM head; the lens does not apply that "
            "projection to intermediate layers yet."
        )


def _first_token_id(tokenizer, target: str) -> int:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"The target {target!r} encodes to no tokens.")
    return int(ids[0])


@torch.no_grad()
def logit_lens(
    model: nn.Module,
    tokenizer,
    text: str | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    targets: Sequence[str] = (),
    top_k: int = 1,
) -> LensResult:
    """Applies the model's final norm and LM head to every layer's hidden state of one input.

    Args:
        model (`transformers.PreTrainedModel` or `peft.PeftModel`): a causal LM.
        tokenizer: its tokenizer (to encode ``text`` and the targets and to decode tokens).
        text (`str`, *optional*): the input, encoded with the tokenizer's defaults (special tokens included).
        input_ids (`torch.Tensor`, *optional*): ``[seq]`` or ``[1, seq]`` ids instead of ``text``.
        targets (`Sequence[str]`, *optional*): strings whose *first* token's probability is tracked (mind the
            leading space: ``" Paris"`` and ``"Paris"`` are different tokens).
        top_k (`int`, *optional*, defaults to 1): how many top ids to keep per cell.

    Returns:
        [`LensResult`] with ``n_layers + 1`` rows (embeddings first, the model's real output last).

    Raises:
        [`LensError`] for architectures without a findable final norm or LM head, or whose last hidden state does
        not reproduce the real logits (neither as stored nor after the final norm).
    """
    if (text is None) == (input_ids is None):
        raise ValueError("Pass exactly one of `text` and `input_ids`.")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k}).")
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    _unsupported_config(config)
    norm, head = find_final_norm(inner), _head(inner)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2/3: logits = cap * tanh(logits / cap)

    if input_ids is None:
        input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [seq] or [1, seq], got {tuple(input_ids.shape)}.")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)

    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    finally:
        model.train(was_training)
    hidden = out.hidden_states
    if hidden is None:
        raise LensError(f"{type(inner).__name__} returned no hidden states for output_hidden_states=True.")
    real = out.logits[0].float()

    def to_logits(h: torch.Tensor, apply_norm: bool) -> torch.Tensor:
        h = norm(h) if apply_norm else h
        logits = head(h.to(head.weight.dtype)).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    # the double-norm check: which reading of the last hidden state gives the model's real logits?
    tol = 1e-3 * max(1.0, float(real.abs().max()))
    last_raw = to_logits(hidden[-1][0], apply_norm=False)
    if torch.allclose(last_raw, real, atol=tol, rtol=1e-3):
        last_normed = True
    elif torch.allclose(to_logits(hidden[-1][0], apply_norm=True), real, atol=tol, rtol=1e-3):
        last_normed = False
    else:
        raise LensError(
            f"Neither head(h_last) nor head(norm(h_last)) reproduces the real logits of {type(inner).__name__}: the "
            "model does something between its last hidden state and its logits that the lens does not know "
            "(an extra projection, scaling or softcapping). It is not supported yet."
        )

    target_ids = {t: _first_token_id(tokenizer, t) for t in targets}
    n_rows = len(hidden)
    seq = input_ids.shape[1]
    top_ids = np.zeros((n_rows, seq, top_k), dtype=np.int64)
    top_probs = np.zeros((n_rows, seq), dtype=np.float32)
    target_probs = {t: np.zeros((n_rows, seq), dtype=np.float32) for t in targets}
    for row, h in enumerate(hidden):
        # every row but the last needs the final norm; the last needs it only if the model stored it un-normed
        logits = to_logits(h[0], apply_norm=row < n_rows - 1 or not last_normed)
        probs = torch.softmax(logits, dim=-1)
        values, ids = probs.topk(top_k, dim=-1)
        top_ids[row] = ids.cpu().numpy()
        top_probs[row] = values[:, 0].cpu().numpy()
        for t, tid in target_ids.items():
            target_probs[t][row] = probs[:, tid].cpu().numpy()

    ids_list = input_ids[0].tolist()
    tokens = [tokenizer.decode([i]) for i in ids_list]
    top_tokens = [[tokenizer.decode([int(i)]) for i in top_ids[row, :, 0]] for row in range(n_rows)]
    names = ["embeddings"] + [f"layer {i}" for i in range(n_rows - 1)]
    return LensResult(
        layer_names=names,
        tokens=tokens,
        top_token_ids=top_ids,
        top_tokens=top_tokens,
        top_probs=top_probs,
        target_probs=target_probs,
        target_token_ids=target_ids,
        last_hidden_normed=last_normed,
    )


def _short(token: str, width: int = 7) -> str:
    token = token.replace("\n", "\\n")
    return token if len(token) <= width else token[: width - 1] + "…"


def plot_lens(
    result: LensResult,
    target: str | None = None,
    ax=None,
    *,
    last_positions: int | None = 12,
    title: str | None = None,
):
    """Heatmap of a [`LensResult`]: layers (rows, embeddings at the bottom) × input positions (columns).

    Each cell shows the top-1 token; its colour is the probability of ``target``'s first token (or of the top-1
    token when ``target`` is None).

    Args:
        result (`LensResult`): from [`logit_lens`].
        target (`str`, *optional*): one of the lens targets to colour by.
        ax (`matplotlib.axes.Axes`, *optional*): draw here (a new figure otherwise).
        last_positions (`int`, *optional*, defaults to 12): show only the last positions (``None``: all).
        title (`str`, *optional*): axes title.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if target is not None and target not in result.target_probs:
        raise KeyError(f"{target!r} was not among the targets of this lens run: {sorted(result.target_probs)}.")
    values = result.target_probs[target] if target is not None else result.top_probs
    seq = values.shape[1]
    start = 0 if last_positions is None else max(0, seq - last_positions)
    values = values[:, start:]
    n_rows, n_cols = values.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n_cols, 1.0 + 0.28 * n_rows))
    else:
        fig = ax.figure
    image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0)
    fontsize = 6 if n_rows > 20 else 8
    for r in range(n_rows):
        for c in range(n_cols):
            colour = "black" if values[r, c] > 0.6 else "white"
            ax.text(
                c,
                r,
                _short(result.top_tokens[r][start + c]),
                ha="center",
                va="center",
                fontsize=fontsize,
                color=colour,
            )
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(result.layer_names, fontsize=fontsize)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([_short(t, 10) for t in result.tokens[start:]], rotation=60, ha="right", fontsize=8)
    label = f"P({target!r})" if target is not None else "P(top-1)"
    fig.colorbar(image, ax=ax, label=label, fraction=0.04)
    ax.set_title(title or f"LogitLens: top token per layer, colour = {label}", fontsize=9)
    fig.tight_layout()
    return fig
